"""The ``guidekit`` command line: the only part of guidekit that imports typer.

Commands come from the core and from plugins (trainers under ``guidekit train``, anything
else through the ``guidekit_commands`` hook). :mod:`guidekit.cli.params` holds what plugin
commands share with the core's: ``--device``, ``--json``, result printing, scale lists.
"""

from guidekit.cli.app import build_app, main

__all__ = ["build_app", "main"]
