"""Hostile and mistaken inputs: each ends in one `error: …` line and exit status 2 (never a
traceback), or is handled correctly."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import guidekit.memory
from guidekit.cli.params import echo_json, json_safe, report
from guidekit.data import MAX_IMAGE_SIZE, _load_one, load_image_folder, save_image_grid
from guidekit.ddpm import load_dpm
from guidekit.errors import GuidekitError, Interrupted
from guidekit.sampling import GuidanceRequest, sample
from guidekit.specs import StepReport
from guidekit.testing import assert_one_line_error, run_cli

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file modes


def _sample(capsys, dpm: Path, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "sample", "--checkpoint", str(dpm), "--steps", "2", "--n", "2",
                   "--out", str(tmp_path / "g.png"), *args)


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as every other JSON parser does."""
    def refuse(name: str):
        raise AssertionError(f"{name} in JSON output: {text}")
    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- sample numbers


@pytest.mark.parametrize(("args", "needles"), [
    (("--n", str(10**12)), ("--n 1000000000000", "lower --n")),
    (("--n", "0"), ("--n must be",)),
    (("--n", "-1"), ("--n must be",)),
    (("--seed", str(2**64)), ("--seed", "2**63")),
    (("--seed", str(2**63)), ("--seed",)),
    (("--seed", "-1"), ("--seed",)),
    (("--steps", "0"), ("--steps",)),
    (("--steps", str(10**12)), ("1000000000000", "choose 1..")),
    (("--eta", "nan"), ("--eta", "finite")),
    (("--eta", "inf"), ("--eta", "finite")),
    (("--eta", "-0.5"), ("--eta must be >= 0",)),
    (("--nrow", "0"), ("--nrow must be >= 1",)),
    (("--nrow", "-3"), ("--nrow must be >= 1",)),
    (("--respacing", ""), ("--respacing is empty",)),
    (("--spacing", ""), ("--spacing is empty",)),
    (("--device", ""), ("--device is empty",)),
    (("--device", "bogus"), ("unknown device 'bogus'", "cpu")),
])
def test_sample_bad_numbers(guidekit_dpm, tmp_path, capsys, args, needles):
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, *args)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["sample", "train"])
def test_cuda_without_cuda(guidekit_dpm, tmp_path, capsys, command):
    if command == "sample":
        code, _, err = _sample(capsys, guidekit_dpm, tmp_path, "--device", "cuda")
    else:
        code, _, err = run_cli(capsys, "train", "ddpm", "--device", "cuda", "--out",
                               str(tmp_path / "t"), "--steps", "1")
    assert_one_line_error(code, err, "no CUDA GPU", "--device cpu")


def test_largest_seed_is_accepted(guidekit_dpm, tmp_path, capsys):
    code, out, err = _sample(capsys, guidekit_dpm, tmp_path, "--seed", str(2**63 - 1),
                             "--json")
    assert code == 0, err
    assert _strict_json(out)["n"] == 2


@pytest.mark.parametrize(("args", "needles"), [
    (("--scale", "inf"), ("--scale", "finite")),
    (("--scale", "nan"), ("--scale", "finite")),
    (("--guidance-schedule", ""), ("--guidance-schedule", "empty", "snr:LO:HI")),
    (("--guidance-schedule", "   "), ("--guidance-schedule", "empty")),
    (("--guidance-schedule", "snr:nan:1"), ("'nan' is not a number",)),
    (("--guidance-schedule", "t:x:1"), ("'x' is not a number",)),
    (("--guidance-schedule", "t:5:1"), ("off at every timestep", "LO must be below HI")),
    (("--guidance-schedule", "t:1:2:3"), ("bad guidance schedule", "'t:LO:HI'")),
    (("--guidance-schedule", "constant:1"), ("bad guidance schedule",)),
])
def test_sample_bad_guidance_values(guidekit_dpm, tmp_path, capsys, args, needles):
    # checked before the guidance is built: the classifier path need not exist
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, "--guidance", "classifier",
                           "--classifier", str(tmp_path / "none"), *args)
    assert_one_line_error(code, err, *needles)


