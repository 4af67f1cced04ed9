"""A working third-party guidance: g pulls x̂_0 toward a constant value (with an option)."""

import torch

from guidekit import Option
from guidekit.hookspecs import hookimpl
from guidekit.specs import GuidanceSpec

__version__ = "9.9"
CALLS = []


def build(ctx):
    target = float(ctx.options["toward_value"])

    def guidance(inp):
        CALLS.append(inp.t.clone())
        return (target - inp.x0) * torch.ones_like(inp.x_t)

    return guidance


@hookimpl
def guidekit_guidances():
    return [
        GuidanceSpec(
            "toward", build, help="pull x̂_0 toward a value",
            options=[Option("toward_value", float, 1.0)],
        )
    ]


@hookimpl
def guidekit_commands(cli):
    @cli.command("hello-toward")
    def hello():
        """Say hello (a command added by a plugin)."""
        print("hello from toward")
