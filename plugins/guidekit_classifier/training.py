"""Training and loading the classifiers of classifier guidance.

Two kinds of checkpoint, both an :class:`~guidekit.unet.EncoderUNet`:

- ``classifier``: the noisy classifier p_φ(y | x_t, t) that guides sampling, trained on
  x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with t uniform over the whole schedule of the DPM it guides.
- ``judge``: a separate clean classifier (t = 0 only) that scores generated samples. Keeping
  it apart from the guide matters: a guide judging its own samples rewards adversarial
  gradients rather than images of the class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidekit import ops
from guidekit.checkpoint import atomic_write_bytes, load_module, read_checkpoint
from guidekit.config import config_field
from guidekit.data import ImageData
from guidekit.ddpm import KIND as DDPM_KIND
from guidekit.ddpm import data_meta
from guidekit.distributed import resolve_device
from guidekit.errors import GuidekitError
from guidekit.lookup import dataset_names, load_dataset, model_builder
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.training import TrainConfig, check_trainable, fit
from guidekit.unet import ClassifierConfig, EncoderUNet

KIND = "classifier"
JUDGE_KIND = "judge"
MODEL_NAME = "encoder_unet"
ACCURACY_FILE = "accuracy_by_t.json"
EVAL_BATCH = 500


def default_config(data: ImageData, **overrides: Any) -> ClassifierConfig:
    """A small classifier for ``data``: it runs forward and backward at every sampling step,
    so it is kept narrow (16 channels, no attention in the down path)."""
    fields: dict[str, Any] = dict(
        image_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes,
        model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
        num_heads=4,
    )
    fields.update(overrides)
    return ClassifierConfig(**fields)


class ClassifierTask:
    """Cross-entropy of p_φ(y | x_t, t), t ~ U{0..T−1}, x_t = q_sample(x_0, t, ε)."""

    kind = KIND

    def __init__(self, model: EncoderUNet, schedule: NoiseSchedule, data: ImageData) -> None:
        self.model = model
        self.schedule = schedule
        self.data_meta = data_meta(data)

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(
        self, nets: dict[str, nn.Module], x0: Tensor, labels: Tensor | None, gen: torch.Generator
    ) -> Tensor:
        tab = self.schedule.to(x0.device).tables
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=gen,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        logits = nets["model"](ops.q_sample(tab, x0, t, noise), t)
        return F.cross_entropy(logits.float(), _need_labels(labels))

    def config(self) -> dict[str, Any]:
        assert self.schedule.config is not None
        return {
            "model": {"name": MODEL_NAME, "config": self.model.config.to_dict()},
            "schedule": self.schedule.config.to_dict(),
            "data": self.data_meta,
        }


class JudgeTask:
    """Cross-entropy of a clean classifier (t = 0) with random ±``shift`` px translations, so
    it tolerates the small misalignments of generated digits."""

    kind = JUDGE_KIND

    def __init__(self, model: EncoderUNet, data: ImageData, shift: int = 1) -> None:
        self.model = model
        self.shift = shift
        self.data_meta = data_meta(data)

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(
        self, nets: dict[str, nn.Module], x0: Tensor, labels: Tensor | None, gen: torch.Generator
    ) -> Tensor:
        x = random_shift(x0, self.shift, gen)
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return F.cross_entropy(nets["model"](x, t).float(), _need_labels(labels))

    def config(self) -> dict[str, Any]:
        return {
            "model": {"name": MODEL_NAME, "config": self.model.config.to_dict()},
            "data": self.data_meta,
            "augment": {"shift": self.shift},
        }


def _need_labels(labels: Tensor | None) -> Tensor:
    if labels is None:  # train_* checks first; this guards direct use of the tasks
        raise GuidekitError("classifiers need labelled data")
    return labels


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by its own random integer offset in [−max_shift, max_shift]²,
    filling with the edge value (background for digits)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    dy, dx = torch.randint(0, 2 * m + 1, (2, b), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedClassifier:
    """A trained classifier or judge, frozen, in eval mode."""

    model: EncoderUNet
    config: dict[str, Any]  # the checkpoint's config.json
    num_classes: int
    image_shape: tuple[int, int, int]
    schedule: ScheduleConfig | None  # None for judges
    path: Path | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.model(x, t)


def load_classifier(
    path: str | Path, kind: str = KIND, device: str | torch.device = "cpu"
) -> LoadedClassifier:
    """Load a ``classifier`` (or, with ``kind=JUDGE_KIND``, a ``judge``) checkpoint's EMA
    weights on ``device`` (``auto``: a GPU when there is one); wrong kinds, missing paths and
    mismatched weights are one-line errors."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path, kind)
    with ckpt.reading():
        build = model_builder(ckpt.section("model"))
    model = load_module(ckpt, "ema", "model", build)
    ckpt.close()
    if not isinstance(model, EncoderUNet):
        raise GuidekitError(f"{path} holds a '{ckpt.config['model']['name']}' network, "
                            "not a classifier")
    model.to(device).eval().requires_grad_(False)
    cfg = model.config
    sched = ckpt.config.get("schedule")
    return LoadedClassifier(
        model=model,
        config=ckpt.config,
        num_classes=cfg.num_classes,
        image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        schedule=ScheduleConfig.from_dict(sched) if sched is not None else None,
        path=Path(path),
    )


