"""Classifier-free guidance (Ho & Salimans 2022) as a guidekit plugin: ``--guidance cfg``.

A class-conditional DPM trained with label dropout (``guidekit train ddpm --class-cond
--cond-drop 0.1``) is its own classifier: by Bayes, ∇ log p(y | x_t) = ∇ log p(x_t | y) −
∇ log p(x_t), and ε = −√(1−ᾱ_t)·∇ log p, so

    g = −(ε(x_t, y) − ε(x_t, ∅)) / √(1−ᾱ_t).

The engine samples from the null class ∅ and folds g in like any score (DDIM:
ε̂ = ε − s·√(1−ᾱ_t)·g), which gives the familiar mix

    ε̂ = ε(∅) + s·(ε(y) − ε(∅)):

s = 0 samples unconditionally, s = 1 from the conditional model, s > 1 past it. Under DDPM
the mean moves by s·Σ_t·g, as for a classifier's gradient (for Σ = β̃ that is the mix above
with s scaled by √α_t(1−ᾱ_{t−1})/(1−ᾱ_t), within 1% of s over most of a linear schedule).
Both ε come from one batched forward of the network. It composes with the other guidances
(say, a classifier's gradient on top) by summing, as every guidance does.

From Python: ``guidekit.sample(dpm, n, guidance=[GuidanceRequest("cfg", 3.0)],
classes=[7])``, or :class:`ClassifierFreeGuidance` in a ``guidekit.GuidanceTerm`` for a
``guidekit.Sampler`` run with ``y`` set to the null class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guidekit.errors import GuidekitError
from guidekit.hookspecs import hookimpl
from guidekit.specs import GuidanceContext, GuidanceSpec

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    from torch import Tensor

    from guidekit.guidance import StepInput

__version__ = "0.1.0"

__all__ = ["ClassifierFreeGuidance", "build_cfg"]

NAME = "cfg"


class ClassifierFreeGuidance:
    """g = −(ε(x_t, y) − ε(x_t, ∅)) / √(1−ᾱ_t) toward ``labels`` (B,), with ε(x_t, y) from
    the engine's batched forward (``labels``) and ε(x_t, ∅) the step's own
    (``unconditional_base``)."""

    unconditional_base = True

    def __init__(self, labels: Tensor) -> None:
        if labels.ndim != 1:
            raise GuidekitError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        self.labels = labels.long()

    def __call__(self, inp: StepInput) -> Tensor:
        if inp.label_eps is None:
            raise GuidekitError("classifier-free guidance needs ε at its labels: run it in a "
                                "guidekit Sampler, which evaluates them")
        from guidekit import ops

        s1m = ops.at(inp.schedule.tables["sqrt_one_minus_alphas_cumprod"], inp.k, inp.x_t)
        return -(inp.label_eps - inp.eps) / s1m


def build_cfg(ctx: GuidanceContext) -> ClassifierFreeGuidance:
    """Build toward the run's ``--class`` / ``--class-per-row`` on a DPM with a null class."""
    config = getattr(ctx.model, "config", None)
    num_classes = getattr(config, "num_classes", None)
    if num_classes is None or getattr(ctx.model, "null_label", None) is None:
        what = "unconditional" if num_classes is None else "class-conditional without a null class"
        raise GuidekitError(f"--guidance cfg needs a DPM trained with label dropout, but this "
                            f"one is {what}: train one with `guidekit train ddpm --class-cond "
                            "--cond-drop 0.1`")
    return ClassifierFreeGuidance(ctx.target_classes(num_classes, "this DPM"))


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(NAME, build_cfg,
                         help="Classifier-free guidance: ε(∅) + s·(ε(y) − ε(∅)) toward --class "
                              "on a DPM trained with --cond-drop.")]
