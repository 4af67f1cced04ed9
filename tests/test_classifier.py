"""Classifier guidance: the exact gradient, class assignment, training and loading the
classifier and the judge, sampling through the CLI, one-line errors, and that it steers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from guidekit_classifier.guidance import ClassifierGuidance
from guidekit_classifier.training import (
    ACCURACY_FILE,
    JUDGE_KIND,
    KIND,
    LoadedClassifier,
    accuracy_by_t,
    judge_accuracy,
    load_classifier,
    predict,
    random_shift,
    train_classifier,
    train_judge,
)
from torch import Tensor

from guidekit.data import ImageData
from guidekit.ddpm import load_dpm
from guidekit.errors import CheckpointError, GuidekitError
from guidekit.guidance import StepInput
from guidekit.lookup import load_dataset
from guidekit.plugins import get_registry
from guidekit.sampling import GuidanceRequest, class_labels, sample
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli
from guidekit.training import TrainConfig
from guidekit.unet import ClassifierConfig

TINY = dict(model_channels=8, channel_mult=(1, 2, 2), attention_resolutions=(), num_heads=1)


def tiny_config(data: ImageData) -> ClassifierConfig:
    return ClassifierConfig(image_size=data.image_size, in_channels=data.channels,
                            num_classes=data.num_classes, **TINY)


def train_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, lr=5e-3, ema_decay=0.9, log_every=steps,
                       save_every=steps)


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def tiny_clf(guidekit_dpm, digits, tmp_path_factory):
    """A tiny noisy classifier on the tiny DPM's schedule (T=100), trained enough to steer."""
    out = tmp_path_factory.mktemp("clf") / "classifier"
    summary = train_classifier(digits, out, dpm=guidekit_dpm, model=tiny_config(digits),
                               config=train_cfg(120), progress=False)
    return out, summary


@pytest.fixture(scope="module")
def tiny_judge(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("judge") / "judge"
    return out, train_judge(digits, out, model=tiny_config(digits), config=train_cfg(10),
                            progress=False)


def step_input(x: Tensor, t: int = 3) -> StepInput:
    b = x.shape[0]
    tt = torch.full((b,), t, dtype=torch.long)
    return StepInput(x_t=x, t=tt, k=tt, eps=torch.zeros_like(x), x0=x,
                     schedule=NoiseSchedule.from_config(ScheduleConfig(num_timesteps=10)),
                     model=lambda x, t: torch.zeros_like(x))


# --------------------------------------------------------------------------- the gradient


def test_gradient_is_exact_for_linear_softmax():
    # ∇_x log softmax(Wx + b)_y = W_y − Σ_k p_k W_k, per sample, each with its own class
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    x = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 2, 0])
    seen_t = []

    def clf(x: Tensor, t: Tensor) -> Tensor:
        seen_t.append(t)
        return x @ W.T + b

    with torch.no_grad():  # the sampling loop runs without autograd
        g = ClassifierGuidance(clf, y)(step_input(x, t=7))
    p = torch.softmax(x @ W.T + b, -1)
    torch.testing.assert_close(g, W[y] - p @ W)
    assert not g.requires_grad and torch.equal(seen_t[0], torch.full((6,), 7))


def test_gradient_keeps_image_shape():
    W = torch.randn(10, 16 * 16)
    x = torch.randn(5, 1, 16, 16)
    y = torch.tensor([1, 2, 3, 4, 5])
    g = ClassifierGuidance(lambda x, t: x.flatten(1) @ W.T, y)(step_input(x))
    p = torch.softmax(x.flatten(1) @ W.T, -1)
    torch.testing.assert_close(g, (W[y] - p @ W).reshape(5, 1, 16, 16))
    with pytest.raises(GuidekitError, match="built for 5 samples"):
        ClassifierGuidance(lambda x, t: x.flatten(1) @ W.T, y)(step_input(x[:2]))


# --------------------------------------------------------------------------- classes


def test_class_labels_assignments():
    assert class_labels(4, 10, [3], False).tolist() == [3, 3, 3, 3]
    assert class_labels(6, 10, [1, 2], False).tolist() == [1, 2, 1, 2, 1, 2]
    assert class_labels(3, 10, [7, 0, 9], False).tolist() == [7, 0, 9]
    assert class_labels(20, 10, None, True).tolist() == [c for c in range(10) for _ in range(2)]
    assert class_labels(3, 3, (), True).dtype == torch.long


