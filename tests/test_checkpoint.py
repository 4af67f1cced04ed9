"""A checkpoint folder's config.json is data: the file names it lists are never followed out
of the folder, neither to read nor to delete, nothing in it can make a read hang, every file
is hash-checked, a save never writes NaN, and killed saves are cleaned up by the next."""

from __future__ import annotations

import json
import os

import pytest
import torch

from guidekit import checkpoint as ckpt_mod
from guidekit.checkpoint import CONFIG, load_weights, read_checkpoint, save_checkpoint
from guidekit.errors import CheckpointError


def write(d, step=1):
    return save_checkpoint(d, {"kind": "ddpm"}, {"ema": {"w": torch.ones(2)}}, step)


def test_saving_never_deletes_what_a_crafted_config_lists(tmp_path):
    d = write(tmp_path / "ckpt")
    other = write(tmp_path / "other")
    victims = [tmp_path / "victim.txt", tmp_path / "absolute.txt"]
    for v in victims:
        v.write_text("keep me")
    link = d / "state-0000001.safetensors"  # a checkpoint-like name that is a link out
    link.symlink_to(victims[0])
    cfg = json.loads((d / CONFIG).read_text())
    cfg["files"].update(a="../victim.txt", b=str(victims[1]), c="../other/ema-0000001.safetensors",
                        state=link.name, d={"nested": 1})
    (d / CONFIG).write_text(json.dumps(cfg))
    write(d, step=2)  # what every save (and so `train --resume`) does
    assert all(v.read_text() == "keep me" for v in victims)
    assert (other / "ema-0000001.safetensors").is_file()
    assert not (d / "ema-0000001.safetensors").exists()  # its own old file is replaced
    assert read_checkpoint(d).tensors("ema")["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/ema-0000001.safetensors",
                                  "ema-0000001.safetensors/../../x", 7, None])
def test_reading_refuses_names_that_leave_the_folder(tmp_path, name):
    d = write(tmp_path / "ckpt")
    write(tmp_path / "other")
    cfg = json.loads((d / CONFIG).read_text())
    cfg["files"]["ema"] = name
    (d / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a checkpoint file name|must be an object of "
                       "file names"):
        read_checkpoint(d).tensors("ema")


def test_fifos_and_links_are_refused_without_hanging(tmp_path, guidekit_cli):
    d = write(tmp_path / "ckpt")
    (d / "ema-0000001.safetensors").unlink()
    os.mkfifo(d / "ema-0000001.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint(d).tensors("ema")
    (d / "ema-0000001.safetensors").unlink()
    (d / "ema-0000001.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint(d).tensors("ema")
    (d / CONFIG).unlink()
    os.mkfifo(d / CONFIG)
    result = guidekit_cli("sample", "--checkpoint", d, "--out", tmp_path / "s.png")
    assert result.code == 2 and "not a regular file" in result.err
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["[1, 2]", '{"kind": 3, "files": {}}', '{"kind": "ddpm", '
                                  '"files": ["ema"]}', "[" * 100_000])
def test_configs_of_the_wrong_shape_are_one_line(tmp_path, guidekit_cli, text):
    d = write(tmp_path / "ckpt")
    (d / CONFIG).write_text(text)
    result = guidekit_cli("sample", "--checkpoint", d, "--out", tmp_path / "s.png")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1


def test_a_flipped_byte_fails_the_hash_check(tmp_path):
    d = write(tmp_path / "ckpt")
    path = d / "ema-0000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a bit of the tensor data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 config.json records"):
        read_checkpoint(d).tensors("ema")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float16])
def test_weights_of_another_dtype_are_refused(tmp_path, dtype):
    d = save_checkpoint(tmp_path / "c", {"kind": "ddpm"},
                        {"ema": {"weight": torch.ones(2, 2, dtype=dtype), "bias": torch.ones(2,
                                 dtype=dtype)}}, 1)
    with pytest.raises(CheckpointError, match=f"'(weight|bias)' is {dtype} in the file but "
                       "torch.float32 in the model"):
        load_weights(torch.nn.Linear(2, 2), read_checkpoint(d).tensors("ema"), str(d))


