"""A plugin that registers a weighting name the built-in p2 plugin already has."""

import torch

from guidekit.hookspecs import hookimpl
from guidekit.specs import WeightingSpec


@hookimpl
def guidekit_weightings():
    return [WeightingSpec("p2", lambda schedule: torch.ones(schedule.num_steps))]
