"""Classifier guidance (Dhariwal & Nichol 2021): g = ∇_{x_t} log p_φ(y | x_t, t).

The engine folds g in as the mean shift (DDPM: μ + s·Σ·g; DDIM: ε̂ = ε − s·√(1−ᾱ_t)·g) and
applies the scale and any ``--guidance-schedule``; this module only supplies g.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from guidekit.errors import GuidekitError
from guidekit.guidance import StepInput
from guidekit.options import Option
from guidekit.specs import GuidanceContext

from .training import KIND, check_compatible, load_classifier

MISSING_CLASSIFIER = (
    "--guidance classifier needs --classifier PATH "
    "(train one with `guidekit train classifier`)"
)


class ClassifierGuidance:
    """∇_{x_t} log softmax(classifier(x_t, t))[y] for each sample's class y.

    ``classifier`` maps (x, t) to logits (B, K) for any x shape; ``classes`` is (B,) long.
    """

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], classes: Tensor) -> None:
        if classes.ndim != 1:
            raise GuidekitError(f"classes must have shape (B,), got {tuple(classes.shape)}")
        self.classifier = classifier
        self.classes = classes.long()

    def __call__(self, inp: StepInput) -> Tensor:
        x_t = inp.x_t
        if x_t.shape[0] != self.classes.shape[0]:
            raise GuidekitError(f"classifier guidance was built for {self.classes.shape[0]} "
                                f"samples but got a batch of {x_t.shape[0]}")
        y = self.classes.to(x_t.device)
        # Sampling runs under no_grad: differentiate a detached leaf copy of x_t. Samples are
        # independent, so one backward of the summed log-probs gives every sample's gradient.
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(self.classifier(x, inp.t).float(), dim=-1)
            selected = log_p.gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(selected, x)
        return g.to(x_t.dtype)


def build_classifier_guidance(ctx: GuidanceContext) -> ClassifierGuidance:
    """Build from ``--classifier PATH``, toward the run's ``--class`` / ``--class-per-row``
    (the ``classifier`` guidance of ``guidekit sample``)."""
    path = ctx.options["classifier"]
    if not path:
        raise GuidekitError(MISSING_CLASSIFIER)
    clf = load_classifier(Path(path), KIND, ctx.device)
    check_compatible(clf, ctx.dpm_config)
    return ClassifierGuidance(clf.model, ctx.target_classes(clf.num_classes, "the classifier"))


GUIDANCE_OPTIONS: tuple[Option, ...] = (
    Option("classifier", str, None, "A classifier checkpoint (`guidekit train classifier`)."),
)


def guidance_options() -> list[Option]:
    """The ``guidekit sample`` options of ``--guidance classifier``."""
    return list(GUIDANCE_OPTIONS)
