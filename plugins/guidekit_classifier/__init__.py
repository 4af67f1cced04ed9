"""Classifier guidance (Dhariwal & Nichol 2021) as a guidekit plugin.

Registers the ``encoder_unet`` model, ``guidekit train classifier`` (the noisy classifier that
guides) and ``guidekit train judge`` (a separate clean classifier that scores samples), the
``classifier`` guidance of ``guidekit sample``, ``guidekit eval``, and two quickstart steps.

The same from Python (``__all__``)::

    from guidekit_classifier import (evaluate_guidance, load_classifier, train_classifier,
                                     train_judge)

    train_classifier(data, "runs/clf", dpm="runs/ddpm")       # guidekit train classifier
    train_judge(data, "runs/judge")                            # guidekit train judge
    clf, judge = load_classifier("runs/clf"), load_classifier("runs/judge", "judge")
    evaluate_guidance(dpm, clf, judge, [0, 4, 8])              # guidekit eval guidance
    evaluate_guidance_stages(dpm, clf, judge, 8, real)         # ... eval guidance --stages
    evaluate_stages(dpm, judge, x0, labels)                    # guidekit eval stages
    evaluate_samples(dpm, judge, 256)                          # guidekit eval samples

Guided sampling is ``guidekit.sample`` with ``GuidanceRequest("classifier", scale,
options={"classifier": "runs/clf"}), classes=[3])``, or :class:`ClassifierGuidance` in a
``guidekit.GuidanceTerm`` for a ``guidekit.Sampler``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidekit import trainer_options as opt
from guidekit.errors import GuidekitError
from guidekit.hookspecs import hookimpl
from guidekit.lookup import load_dataset
from guidekit.options import Option
from guidekit.specs import (
    GuidanceSpec,
    Lazy,
    ModelSpec,
    QuickstartContext,
    QuickstartStep,
    StepReport,
    TrainerContext,
    TrainerSpec,
    lazy_exports,
)

__version__ = "0.1.0"

__all__ = [
    "ClassifierGuidance",
    "LoadedClassifier",
    "accuracy_by_t",
    "best_grid",
    "default_config",
    "density_coverage",
    "evaluate_guidance",
    "evaluate_guidance_stages",
    "evaluate_samples",
    "evaluate_stages",
    "frechet_distance",
    "inception_fid",
    "judge_accuracy",
    "judge_features",
    "load_classifier",
    "plot_sweep",
    "precision_recall",
    "predict",
    "reference_images",
    "sample_quality",
    "train_classifier",
    "train_judge",
]

# The names the hooks register, as .training spells them (KIND, JUDGE_KIND, MODEL_NAME):
# written here so that registering needs no torch (tests/test_cli_startup.py holds them equal).
KIND = "classifier"
JUDGE_KIND = "judge"
MODEL_NAME = "encoder_unet"

# Every module but this one loads on first use, as the ``eval`` commands do: torch loads on
# first use (`guidekit --help` must not import it), and a broken evaluate module must not
# stop the plugin from loading.
_LAZY = {
    "guidance": ("ClassifierGuidance", "build_classifier_guidance", "guidance_options"),
    "training": ("LoadedClassifier", "accuracy_by_t", "default_config", "judge_accuracy",
                 "load_classifier", "predict", "train_classifier", "train_judge"),
    "evaluate": ("best_grid", "evaluate_guidance", "plot_sweep"),
    "quality": ("density_coverage", "evaluate_samples", "frechet_distance", "judge_features",
                "precision_recall", "reference_images", "sample_quality"),
    "fid": ("inception_fid",),
    "stages": ("evaluate_guidance_stages", "evaluate_stages"),
}
if TYPE_CHECKING:
    from guidekit.training import TrainConfig
    from guidekit.unet import ClassifierConfig

    from .evaluate import best_grid, evaluate_guidance, plot_sweep
    from .fid import inception_fid
    from .guidance import ClassifierGuidance
    from .quality import (
        density_coverage,
        evaluate_samples,
        frechet_distance,
        judge_features,
        precision_recall,
        reference_images,
        sample_quality,
    )
    from .stages import evaluate_guidance_stages, evaluate_stages
    from .training import (
        LoadedClassifier,
        accuracy_by_t,
        default_config,
        judge_accuracy,
        load_classifier,
        predict,
        train_classifier,
        train_judge,
    )


__getattr__ = lazy_exports(__name__, _LAZY)


# --------------------------------------------------------------------------- trainers


def _model_config(data: Any, o: dict[str, Any]) -> ClassifierConfig:
    """The encoder UNet of a trainer's width/depth/attention option values."""
    from .training import default_config

    return default_config(
        data, model_channels=o["model_channels"],
        channel_mult=opt.parse_ints(o["channel_mult"], "--channel-mult"),
        num_res_blocks=o["num_res_blocks"],
        attention_resolutions=opt.parse_ints(o["attention"], "--attention"),
        num_heads=o["num_heads"], dropout=o["dropout"],
    )