@pytest.mark.parametrize("args, message", [
    ((8, 10, [12], False, "the classifier"),
     "class 12 is out of range: the classifier knows classes 0..9"),
    ((8, 10, [-1], False), "class -1 is out of range"),
    ((15, 10, None, True), "multiple of the 10 classes, got --n 15"),
    ((8, 10, [1, 2, 3], False), "3 classes do not divide the 8 samples"),
    ((8, 10, None, False), "--class N (repeatable) or --class-per-row"),
    ((10, 10, [1], True), "not both"),
])
def test_class_labels_errors(args, message):
    with pytest.raises(GuidekitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        class_labels(*args)


# --------------------------------------------------------------------------- training


def test_random_shift_moves_whole_images_by_at_most_one_pixel():
    x = torch.randn(32, 2, 6, 6)
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    shifts = {(dy, dx) for dy in range(3) for dx in range(3)}
    found = set()
    for i in range(32):
        match = [s for s in shifts if torch.equal(out[i], padded[i, :, s[0]:s[0] + 6,
                                                                  s[1]:s[1] + 6])]
        assert match, i
        found.add(match[0])
    assert len(found) > 3  # several offsets occur


def test_classifier_checkpoint(tiny_clf, guidekit_dpm):
    out, summary = tiny_clf
    clf = load_classifier(out)
    assert isinstance(clf, LoadedClassifier) and clf.config["kind"] == KIND
    assert (clf.num_classes, clf.image_shape) == (10, (1, 16, 16))
    assert clf.schedule == ScheduleConfig(num_timesteps=100)
    assert clf.config["model"]["name"] == "encoder_unet"
    assert clf.config["data"] == {"name": "digits", "image_size": 16, "channels": 1,
                                  "num_classes": 10}
    assert not any(p.requires_grad for p in clf.model.parameters()) and not clf.model.training
    rows = summary["accuracy_by_t"]
    assert json.loads((out / ACCURACY_FILE).read_text()) == rows
    assert [(r["t_from"], r["t_to"]) for r in rows] == [(10 * i, 10 * i + 10) for i in range(10)]
    assert all(r["n"] == 297 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["accuracy"] > 0.2  # 120 tiny steps: above chance (0.1) at small t
    assert accuracy_by_t(clf, load_dataset("digits", "test"), buckets=4)[-1]["t_to"] == 100


def test_judge_checkpoint_and_kinds(tiny_judge, tiny_clf, guidekit_dpm):
    out, summary = tiny_judge
    judge = load_classifier(out, JUDGE_KIND)
    assert judge.schedule is None and judge.config["kind"] == JUDGE_KIND
    assert summary["test_accuracy"] == judge_accuracy(judge, load_dataset("digits", "test"))
    assert predict(judge, torch.zeros(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(CheckpointError, match="is a 'ddpm' checkpoint"):
        load_classifier(guidekit_dpm)
    with pytest.raises(CheckpointError, match="is a 'judge' checkpoint"):
        load_classifier(out)
    with pytest.raises(CheckpointError, match="is a 'classifier' checkpoint"):
        load_classifier(tiny_clf[0], JUDGE_KIND)
    with pytest.raises(GuidekitError, match="not a judge"):
        accuracy_by_t(judge, load_dataset("digits", "test"))


def test_train_errors(digits, guidekit_dpm, tmp_path):
    unlabelled = ImageData("pics", digits.images[:8], None, 0)
    with pytest.raises(GuidekitError, match="no class labels"):
        train_judge(unlabelled, tmp_path / "j", config=train_cfg(1), progress=False)
    small = load_dataset("digits", "train", image_size=8)
    with pytest.raises(GuidekitError, match="1x16px images but 'digits' has 1x8px"):
        train_classifier(small, tmp_path / "c", dpm=guidekit_dpm, config=train_cfg(1),
                         progress=False)
    with pytest.raises(GuidekitError, match="T=100.*not linear T=1000"):
        train_classifier(digits, tmp_path / "c", dpm=guidekit_dpm, schedule=ScheduleConfig(),
                         config=train_cfg(1), progress=False)


def test_train_cli_json(guidekit_dpm, tmp_path, capsys):
    tiny = ["--steps", "2", "--batch-size", "8", "--model-channels", "8", "--channel-mult",
            "1,2", "--num-heads", "1", "--json"]
    code, out, err = run_cli(capsys, "train", "classifier", "--dpm", str(guidekit_dpm), "--out",
                         str(tmp_path / "c"), *tiny)
    assert code == 0, err
    res = json.loads(out)
    assert res["steps"] == 2 and len(res["accuracy_by_t"]) == 10
    assert (tmp_path / "c" / ACCURACY_FILE).exists()
    code, out, err = run_cli(capsys, "train", "judge", "--out", str(tmp_path / "j"), *tiny)
    assert code == 0, err
    assert 0 <= json.loads(out)["test_accuracy"] <= 1
    code, _, err = run_cli(capsys, "train", "classifier", "--dpm", str(guidekit_dpm), "--timesteps",
                       "100", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "drop --schedule/--timesteps")
    code, _, err = run_cli(capsys, "train", "judge", "--out", str(tmp_path / "x"), "--bogus", "1")
    assert_one_line_error(code, err, "unexpected argument(s): --bogus 1")


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("args", [
    ["--sampler", "ddim", "--steps", "4", "--class", "3", "--scale", "4", "--n", "4"],
    ["--sampler", "ddpm", "--respacing", "5", "--class-per-row", "--n", "10", "--scale", "4"],
    ["--sampler", "ddim", "--respacing", "ddim5", "--class", "1", "--class", "2", "--n", "4",
     "--guidance-schedule", "snr:0.01:"],
])
def test_sample_cli_with_classifier_guidance(guidekit_dpm, tiny_clf, tmp_path, capsys, args):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--guidance",
                         "classifier", "--classifier", str(tiny_clf[0]), "--out",
                         str(tmp_path / "g.png"), "--json", *args)
    assert code == 0, err
    res = json.loads(out)
    assert (tmp_path / "g.png").exists() and res["std"] > 0


def data_subset(data: ImageData, n: int) -> ImageData:
    return ImageData(data.name, data.images[:n], data.labels[:n], data.num_classes)


def _train_variant(tmp_path, data: ImageData, schedule: ScheduleConfig, name: str):
    out = tmp_path / name
    train_classifier(data, out, schedule=schedule, model=tiny_config(data),
                     config=train_cfg(1), progress=False, test=data_subset(data, 8))
    return out


def test_mismatched_classifier_is_a_one_line_error(guidekit_dpm, digits, tmp_path, capsys):
    rgb = ImageData("rgb", torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 10, 10)
    small = load_dataset("digits", "train", image_size=8)
    cases = [
        (digits, ScheduleConfig(num_timesteps=50), ["linear T=50", "linear T=100", "--dpm"]),
        (digits, ScheduleConfig("cosine", 100), ["cosine T=100", "linear T=100"]),
        (small, ScheduleConfig(num_timesteps=100), ["takes 8px images", "16px"]),
        (rgb, ScheduleConfig(num_timesteps=100), ["3-channel", "1-channel"]),
    ]
    for i, (data, schedule, needles) in enumerate(cases):
        clf = _train_variant(tmp_path, data, schedule, f"clf{i}")
        code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "2",
                           "--guidance", "classifier", "--classifier", str(clf), "--class", "1",
                           "--out", str(tmp_path / "g.png"))
        assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("extra, needles", [
    (["--class", "12"], ["class 12 is out of range: the classifier knows classes 0..9"]),
    ([], ["--class N", "--class-per-row"]),
    (["--class-per-row", "--n", "15"], ["multiple of the 10 classes"]),
    (["--class", "1", "--classifier", "/nonexistent/clf"], ["no checkpoint at"]),
])
def test_bad_guidance_options_are_one_line_errors(guidekit_dpm, tiny_clf, tmp_path, capsys, extra,
                                                  needles):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "2",
                       "--guidance", "classifier", "--classifier", str(tiny_clf[0]), *extra,
                       "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, *needles)


def test_guidance_without_classifier_path(guidekit_dpm, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--guidance",
                       "classifier", "--class", "3", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "--guidance classifier needs --classifier PATH",
                   "guidekit train classifier")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--class", "3",
                       "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "this DPM is unconditional and no --guidance steers "
                          "toward --class")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_steers_toward_the_class(guidekit_dpm, tiny_clf, sampler):
    # The classifier's own mean log p(y | x_0) over samples drawn from the same noise rises
    # with the scale. (The tiny classifier is nearly flat, so the scales are large.)
    dpm, path = load_dpm(guidekit_dpm), str(tiny_clf[0])
    clf = load_classifier(path)
    n = 20
    y = class_labels(n, 10, None, True)

    def mean_log_p(scale: float) -> float:
        req = GuidanceRequest("classifier", scale, options={"classifier": path})
        x = sample(dpm, n, sampler=sampler, steps=10, seed=3, guidance=[req] if scale else [],
                   class_per_row=bool(scale))
        return float(predict(clf, x, 0)[torch.arange(n), y].log().mean())

    plain, mid, strong = (mean_log_p(s) for s in (0.0, 30.0, 100.0))
    assert plain < mid < strong and strong - plain > 0.02, (plain, mid, strong)


def test_plugin_registers_everything():
    reg = get_registry()
    assert reg.owners[("guidance", "classifier")] == "classifier"
    assert reg.owners[("model", "encoder_unet")] == "classifier"
    assert {"classifier", "judge"} <= set(reg.names("trainer"))
    assert {"classifier", "guidance"} <= set(reg.names("quickstart step"))


def test_quickstart_step_fast(guidekit_dpm, tmp_path):
    from guidekit_classifier import quickstart_classifier

    from guidekit.specs import QuickstartContext

    shutil.copytree(guidekit_dpm, tmp_path / "ddpm")
    report = quickstart_classifier(QuickstartContext(tmp_path, seed=0, fast=True,
                                                     progress=False))
    assert_grid_layout(tmp_path / "classifier" / "class_grid.png", 10, 8, 16 * 4 + 1,
                       row_labels=True)  # a labelled row per class
    assert load_classifier(tmp_path / "judge", JUDGE_KIND).num_classes == 10
    assert len(report.tables["noisy classifier: held-out accuracy by t"]) == 10
    assert 0 <= report.metrics["judge_test_accuracy"] <= 1