def _schedule_text(s: ScheduleConfig) -> str:
    betas = f" β {s.beta_start:g}..{s.beta_end:g}" if s.kind == "linear" else ""
    return f"{s.kind} T={s.num_timesteps}{betas}"


def _same_schedule(a: ScheduleConfig, b: ScheduleConfig) -> bool:
    if (a.kind, a.num_timesteps) != (b.kind, b.num_timesteps):
        return False
    # The cosine schedule ignores beta_start/beta_end.
    return a.kind != "linear" or (a.beta_start, a.beta_end) == (b.beta_start, b.beta_end)


def check_compatible(clf: LoadedClassifier, dpm_config: dict[str, Any]) -> None:
    """Raise a one-line error when ``clf`` was trained for another schedule, image size or
    number of channels than the DPM whose config.json is ``dpm_config``."""
    where = f" ({clf.path})" if clf.path else ""
    fix = "retrain it with `guidekit train classifier --dpm DPM_CHECKPOINT`"
    if clf.schedule is not None:
        dpm_sched = ScheduleConfig.from_dict(dpm_config["schedule"])
        if not _same_schedule(clf.schedule, dpm_sched):
            raise GuidekitError(
                f"the classifier{where} was trained for the {_schedule_text(clf.schedule)} "
                f"schedule but the DPM uses {_schedule_text(dpm_sched)}: {fix}"
            )
    c, h, _ = clf.image_shape
    d = dpm_config["data"]
    if h != d["image_size"]:
        raise GuidekitError(f"the classifier{where} takes {h}px images but the DPM makes "
                            f"{d['image_size']}px ones: {fix}")
    if c != d["channels"]:
        raise GuidekitError(f"the classifier{where} takes {c}-channel images but the DPM makes "
                            f"{d['channels']}-channel ones: {fix}")


# --------------------------------------------------------------------------- training


def _model_for(data: ImageData, model: ClassifierConfig | None) -> ClassifierConfig:
    """``model`` (default: :func:`default_config`), checked against labelled ``data``."""
    if data.labels is None or data.num_classes < 2:
        raise GuidekitError(f"dataset '{data.name}' has no class labels: classifiers need "
                            "labelled data (e.g. --data digits)")
    model = model or default_config(data)
    if (model.image_size, model.in_channels) != (data.image_size, data.channels):
        raise GuidekitError(
            f"the classifier is configured for {model.in_channels}x{model.image_size}px images "
            f"but '{data.name}' has {data.channels}x{data.image_size}px"
        )
    if model.num_classes != data.num_classes:
        raise GuidekitError(f"the classifier is configured for {model.num_classes} classes but "
                            f"'{data.name}' has {data.num_classes}")
    return model


def _held_out(data: ImageData, test: ImageData | None) -> ImageData | None:
    """The test split of a registered dataset (None when there is none to load)."""
    if test is not None:
        return test
    if data.name in dataset_names():
        return load_dataset(data.name, "test", data.image_size)
    return None


def _schedule_from_dpm(
    dpm: str | Path, schedule: ScheduleConfig | None, data: ImageData
) -> ScheduleConfig:
    ckpt = read_checkpoint(dpm, DDPM_KIND)
    with ckpt.reading():
        sched = ScheduleConfig.from_dict(ckpt.section("schedule"))
        d = {k: config_field(ckpt.section("data"), k, (int,), "'data'")
             for k in ("image_size", "channels")}
    if schedule is not None and not _same_schedule(schedule, sched):
        raise GuidekitError(f"the DPM at {dpm} uses the {_schedule_text(sched)} schedule, not "
                            f"{_schedule_text(schedule)}: drop --schedule/--timesteps or --dpm")
    if (d["image_size"], d["channels"]) != (data.image_size, data.channels):
        raise GuidekitError(
            f"the DPM at {dpm} makes {d['channels']}x{d['image_size']}px images but "
            f"'{data.name}' has {data.channels}x{data.image_size}px: use the DPM's data "
            "(or --image-size)"
        )
    return sched


def _summary(result: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(result.checkpoint),
        "steps": result.step,
        "final_loss": result.loss,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
    }


