"""The plugin as users meet it: `guidekit plugins`, `guidekit inpaint prepare|evaluate` and
`guidekit sample --guidance inpaint`, run in-process on guidekit's tiny DPM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from guidekit.lookup import load_dataset
from guidekit.testing import assert_grid_layout, assert_one_line_error
from PIL import Image

from guidekit_inpaint import named_mask


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean judge trained for two steps: it wires the agreement figures, it is no judge."""
    from guidekit.training import TrainConfig
    from guidekit_classifier.training import default_config, train_judge

    data = load_dataset("digits", "train")
    out = tmp_path_factory.mktemp("judge") / "judge"
    train_judge(data, out, model=default_config(data, model_channels=8),
                config=TrainConfig(steps=2, batch_size=16, save_every=2, log_every=1),
                progress=False)
    return out


@pytest.fixture
def cli(guidekit_plugins, guidekit_cli):
    """`guidekit` with the core, this plugin, and the classifier plugin (whose judge the
    evaluation loads)."""
    guidekit_plugins("inpaint", "classifier")
    return guidekit_cli


@pytest.fixture
def pair(cli, tmp_path: Path) -> Path:
    result = cli("inpaint", "prepare", "--index", "3", "--mask", "left", "--out", tmp_path / "in")
    assert result.code == 0, result.err
    return tmp_path / "in"


def test_plugins_lists_inpaint(guidekit_plugins, guidekit_cli) -> None:
    guidekit_plugins()  # every installed plugin, as a user's `guidekit plugins` sees them
    result = guidekit_cli("plugins", "--json")
    assert result.code == 0, result.err
    found = {p["name"]: p for p in json.loads(result.out)["plugins"]}
    assert found["inpaint"]["registers"] == {"guidance": ["inpaint"]}
    assert found["inpaint"]["module"] == "guidekit_inpaint"


