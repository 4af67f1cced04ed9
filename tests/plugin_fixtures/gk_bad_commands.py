"""A plugin whose command hook fails (e.g. a missing optional dependency)."""

from guidekit.hookspecs import hookimpl


@hookimpl
def guidekit_commands(cli):
    raise ImportError("needs an optional extra")
