"""Hook specifications: the whole plugin API, and its reference documentation.

A plugin is a module (or object) with functions named like the hooks below, marked with
``guidekit.hookimpl``, registered through the ``guidekit`` entry-point group::

    [project.entry-points.guidekit]
    myguidance = "guidekit_myguidance"

Every registering hook returns a list of specs; names must be unique across all plugins: a
plugin whose name is already taken is left out whole, and ``guidekit plugins`` names both. A
hook implementation whose name matches no hook below (a typo) is reported the same way.

The hooks run at every start of ``guidekit``, ``--help`` and ``guidekit plugins`` included,
which import no torch: keep a plugin's top-level module light, and name what needs torch by
``"module:attribute"`` with :class:`~guidekit.specs.Lazy` (any spec field but its name, help
and order, loaded on first use) and, for commands, ``guidekit.cli.params.lazy_group``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from guidekit.specs import (
        DatasetSpec,
        GuidanceSpec,
        ModelSpec,
        QuickstartStep,
        TrainerSpec,
        WeightingSpec,
    )

__all__ = [
    "PROJECT",
    "guidekit_commands",
    "guidekit_datasets",
    "guidekit_guidances",
    "guidekit_models",
    "guidekit_quickstart_steps",
    "guidekit_trainers",
    "guidekit_weightings",
    "hookimpl",
    "hookspec",
]


PROJECT = "guidekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def guidekit_guidances() -> list[GuidanceSpec]:
    """Register guidance methods for ``guidekit sample --guidance NAME``.

    Return a list of :class:`~guidekit.specs.GuidanceSpec`. At sampling time the engine calls
    ``spec.build(ctx)`` once with a :class:`~guidekit.specs.GuidanceContext` (the DPM, its
    schedule, the batch size, and the value of every option in ``spec.options``); the returned
    callable gets a :class:`~guidekit.guidance.StepInput` at every step and returns g ≈ ∇_{x_t}
    log p(c | x_t), a tensor of x_t's shape, dtype and device. The engine scales g and folds it
    in as the mean shift (DDPM: μ + s·Σ·g; DDIM: ε̂ = ε − s·√(1−ᾱ_t)·g). A callable with the
    attribute ``form = "eps"`` returns an ε-space shift d instead, applied as ε̂ = ε − s·d
    before the step in both samplers (for a network trained on ε̂, as PDAE's G_ψ is).
    ``ctx.target_classes(num_classes)`` gives the run's ``--class`` per sample, for a guidance
    that steers toward a class. ``spec.options`` are :class:`~guidekit.options.Option`
    declarations: on the command line they follow ``--guidance NAME``; ``ctx.options`` holds
    each one's value by name, its declared default when the caller (CLI or Python) left it out.
    A g that is not such a tensor, or is ever NaN or infinite, stops sampling with one line
    naming the guidance; ``build`` raising :class:`~guidekit.errors.GuidekitError` is a user
    mistake shown as is, any other exception a one-line plugin failure.

    Example: pull every x̂_0 toward a constant grey level::

        from guidekit import GuidanceSpec, Option, hookimpl

        def build_toward(ctx):
            level = ctx.options["toward_level"]
            return lambda inp: level - inp.x0

        @hookimpl
        def guidekit_guidances():
            return [GuidanceSpec(
                "toward", build_toward, help="Pull x̂_0 toward a grey level.",
                options=[Option("toward_level", float, 0.0, "The grey level, in [-1, 1].")],
            )]
    """


@hookspec
def guidekit_weightings() -> list[WeightingSpec]:
    """Register loss weightings for ``guidekit train ... --weighting NAME``.

    Return a list of :class:`~guidekit.specs.WeightingSpec`. ``spec.weights(schedule,
    **options)`` returns λ_t for every training timestep as a (T,) float tensor of finite
    values ≥ 0, not all zero; the trainer multiplies each sample's ε-loss by λ at its
    timestep. ``uniform`` (λ_t = 1) is built in. ``spec.options`` are
    :class:`~guidekit.options.Option` declarations that follow ``--weighting NAME`` on the
    command line; ``weights`` gets every one's value as a keyword (its declared default when
    not given), so the function itself needs no defaults.

    Example: train on the noisier steps only::

        import torch
        from guidekit import Option, WeightingSpec, hookimpl

        def late_weights(schedule, late_from):
            t = torch.arange(schedule.num_steps)
            return (t >= late_from * schedule.num_steps).float()

        @hookimpl
        def guidekit_weightings():
            return [WeightingSpec(
                "late", late_weights, help="λ_t = 1 from t = late_from·T on, else 0.",
                options=[Option("late_from", float, 0.5, "Where the weight turns on, in T.")],
            )]
    """


@hookspec
def guidekit_trainers() -> list[TrainerSpec]:
    """Register training commands, each reachable as ``guidekit train NAME``.

    Return a list of :class:`~guidekit.specs.TrainerSpec`. Its ``options`` become the
    command's flags (guidekit adds ``--json``); ``spec.train(ctx)`` gets a
    :class:`~guidekit.specs.TrainerContext` holding every option's value by name, and
    returns a :class:`~guidekit.specs.StepReport` whose ``metrics`` are what ``--json``
    prints (without it, its tables, text and title are shown). :mod:`guidekit.trainer_options`
    declares the options every trainer shares (``train_options(steps=100)`` gives them with
    your defaults, ``train_config(ctx.options)`` the :class:`~guidekit.training.TrainConfig`);
    :func:`guidekit.training.fit` runs the loop, checkpoints and resumption. A trainer that
    declares an option named ``weighting`` (``trainer_options.WEIGHTING``) takes the chosen
    weighting's options too, in ``ctx.weighting_options``.

    Example::

        from guidekit import Option, StepReport, TrainerSpec, hookimpl
        from guidekit.trainer_options import out_option, train_config, train_options

        def train_mine(ctx):
            config = train_config(ctx.options)  # steps=100 unless given, the rest defaults
            out = ctx.options["out"]
            summary = {"steps": config.steps, "width": ctx.options["width"],
                       "checkpoint": str(out)}
            return StepReport(f"trained for {config.steps} steps -> {out}", metrics=summary)

        @hookimpl
        def guidekit_trainers():
            options = [out_option("runs/mine"), Option("width", int, 8, "Network width."),
                       *train_options(steps=100)]
            return [TrainerSpec("mine", train_mine, help="Train my model.", options=options)]
    """


@hookspec
def guidekit_models() -> list[ModelSpec]:
    """Register network architectures by name, so checkpoints can be rebuilt from config.json.

    Return a list of :class:`~guidekit.specs.ModelSpec`. A checkpoint's ``config.json`` has a
    ``model`` entry ``{"name": NAME, "config": {...}}``; loading it builds
    ``spec.model_class(spec.config_class.from_dict(config))``, so the config class needs a
    ``from_dict`` classmethod (and a ``to_dict`` for the trainer that writes it). A DPM's
    network takes ``(x_t, t)``, t being original training timesteps, and returns ε with
    x_t's shape (or twice its channels, the second half a learned variance).

    Example::

        from dataclasses import asdict, dataclass

        import torch
        from guidekit import ModelSpec, hookimpl

        @dataclass
        class TinyConfig:
            channels: int = 1

            @classmethod
            def from_dict(cls, d):
                return cls(**d)

            def to_dict(self):
                return asdict(self)

        class TinyEps(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                self.config = config
                self.conv = torch.nn.Conv2d(config.channels, config.channels, 3, padding=1)

            def forward(self, x, t):
                return self.conv(x)

        @hookimpl
        def guidekit_models():
            return [ModelSpec("tiny-eps", TinyConfig, TinyEps, help="One convolution.")]
    """


@hookspec
def guidekit_datasets() -> list[DatasetSpec]:
    """Register built-in datasets, usable as ``--data NAME`` (a folder path always works too).

    Return a list of :class:`~guidekit.specs.DatasetSpec`; ``load(split, image_size, seed)``
    returns a :class:`~guidekit.data.ImageData` with images (N, C, H, W) in [−1, 1]. ``split``
    is ``"train"`` or ``"test"``, ``image_size`` None means the dataset's own size, and
    ``seed`` drives anything random. Datasets must be generated or shipped inside a package:
    nothing is downloaded at run time.

    Example: 8×8 stripes, labelled by orientation::

        import torch
        from guidekit import DatasetSpec, ImageData, hookimpl

        def load_stripes(split, image_size=None, seed=0):
            size = image_size or 8
            rows = (torch.arange(size) % 2 * 2.0 - 1)[:, None].expand(size, size)
            images = torch.stack([rows, rows.T])[:, None].repeat(16, 1, 1, 1)
            return ImageData("stripes", images, torch.arange(32) % 2, num_classes=2)

        @hookimpl
        def guidekit_datasets():
            return [DatasetSpec("stripes", load_stripes, help="8×8 stripes, 2 classes.")]
    """


@hookspec
def guidekit_commands(cli: typer.Typer) -> None:
    """Add top-level CLI commands or groups to ``cli`` (the ``guidekit`` ``typer.Typer``).

    Return nothing: register on ``cli``, a ``typer.Typer`` of this plugin's own, a group
    with ``cli.add_typer(sub, name="mymethod")`` or a command with ``@cli.command()``;
    guidekit merges them into its CLI. Called once per plugin while the CLI is built; a
    plugin whose hook raises, or that takes a name guidekit or another plugin already has
    (``sample``, ``train``, ...), is reported in one line and only its commands are missing,
    so import fragile modules (and typer: keep it in your package's ``cli`` module) inside
    the hook. Commands that report figures take ``--json`` (``guidekit.cli.params.JSONOut``),
    a device takes ``guidekit.cli.params.Device``, and a user mistake raises
    :class:`~guidekit.errors.GuidekitError`, which the CLI prints as one ``error: …`` line with
    exit status 2.

    Example: ``guidekit mine hello --name you``::

        import typer
        from guidekit import hookimpl

        mine = typer.Typer(help="My method's tools.", no_args_is_help=True)

        @mine.command("hello")
        def hello(name: str = typer.Option("world", help="Whom to greet.")) -> None:
            typer.echo(f"hello {name}")

        @hookimpl
        def guidekit_commands(cli):
            cli.add_typer(mine, name="mine")
    """


@hookspec
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    """Add steps to ``guidekit quickstart``, the end-to-end run on the built-in data.

    Return a list of :class:`~guidekit.specs.QuickstartStep`. Steps run in ascending
    ``order`` (the core's DDPM is 10); each gets a :class:`~guidekit.specs.QuickstartContext`
    (the output folder, the seed, ``fast`` for smoke tests, and the results of earlier steps)
    and returns a :class:`~guidekit.specs.StepReport` whose text, metrics, tables and images
    go into ``report.html`` and ``summary.json``. The core's DDPM checkpoint is
    ``ctx.out / "ddpm"``. Keep a step to a couple of minutes on two CPU cores, and to
    seconds when ``ctx.fast``.

    Example::

        from guidekit import QuickstartStep, StepReport, hookimpl, load_dpm, sample
        from guidekit import save_image_grid

        def more_samples(ctx):
            x = sample(load_dpm(ctx.out / "ddpm"), 16, steps=5 if ctx.fast else 50,
                       seed=ctx.seed)
            grid = save_image_grid(x, ctx.out / "mine" / "samples.png", scale=4)
            return StepReport("More samples", images=[grid], metrics={"std": float(x.std())})

        @hookimpl
        def guidekit_quickstart_steps():
            return [QuickstartStep("mine", more_samples, order=70, help="16 more digits.")]
    """
