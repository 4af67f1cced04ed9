"""A checkpoint folder's config.json is data: the file names it lists are never followed out
of the folder, neither to read nor to delete, and nothing in it can make a read hang."""

from __future__ import annotations

import json
import os

import pytest
import torch

from guidekit.checkpoint import CONFIG, read_checkpoint, save_checkpoint
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
    with pytest.raises(CheckpointError, match="not a checkpoint file name|no 'ema' weights"):
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