def train_classifier(
    data: ImageData,
    out: str | Path,
    *,
    dpm: str | Path | None = None,
    schedule: ScheduleConfig | None = None,
    model: ClassifierConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    test: ImageData | None = None,
) -> dict[str, Any]:
    """Train the noisy classifier on ``data`` into checkpoint ``out``.

    The schedule comes from the DPM checkpoint ``dpm`` when given (else ``schedule``, else
    linear T=1000). Returns a summary with the held-out accuracy by t bucket (on ``test``,
    by default the dataset's test split), also written to ``out/accuracy_by_t.json``.
    """
    out = Path(out)
    config = config or TrainConfig()
    model = _model_for(data, model)
    sched_cfg = _schedule_from_dpm(dpm, schedule, data) if dpm else schedule or ScheduleConfig()
    check_trainable(lambda: EncoderUNet(model), config,
                    f"a classifier of --model-channels {model.model_channels}",
                    "lower --model-channels, --channel-mult or --num-res-blocks")
    torch.manual_seed(config.seed)  # the initial weights
    task = ClassifierTask(EncoderUNet(model), NoiseSchedule.from_config(sched_cfg), data)
    result = fit(task, data, out, config, resume=resume, progress=progress)
    summary = _summary(result)
    held_out = _held_out(data, test)
    if result.is_main and held_out is not None:
        clf = load_classifier(out, KIND, next(task.model.parameters()).device)
        rows = accuracy_by_t(clf, held_out, seed=config.seed)
        summary["accuracy_by_t"] = rows
        atomic_write_bytes(out / ACCURACY_FILE, json.dumps(rows, indent=2).encode())
    return summary


def train_judge(
    data: ImageData,
    out: str | Path,
    *,
    model: ClassifierConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    test: ImageData | None = None,
) -> dict[str, Any]:
    """Train the clean judge classifier on ``data`` into checkpoint ``out``.

    Returns a summary with ``test_accuracy`` on ``test`` (by default the test split).
    """
    out = Path(out)
    config = config or TrainConfig()
    model = _model_for(data, model)
    check_trainable(lambda: EncoderUNet(model), config,
                    f"a classifier of --model-channels {model.model_channels}",
                    "lower --model-channels, --channel-mult or --num-res-blocks")
    torch.manual_seed(config.seed)
    task = JudgeTask(EncoderUNet(model), data)
    result = fit(task, data, out, config, resume=resume, progress=progress)
    summary = _summary(result)
    held_out = _held_out(data, test)
    if result.is_main and held_out is not None:
        judge = load_classifier(out, JUDGE_KIND, next(task.model.parameters()).device)
        summary["test_accuracy"] = judge_accuracy(judge, held_out)
    return summary


# --------------------------------------------------------------------------- evaluation


def _device(clf: LoadedClassifier) -> torch.device:
    return next(clf.model.parameters()).device


@torch.no_grad()
def predict(clf: LoadedClassifier, x: Tensor, t: Tensor | int = 0) -> Tensor:
    """Class probabilities (N, num_classes) of images ``x`` at timesteps ``t``, batched."""
    dev = _device(clf)
    t = torch.as_tensor(t, dtype=torch.long).expand(x.shape[0])
    probs = []
    for i in range(0, x.shape[0], EVAL_BATCH):
        logits = clf.model(x[i : i + EVAL_BATCH].to(dev), t[i : i + EVAL_BATCH].to(dev))
        probs.append(torch.softmax(logits.float(), -1).cpu())
    return torch.cat(probs)


def _labels(data: ImageData, clf: LoadedClassifier) -> Tensor:
    if data.labels is None:
        raise GuidekitError(f"dataset '{data.name}' has no labels to score a classifier on")
    if tuple(data.images.shape[1:]) != clf.image_shape:
        raise GuidekitError(f"the classifier takes {clf.image_shape} images but "
                            f"'{data.name}' has {tuple(data.images.shape[1:])}")
    return data.labels


@torch.no_grad()
def accuracy_by_t(
    clf: LoadedClassifier, data: ImageData, buckets: int = 10, seed: int = 0
) -> list[dict[str, Any]]:
    """Accuracy of a noisy classifier on held-out ``data`` per t bucket [t_from, t_to).

    Every image is noised once per bucket with fresh noise, the timesteps spread evenly
    through the bucket. Rows: ``{"t_from", "t_to", "accuracy", "n"}``.
    """
    if clf.schedule is None:
        raise GuidekitError("accuracy_by_t needs a noisy classifier, not a judge")
    labels = _labels(data, clf)
    T = clf.schedule.num_timesteps
    buckets = max(1, min(buckets, T))
    tab = NoiseSchedule.from_config(clf.schedule).tables
    edges = torch.linspace(0, T, buckets + 1).round().long().tolist()
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        # evenly spread t, shuffled so no image is tied to one end of the bucket
        t = lo + (torch.arange(n) * (hi - lo)) // n
        t = t[torch.randperm(n, generator=gen)]
        noise = torch.randn(data.images.shape, generator=gen)
        x_t = ops.q_sample(tab, data.images, t, noise)
        correct = (predict(clf, x_t, t).argmax(-1) == labels).float().mean()
        rows.append({"t_from": lo, "t_to": hi, "accuracy": round(float(correct), 4), "n": n})
    return rows


def judge_accuracy(judge: LoadedClassifier, data: ImageData) -> float:
    """Accuracy of a judge (t = 0) on clean images ``data``."""
    labels = _labels(data, judge)
    return float((predict(judge, data.images, 0).argmax(-1) == labels).float().mean())
