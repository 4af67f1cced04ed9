"""A hook written as a generator: it registers what it yields."""

import torch

from guidekit import GuidanceSpec, hookimpl


@hookimpl
def guidekit_guidances():
    yield GuidanceSpec("yielded", lambda ctx: (lambda inp: torch.zeros_like(inp.x_t)))
