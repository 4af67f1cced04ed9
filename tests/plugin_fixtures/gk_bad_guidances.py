"""Guidances that return the wrong thing, or fail to build."""

import numpy as np
import torch

from guidekit import GuidanceSpec, hookimpl


def returning(make):
    return lambda ctx: (lambda inp: make(inp))


def boom(ctx):
    raise RuntimeError("lost its weights")


@hookimpl
def guidekit_guidances():
    return [
        GuidanceSpec("none", returning(lambda inp: None)),
        GuidanceSpec("numpy", returning(lambda inp: np.zeros(tuple(inp.x_t.shape)))),
        GuidanceSpec("double", returning(lambda inp: inp.x_t.double())),
        GuidanceSpec("inf", returning(lambda inp: torch.full_like(inp.x_t, float("inf")))),
        GuidanceSpec("boom", boom),
        GuidanceSpec("not-callable", lambda ctx: 3),
    ]