def test_prepare_writes_a_test_digit_and_its_mask(cli, tmp_path: Path) -> None:
    result = cli("inpaint", "prepare", "--index", "5", "--mask", "top", "--out", tmp_path,
                 "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    test = load_dataset("digits", "test")
    assert info["label"] == int(test.labels[5])
    expected = ((test.images[5, 0].numpy() + 1) * 127.5).round()
    assert np.abs(pixels(info["image"]) - expected).max() <= 1
    assert np.array_equal(pixels(info["mask"]) > 127, named_mask("top", 16)[0, 0].numpy() > 0)


@pytest.mark.parametrize("sampler,steps", [("ddim", "4"), ("ddpm", "4")])
def test_zero_scale_is_the_unguided_sampler(cli, pair: Path, guidekit_dpm, tmp_path: Path,
                                            sampler: str, steps: str) -> None:
    common = ["sample", "--checkpoint", guidekit_dpm, "--sampler", sampler, "--steps", steps,
              "--n", "4", "--seed", "3"]
    guide = ["--guidance", "inpaint", "--image", pair / "image.png", "--mask", pair / "mask.png"]
    runs = {
        "plain": common + ["--out", tmp_path / "plain.png"],
        "zero": common + guide + ["--scale", "0", "--out", tmp_path / "zero.png"],
        "guided": common + guide + ["--out", tmp_path / "guided.png"],
    }
    for name, args in runs.items():
        result = cli(*args)
        assert result.code == 0, (name, result.err)
    plain = pixels(tmp_path / "plain.png")
    assert np.array_equal(pixels(tmp_path / "zero.png"), plain)
    assert not np.array_equal(pixels(tmp_path / "guided.png"), plain)


def test_a_named_mask_and_the_residual_norm(cli, pair: Path, guidekit_dpm,
                                            tmp_path: Path) -> None:
    """The one-liner with a named mask: the saved samples keep the reference's border."""
    reference = pixels(pair / "image.png") / 255
    known = named_mask("border", 16)[0, 0].numpy() > 0
    errors = {}
    for name, guide in {"plain": [], "guided": [
        "--guidance", "inpaint", "--image", pair / "image.png", "--mask", "border",
        "--inpaint-norm", "residual"]}.items():
        result = cli("sample", "--checkpoint", guidekit_dpm, "--steps", "4", "--n", "4",
                     "--clip-order", "guide-then-clip", *guide,
                     "--out", tmp_path / f"{name}.png", "--out-dir", tmp_path / name)
        assert result.code == 0, result.err
        images = [pixels(p) / 255 for p in sorted((tmp_path / name).glob("*.png"))]
        errors[name] = np.mean([((x - reference)[known] ** 2).mean() for x in images])
    assert errors["guided"] < 0.5 * errors["plain"], errors


def test_evaluate_reports_both_rows(cli, guidekit_dpm, tiny_judge: Path, tmp_path: Path) -> None:
    result = cli("inpaint", "evaluate", "--checkpoint", guidekit_dpm, "--judge", tiny_judge,
                 "--n", "6", "--steps", "4", "--mask", "bottom", "--inpaint-sigma", "0.1,0.5",
                 "--out-dir", tmp_path, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    rows = summary["rows"]
    assert [(r["guidance"], r["sigma"]) for r in rows] == [
        ("none", None), ("inpaint", 0.1), ("inpaint", 0.5)]
    for r in rows:
        assert 0 <= r["known_mse"] <= 1 and 0 <= r["fill_mse"] <= 1
        assert r["label_agreement"] in {i / 6 for i in range(7)}
    # the grid: reference, masked, unguided and two guided rows of 6 images, 64 px each, every
    # row labelled
    assert_grid_layout(summary["grid"], 5, 6, 65, row_labels=True)


def sample_args(dpm: Path, *extra: object) -> list[object]:
    return ["sample", "--checkpoint", dpm, "--steps", "2", "--n", "2", "--guidance", "inpaint",
            *extra]


@pytest.mark.parametrize("case,needles", [
    ("no image", ["--guidance inpaint needs --image IMG and --mask MASK", "prepare"]),
    ("missing image", ["--image", "missing.png does not exist"]),
    ("wide image", ["is 24x16 pixels", "square 16x16"]),
    ("mask of another size", ["--mask", "is 8x8 pixels but --image is 16x16"]),
    ("empty mask", ["no known (white) pixels"]),
    ("unknown mask", ["--mask 'half' is neither a PNG file nor a named mask"]),
    ("bad sigma", ["--inpaint-sigma must be > 0"]),
    ("bad norm", ["--inpaint-norm", "residual"]),
])
def test_sample_mistakes_are_one_line(cli, pair: Path, guidekit_dpm, tmp_path: Path,
                                      case: str, needles: list[str]) -> None:
    wide, small, black = tmp_path / "wide.png", tmp_path / "small.png", tmp_path / "black.png"
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(wide)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(small)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(black)
    image = pair / "image.png"
    extra = {
        "no image": ["--mask", "left"],
        "missing image": ["--image", tmp_path / "missing.png", "--mask", "left"],
        "wide image": ["--image", wide, "--mask", "left"],
        "mask of another size": ["--image", image, "--mask", small],
        "empty mask": ["--image", image, "--mask", black],
        "unknown mask": ["--image", image, "--mask", "half"],
        "bad sigma": ["--image", image, "--mask", "left", "--inpaint-sigma", "-1"],
        "bad norm": ["--image", image, "--mask", "left", "--inpaint-norm", "l1"],
    }[case]
    result = cli(*sample_args(guidekit_dpm, *extra), "--out", tmp_path / "s.png")
    assert_one_line_error(result.code, result.err, *needles)


@pytest.mark.parametrize("args,needles", [
    (["inpaint", "prepare", "--index", "297"], ["--index must be in 0..296"]),
    (["inpaint", "prepare", "--mask", "diagonal"], ["neither a PNG file nor a named mask"]),
    (["inpaint", "evaluate", "--inpaint-sigma", "0,x"], ["--inpaint-sigma must be positive"]),
    (["inpaint", "evaluate", "--start", "400"], ["--start must be in 0..296"]),
    (["inpaint", "evaluate", "--sampler", "euler"], ["unknown sampler 'euler'"]),
])
def test_command_mistakes_are_one_line(cli, guidekit_dpm, tmp_path: Path, args: list[str],
                                       needles: list[str]) -> None:
    if args[1] == "evaluate":
        args = [*args, "--checkpoint", guidekit_dpm, "--n", "1", "--steps", "1"]
    result = cli(*args, "--out" if args[1] == "prepare" else "--out-dir", tmp_path)
    assert_one_line_error(result.code, result.err, *needles)
