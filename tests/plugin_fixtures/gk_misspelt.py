"""A plugin whose hook name is misspelt (singular): it would register nothing, silently."""

from guidekit import GuidanceSpec, hookimpl


@hookimpl
def guidekit_guidance():
    return [GuidanceSpec("never-seen", lambda ctx: None)]