def accuracy_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """:func:`~guidekit_classifier.training.accuracy_by_t` rows formatted for a table."""
    return [{"t": f"{r['t_from']}..{r['t_to'] - 1}", "accuracy": f"{r['accuracy']:.3f}",
             "n": str(r["n"])} for r in rows]


LABELLED_DATA = Option("data", str, "digits", "A labelled dataset name (digits, shapes).")
# Both classifiers are narrow encoder UNets without attention (default_config's choice).
_NETWORK = opt.unet_options(model_channels=16, attention="")
_FIT = dict(batch_size=64, lr=5e-3, weight_decay=0.0, ema_decay=0.99, grad_clip=1.0,
            save_every=500, log_every=50)

CLASSIFIER_OPTIONS: tuple[Option, ...] = (
    LABELLED_DATA,
    opt.out_option("runs/classifier"),
    Option("dpm", Path, None, "The DDPM checkpoint to guide; its schedule is used."),
    Option("schedule", str, None, "Noise schedule without --dpm (default linear).",
           choices=("linear", "cosine")),
    Option("timesteps", int, None, "Training timesteps T without --dpm (default 1000)."),
    opt.IMAGE_SIZE,
    *_NETWORK,
    *opt.train_options(steps=1500, **_FIT),
)

JUDGE_OPTIONS: tuple[Option, ...] = (
    LABELLED_DATA,
    opt.out_option("runs/judge"),
    opt.IMAGE_SIZE,
    *_NETWORK,
    *opt.train_options(steps=500, **_FIT),
)


def classifier_trainer(ctx: TrainerContext) -> StepReport:
    """Train the noisy classifier p(y | x_t, t) that guides `guidekit sample --guidance
    classifier`. Give --dpm so it learns the DPM's schedule."""
    from guidekit.schedule import ScheduleConfig

    from .training import train_classifier

    o = ctx.options
    if o["dpm"] is not None and (o["schedule"] is not None or o["timesteps"] is not None):
        raise GuidekitError("the schedule comes from --dpm: drop --schedule/--timesteps")
    sched = None if o["dpm"] else ScheduleConfig(kind=o["schedule"] or "linear",
                                                 num_timesteps=o["timesteps"] or 1000)
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    summary = train_classifier(
        images, o["out"], dpm=o["dpm"], schedule=sched, model=_model_config(images, o),
        config=opt.train_config(o), resume=o["resume"], progress=ctx.progress,
        test=load_dataset(o["data"], "test", images.image_size, o["seed"]),
    )
    tables = ({"held-out accuracy by t": accuracy_rows(summary["accuracy_by_t"])}
              if "accuracy_by_t" in summary else {})
    return StepReport(f"trained {KIND} in {summary['seconds']} s -> {o['out']}",
                      tables=tables, metrics=summary)


def judge_trainer(ctx: TrainerContext) -> StepReport:
    """Train a clean classifier (t = 0) that judges generated samples; keep it separate from
    the guiding classifier."""
    from .training import train_judge

    o = ctx.options
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    summary = train_judge(
        images, o["out"], model=_model_config(images, o), config=opt.train_config(o),
        resume=o["resume"], progress=ctx.progress,
        test=load_dataset(o["data"], "test", images.image_size, o["seed"]),
    )
    text = (f"held-out accuracy {summary['test_accuracy']:.4f}"
            if "test_accuracy" in summary else "")
    return StepReport(f"trained {JUDGE_KIND} in {summary['seconds']} s -> {o['out']}",
                      metrics=summary, text=text)


# --------------------------------------------------------------------------- quickstart

# The classifier matches the CLI defaults (1500 steps): with 600 steps DDIM-50 reached only
# 0.91 judged accuracy at its best scale, against 0.99 at scale 16 with 1500 (seed 0,
# 10 per class). The judge needs fewer steps (99.7% held-out after 200).
QS_CLASSIFIER = dict(model_channels=16, channel_mult=(1, 2, 2), attention_resolutions=())
QS_CLASSIFIER_TRAIN = dict(steps=1500, batch_size=64, lr=5e-3, ema_decay=0.99)
QS_JUDGE = dict(model_channels=16, channel_mult=(1, 2, 2), attention_resolutions=())
QS_JUDGE_TRAIN = dict(steps=200, batch_size=64, lr=5e-3, ema_decay=0.99)
QS_SCALE = 16.0
QS_PER_CLASS = 8