@pytest.mark.parametrize(("edit", "message"), [
    ({"format": 999}, "has format 999, which this guidekit .* cannot read"),
    ({"format": "2"}, "'format' must be an integer"),
    ({"step": -3}, "'step' must be a non-negative integer"),
    ({"hashes": {}}, "'hashes' must give one SHA-256 per file"),
    ({"hashes": {"ema": "../x"}}, "'hashes' must give one SHA-256 per file"),
])
def test_the_fields_every_checkpoint_has_are_checked(tmp_path, edit, message):
    d = write(tmp_path / "ckpt")
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(d)


def test_nan_is_never_saved_and_the_old_checkpoint_stays(tmp_path):
    d = write(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not saving step 2: 'ema' tensor 'w' holds NaN"):
        save_checkpoint(d, {"kind": "ddpm"}, {"ema": {"w": torch.tensor([1.0, float("nan")])}},
                        2)
    ck = read_checkpoint(d)
    assert ck.step == 1 and ck.tensors("ema")["w"].tolist() == [1.0, 1.0]


def test_a_save_cleans_up_what_killed_saves_left_and_nothing_else(tmp_path):
    d = write(tmp_path / "ckpt")
    left = [d / ".ema-0000002.safetensors.abc123_x.tmp", d / ".config.json.q1w2e3r4.tmp",
            d / "ema-0000002.safetensors", d / "state-0000002.safetensors"]
    kept = [d / "notes.txt", d / ".samples.png.abcd1234.tmp", d / "metrics.jsonl",
            d / "ema-2.safetensors"]
    for p in left + kept:
        p.write_bytes(b"x")
    outside = tmp_path / "ema-0000009.safetensors"
    outside.write_bytes(b"keep")
    (d / "model-0000009.safetensors").symlink_to(outside)  # a link is never unlinked
    write(d, step=3)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept) and outside.read_bytes() == b"keep"
    assert (d / "model-0000009.safetensors").is_symlink()
    assert read_checkpoint(d).tensors("ema")["w"].tolist() == [1.0, 1.0]


def test_a_reader_racing_a_save_reads_one_whole_step(tmp_path, monkeypatch):
    d = write(tmp_path / "ckpt")
    real = ckpt_mod._read_config
    calls = []

    def racing(path):
        cfg = real(path)
        calls.append(cfg["step"])
        if len(calls) == 1:  # a save replaces step 1 (and deletes its files) right after
            save_checkpoint(d, {"kind": "ddpm"}, {"ema": {"w": torch.full((2,), 2.0)}}, 2)
        return cfg

    monkeypatch.setattr(ckpt_mod, "_read_config", racing)
    ck = read_checkpoint(d)
    assert calls[0] == 1 and ck.step == 2  # it saw step 1 vanish and read step 2 whole
    assert ck.tensors("ema")["w"].tolist() == [2.0, 2.0]
    monkeypatch.setattr(ckpt_mod, "_read_config", real)
    # once read, a checkpoint stays its step: its files were opened together
    save_checkpoint(d, {"kind": "ddpm"}, {"ema": {"w": torch.full((2,), 3.0)}}, 3)
    assert not (d / "ema-0000002.safetensors").exists()
    assert ck.tensors("ema")["w"].tolist() == [2.0, 2.0]


def test_the_writer_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path,
                                                                          lock_holder):
    d = write(tmp_path / "ckpt")
    with lock_holder(d), pytest.raises(CheckpointError, match="in use by another guidekit"):
        write(d, step=2)
    write(d, step=2)
    assert read_checkpoint(d).step == 2


def test_a_closed_checkpoint_never_closes_a_reused_fd(tmp_path):
    import gc

    d = write(tmp_path / "ckpt")
    ck = read_checkpoint(d)
    ck.close()
    other = os.open(tmp_path / "ckpt" / CONFIG, os.O_RDONLY)  # likely the number just freed
    try:
        del ck
        gc.collect()  # the finalizer runs here
        assert os.fstat(other)  # still open: not closed a second time
    finally:
        os.close(other)
    ck = read_checkpoint(d)
    ck.close()
    assert ck.tensors("ema")["w"].tolist() == [1.0, 1.0]  # a closed checkpoint reopens
