"""A plugin whose specs are malformed: a trainer with no function, a guidance with no name."""

from guidekit import GuidanceSpec, TrainerSpec, hookimpl


@hookimpl
def guidekit_trainers():
    return [TrainerSpec("broken-trainer", None)]


@hookimpl
def guidekit_guidances():
    return [GuidanceSpec(None, lambda ctx: None)]
