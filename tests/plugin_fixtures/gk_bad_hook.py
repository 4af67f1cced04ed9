"""A plugin that registers one thing fine, then fails in another hook."""

from guidekit.hookspecs import hookimpl
from guidekit.specs import GuidanceSpec


@hookimpl
def guidekit_guidances():
    return [GuidanceSpec("half-registered", lambda ctx: None)]


@hookimpl
def guidekit_weightings():
    raise RuntimeError("weighting table unavailable")