def quickstart_classifier(ctx: QuickstartContext) -> StepReport:
    """Train the noisy classifier (on the quickstart DDPM's schedule) and the judge, then
    sample a class grid with DDIM-50: one row per class."""
    import torch

    from guidekit.data import save_image_grid
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import GuidanceRequest, sample
    from guidekit.training import TrainConfig

    from .training import (
        default_config,
        load_classifier,
        predict,
        train_classifier,
        train_judge,
    )

    t0 = time.perf_counter()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    clf_dir, judge_dir = ctx.out / "classifier", ctx.out / "judge"

    def train_config(kw: dict[str, Any]) -> TrainConfig:
        steps = 4 if ctx.fast else kw["steps"]
        return TrainConfig(**{**kw, "steps": steps}, seed=ctx.seed, save_every=steps,
                           log_every=max(steps // 10, 1))

    clf = train_classifier(
        train, clf_dir, dpm=ctx.out / "ddpm", model=default_config(train, **QS_CLASSIFIER),
        config=train_config(QS_CLASSIFIER_TRAIN), progress=ctx.progress, test=test,
    )
    judge = train_judge(
        train, judge_dir, model=default_config(train, **QS_JUDGE),
        config=train_config(QS_JUDGE_TRAIN), progress=ctx.progress, test=test,
    )
    n_classes = train.num_classes
    request = GuidanceRequest("classifier", QS_SCALE, options={"classifier": str(clf_dir)})
    x = sample(load_dpm(ctx.out / "ddpm"), n_classes * QS_PER_CLASS, sampler="ddim",
               steps=5 if ctx.fast else 50, guidance=[request], seed=ctx.seed,
               class_per_row=True, progress=ctx.progress)
    grid = save_image_grid(x, clf_dir / "class_grid.png", nrow=QS_PER_CLASS, scale=4,
                           row_labels=[f"class {c}" for c in range(n_classes)],
                           title=f"Classifier guidance, scale {QS_SCALE:g}, DDIM")
    target = torch.arange(n_classes).repeat_interleave(QS_PER_CLASS)
    judged = predict(load_classifier(judge_dir, JUDGE_KIND), x).argmax(-1)
    return StepReport(
        "Classifier guidance on digits",
        images=[grid],
        tables={"noisy classifier: held-out accuracy by t": clf["accuracy_by_t"]},
        metrics={
            "classifier_steps": clf["steps"],
            "judge_test_accuracy": round(judge["test_accuracy"], 4),
            "grid_scale": QS_SCALE,
            "grid_judged_as_target": round(float((judged == target).float().mean()), 4),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        text=f"Noisy classifier trained on the DDPM's schedule; the grid is DDIM-50 with "
        f"classifier guidance at scale {QS_SCALE:g}, row r guided toward digit r. The judge "
        "is a separate clean classifier.",
    )


def _qs_guidance(ctx: QuickstartContext) -> StepReport:
    from guidekit_classifier.evaluate import quickstart_guidance

    return quickstart_guidance(ctx)


# --------------------------------------------------------------------------- hooks


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    return [ModelSpec(MODEL_NAME, Lazy("guidekit.unet:ClassifierConfig"),
                      Lazy("guidekit.unet:EncoderUNet"),
                      help="UNet down half + middle + pooled head (noisy classifier).")]


@hookimpl
def guidekit_trainers() -> list[TrainerSpec]:
    return [
        TrainerSpec(KIND, classifier_trainer, options=CLASSIFIER_OPTIONS,
                    help="Train a noisy classifier p(y | x_t, t) for classifier guidance."),
        TrainerSpec(JUDGE_KIND, judge_trainer, options=JUDGE_OPTIONS,
                    help="Train a clean classifier that judges generated samples."),
    ]


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(KIND, Lazy("guidekit_classifier.guidance:build_classifier_guidance"),
                         options=Lazy("guidekit_classifier.guidance:GUIDANCE_OPTIONS"),
                         help="∇ log p(y | x_t) of a noisy classifier toward --class.")]


@hookimpl
def guidekit_commands(cli: Any) -> None:
    # cli is guidekit's typer.Typer. Imported here: typer stays in .cli, and a broken command
    # module must not stop the plugin from loading.
    from .cli import eval_app

    cli.add_typer(eval_app, name="eval")


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    return [
        QuickstartStep(KIND, quickstart_classifier, order=20,
                       help="Train a noisy classifier and a judge; sample a class grid."),
        QuickstartStep("guidance", _qs_guidance, order=30,
                       help="Sweep the guidance scale; judge the samples."),
    ]