def test_library_sample_raises_the_same_errors(guidekit_dpm):
    dpm = load_dpm(guidekit_dpm)
    bad = [
        dict(n=10**12), dict(n=0), dict(n=True), dict(n=2, seed=-1), dict(n=2, seed=2**64),
        dict(n=2, eta=math.nan), dict(n=2, eta=-1.0), dict(n=2, steps=" "),
        dict(n=2, spacing=""),
        dict(n=2, guidance=[GuidanceRequest("classifier", math.inf)]),
        dict(n=2, guidance=[GuidanceRequest("classifier", 1.0, "")]),
    ]
    for kwargs in bad:
        with pytest.raises(GuidekitError):
            sample(dpm, **kwargs)


def test_n_is_bounded_by_memory(guidekit_dpm, monkeypatch):
    dpm = load_dpm(guidekit_dpm)
    per_image = 1 * 16 * 16 * 4 * 8  # C·H·W float32 × WORKING_COPIES
    monkeypatch.setattr(guidekit.memory, "available_bytes", lambda device: 100 * per_image)
    assert sample(dpm, 100, steps=2).shape == (100, 1, 16, 16)
    with pytest.raises(GuidekitError, match=r"--n 101 .* more than the .*lower --n"):
        sample(dpm, 101, steps=2)


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize(("flag", "make", "needles"), [
    ("--out", lambda t: t / "dir", ("is a folder", "samples.png")),
    ("--out", lambda t: t / "file.txt" / "a.png", ("file.txt is a file, not a folder",)),
    ("--out", lambda t: t / "file.txt" / "deeper" / "a.png", ("is a file, not a folder",)),
    ("--out-dir", lambda t: t / "file.txt", ("--out-dir", "is a file, not a folder")),
    ("--out-dir", lambda t: t / "file.txt" / "sub", ("--out-dir", "is a file, not a folder")),
])
def test_sample_bad_output_paths(guidekit_dpm, tmp_path, capsys, flag, make, needles):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, flag, str(make(tmp_path)))
    assert_one_line_error(code, err, flag, *needles)


@pytest.mark.skipif(ROOT, reason="root ignores file modes")
@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_sample_read_only_folder(guidekit_dpm, tmp_path, capsys, flag):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        target = ro / ("a.png" if flag == "--out" else "each")
        code, _, err = _sample(capsys, guidekit_dpm, tmp_path, flag, str(target))
    finally:
        ro.chmod(0o755)
    assert_one_line_error(code, err, flag, "permission denied", "writable folder")


@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_sample_unwritable_folder_as_the_os_says(guidekit_dpm, tmp_path, capsys, monkeypatch,
                                                 flag):
    # what a read-only folder looks like to a user who is not root, here for root too
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if Path(p) == locked else real_access(p, mode, **kw)))
    target = locked / ("a.png" if flag == "--out" else "each")
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, flag, str(target))
    assert_one_line_error(code, err, flag, "permission denied")


@pytest.mark.parametrize("under", [False, True])
def test_train_out_is_a_file(tmp_path, capsys, under):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "run" if under else tmp_path / "file.txt"
    code, _, err = run_cli(capsys, "train", "ddpm", "--out", str(out), "--steps", "1")
    assert_one_line_error(code, err, "--out", "is a file, not a folder")


def test_full_disk_keeps_the_old_grid(guidekit_dpm, tmp_path, capsys, monkeypatch):
    grid = tmp_path / "g.png"
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path)
    assert code == 0, err
    before = grid.read_bytes()

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, "--seed", "1")
    assert_one_line_error(code, err, "No space left on device", "free disk space")
    assert grid.read_bytes() == before  # written beside it, renamed only when whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def test_grid_written_atomically_as_png(tmp_path):
    path = save_image_grid(torch.zeros(4, 3, 8, 8), tmp_path / "grid.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left


@pytest.mark.parametrize(("exc", "needles"), [
    (PermissionError(errno.EACCES, "Permission denied", "/x/g.png"),
     ("Permission denied: /x/g.png", "permissions")),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x"), ("Is a directory: /x",)),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), ("Not a directory: /f/x",)),
    (OSError(errno.EROFS, "Read-only file system", "/ro/g.png"),
     ("Read-only file system: /ro/g.png", "write elsewhere")),
    (OSError(errno.EIO, "Input/output error"), ("Input/output error", "check the path")),
])
def test_os_errors_are_one_line(guidekit_dpm, tmp_path, capsys, monkeypatch, exc, needles):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr("guidekit.sampling.sample", fail)
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path)
    assert_one_line_error(code, err, *needles)


