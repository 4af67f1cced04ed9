"""Hook specifications: the whole plugin API, and its reference documentation.

A plugin is a module (or object) with functions named like the hooks below, marked with
``guidekit.hookimpl``, registered through the ``guidekit`` entry-point group::

    [project.entry-points.guidekit]
    myguidance = "guidekit_myguidance"

Every ``*_specs``-style hook returns a list; names must be unique across all plugins, and a
name registered twice is an error naming both plugins.
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

PROJECT = "guidekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def guidekit_guidances() -> list[GuidanceSpec]:
    """Register guidance methods for ``guidekit sample --guidance NAME``.

    Return a list of :class:`~guidekit.specs.GuidanceSpec`. At sampling time the engine calls
    ``spec.build(ctx)`` once with a :class:`~guidekit.specs.GuidanceContext` (the DPM, its
    schedule, the batch size, and the values of ``spec.options``); the returned callable gets
    a :class:`~guidekit.guidance.StepInput` at every step and returns
    g ≈ ∇_{x_t} log p(c | x_t) with x_t's shape. The engine scales g and folds it in as the
    mean shift (DDPM: μ + s·Σ·g; DDIM: ε̂ = ε − s·√(1−ᾱ_t)·g).
    """


@hookspec
def guidekit_weightings() -> list[WeightingSpec]:
    """Register loss weightings for ``guidekit train ... --weighting NAME``.

    Return a list of :class:`~guidekit.specs.WeightingSpec`. ``spec.weights(schedule,
    **options)`` returns λ_t for every training timestep as a (T,) float tensor; the trainer
    multiplies each sample's ε-loss by λ at its timestep. ``uniform`` (λ_t = 1) is built in.
    """


@hookspec
def guidekit_trainers() -> list[TrainerSpec]:
    """Register training commands, each reachable as ``guidekit train NAME``.

    Return a list of :class:`~guidekit.specs.TrainerSpec` whose ``command`` is a typer command
    function. Use :func:`guidekit.training.fit` for the loop, checkpoints and resumption.
    """


@hookspec
def guidekit_models() -> list[ModelSpec]:
    """Register network architectures by name, so checkpoints can be rebuilt from config.json.

    Return a list of :class:`~guidekit.specs.ModelSpec`; a checkpoint's ``model`` entry names
    one and holds its config (``config_class.from_dict``).
    """


@hookspec
def guidekit_datasets() -> list[DatasetSpec]:
    """Register built-in datasets, usable as ``--data NAME`` (a folder path always works too).

    Return a list of :class:`~guidekit.specs.DatasetSpec`; ``load(split, image_size, seed)``
    returns a :class:`~guidekit.data.ImageData` with images in [−1, 1]. Datasets must be
    generated or shipped inside a package: nothing is downloaded at run time.
    """


@hookspec
def guidekit_commands(cli: typer.Typer) -> None:
    """Add top-level CLI commands or groups to ``cli`` (a ``typer.Typer``).

    Called once per plugin while the CLI is built; a plugin whose hook raises is reported in
    one line and only its commands are missing. Add a group with
    ``cli.add_typer(sub, name="mymethod")`` or a command with ``@cli.command()``.
    """


@hookspec
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    """Add steps to ``guidekit quickstart``, the end-to-end run on the built-in data.

    Return a list of :class:`~guidekit.specs.QuickstartStep`. Steps run in ascending
    ``order`` (the core's DDPM is 10); each gets a :class:`~guidekit.specs.QuickstartContext`
    (the output folder, the seed, ``fast`` for smoke tests, and the results of earlier steps)
    and returns a :class:`~guidekit.specs.StepReport` whose images and tables go into the
    report. Keep a step to a couple of minutes on two CPU cores.
    """