def test_interrupted_keeps_its_exit_status(guidekit_dpm, tmp_path, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        raise Interrupted("stopped by SIGTERM: nothing was written", exit_code=143)

    monkeypatch.setattr("guidekit.sampling.sample", stopped)
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path)
    assert code == 143
    assert err.strip() == "error: stopped by SIGTERM: nothing was written"


def test_ctrl_c_is_aborted_130(guidekit_dpm, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("guidekit.sampling.sample", ctrl_c)
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path)
    assert code == 130 and err.strip() == "aborted"


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("data", ["", "   "])
def test_empty_data_name(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)  # an empty name once meant "every image in here"
    save_image_grid(torch.zeros(1, 3, 8, 8), tmp_path / "stray.png")
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", data, "--out",
                           str(tmp_path / "t"), "--steps", "1")
    assert_one_line_error(code, err, "--data is empty", "digits", "folder of images")


@pytest.mark.parametrize("size", ["0", "-1", str(MAX_IMAGE_SIZE + 1), str(10**12)])
@pytest.mark.parametrize("data", ["digits", "shapes", "folder"])
def test_absurd_image_size(tmp_path, capsys, size, data):
    if data == "folder":
        save_image_grid(torch.zeros(1, 3, 8, 8), tmp_path / "imgs" / "a.png")
        data = str(tmp_path / "imgs")
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", data, "--image-size", size,
                           "--out", str(tmp_path / "t"), "--steps", "1")
    assert_one_line_error(code, err, "--image-size", str(MAX_IMAGE_SIZE))


def test_dataset_bounded_by_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guidekit.memory, "available_bytes", lambda device: 10**6)
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", "digits", "--image-size", "64",
                           "--out", str(tmp_path / "t"), "--steps", "1")
    assert_one_line_error(code, err, "digits train", "lower --image-size")


def _ramp16() -> np.ndarray:
    return (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_png_keeps_its_levels(tmp_path, mode):
    ramp = _ramp16()
    if mode == "I;16":
        im = Image.fromarray(ramp)
    else:
        im = Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes())
    assert im.mode == mode
    (tmp_path / "imgs").mkdir()
    im.save(tmp_path / "imgs" / "ramp.png")
    for channels in (1, 3):
        data = load_image_folder(tmp_path / "imgs", 16, channels=channels)
        levels = torch.unique(data.images[0, 0])
        assert len(levels) > 200, len(levels)
        assert float(levels.min()) == -1.0 and float(levels.max()) == 1.0


@pytest.mark.parametrize(("mode", "values"), [
    ("I", _ramp16().astype(np.int32)),  # 16-bit samples in a 32-bit mode
    ("I", _ramp16().astype(np.int32) * 1000 - 7),  # unknown range: stretched
    ("F", _ramp16().astype(np.float32) / 65535),  # [0, 1]
    ("F", _ramp16().astype(np.float32) / 257),  # 0..255
])
def test_wide_greyscale_modes_keep_their_levels(tmp_path, mode, values):
    path = tmp_path / "ramp.tif"
    Image.fromarray(values, mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    out = _load_one(path, 16, "L")
    assert len(np.unique(out)) > 200 and out.min() == 0 and out.max() == 255


# --------------------------------------------------------------------------- literal text


def test_error_text_is_literal(guidekit_dpm, tmp_path, capsys):
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, "--guidance", "classifier",
                           "--classifier", "x", "--guidance-schedule", "snr:a:b")
    assert_one_line_error(code, err, "snr:a:b")  # not "snr🅰b"
    code, _, err = _sample(capsys, guidekit_dpm, tmp_path, "--guidance", "[bold]x[/bold]")
    assert_one_line_error(code, err, "unknown guidance '[bold]x[/bold]'")


def test_usage_errors_are_one_literal_line(capsys):
    code, _, err = run_cli(capsys, "sample", "--n", ":a: [bold]x[/bold]")
    assert_one_line_error(code, err, "--n", "guidekit sample --help")
    assert not any(ord(c) >= 0x1F000 for c in err)  # no emoji from ':a:'
    if ":a:" in err:  # click echoes the value; typer >= 0.29 words it without the value
        assert "':a: [bold]x[/bold]'" in err


def test_report_prints_text_literally(capsys):
    report(StepReport("title :a: [red]r[/red]", tables={"t :a:": [
        {"[bold]k[/bold]": ":smile: [i]v[/i]"}]}, text="note :a:"), json_out=False)
    out = capsys.readouterr().out
    for text in ("title :a: [red]r[/red]", "t :a:", "[bold]k[/bold]", ":smile: [i]v[/i]",
                 "note :a:"):
        assert text in out


# --------------------------------------------------------------------------- JSON


def test_json_has_no_nan(capsys):
    report({"loss": math.nan, "curve": [1.0, math.inf, (-math.inf, 2)],
            "nested": {"gap": np.float32("nan"), "n": np.int64(3)}, "path": Path("a/b")},
           json_out=True)
    got = _strict_json(capsys.readouterr().out)
    assert got == {"loss": None, "curve": [1.0, None, [None, 2]],
                   "nested": {"gap": None, "n": 3}, "path": "a/b"}
    echo_json({"t": torch.tensor(float("inf"))}, indent=2)
    assert _strict_json(capsys.readouterr().out) == {"t": None}
    assert json_safe([1, "nan", True]) == [1, "nan", True]


@pytest.mark.parametrize("command", [("plugins", "--json"), ("sample",)])
def test_cli_json_is_strict(guidekit_dpm, tmp_path, capsys, command):
    if command[0] == "sample":
        code, out, err = _sample(capsys, guidekit_dpm, tmp_path, "--json")
    else:
        code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    _strict_json(out)


# --------------------------------------------------------------------------- other commands


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_quickstart_seed(tmp_path, capsys, seed):
    code, _, err = run_cli(capsys, "quickstart", "--fast", "--seed", seed, "--out",
                           str(tmp_path / "q"))
    assert_one_line_error(code, err, "--seed")
    assert not (tmp_path / "q").exists()


def test_quickstart_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(capsys, "quickstart", "--fast", "--out", str(tmp_path / "file.txt"))
    assert_one_line_error(code, err, "--out", "is a file, not a folder")


@pytest.mark.parametrize("args", [
    ("eval", "guidance", "--checkpoint", "c", "--classifier", "k", "--judge", "j"),
    ("pdae", "sample", "--pdae", "p", "--latent-dpm", "l"),
    ("pdae", "probe", "--pdae", "p"),
    ("inpaint", "evaluate", "--checkpoint", "c"),
])
def test_plugin_commands_check_the_seed(tmp_path, capsys, args):
    if args[0] == "inpaint" and importlib.util.find_spec("guidekit_inpaint") is None:
        pytest.skip("the example plugin guidekit-inpaint is not installed")
    code, _, err = run_cli(capsys, *args, "--seed", "-1")
    assert_one_line_error(code, err, "--seed")


def test_plugin_eval_refuses_an_empty_schedule(capsys):
    code, _, err = run_cli(capsys, "eval", "guidance", "--checkpoint", "c", "--classifier",
                           "k", "--judge", "j", "--guidance-schedule", "")
    assert_one_line_error(code, err, "--guidance-schedule", "empty")



def test_a_number_beyond_a_float_is_still_one_line(guidekit_dpm, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--out",
                           str(tmp_path / "s.png"), "--n", "9" * 400)
    assert_one_line_error(code, err, "needs about over a million TB")


def test_a_channel_mult_beyond_a_float_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "ddpm", "--out", str(tmp_path / "run"), "--steps",
                           "1", "--samples", "0", "--channel-mult", "9" * 400)
    assert_one_line_error(code, err, "channel_mult entries must be finite numbers")
