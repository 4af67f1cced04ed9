"""User-facing errors: the CLI prints these as one line, without a traceback, and exits with
the error's ``exit_code`` (2: a mistake the user can fix)."""

__all__ = [
    "CheckpointError",
    "DivergedError",
    "GuidekitError",
    "Interrupted",
    "PluginError",
]


class GuidekitError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code: int = 2


class CheckpointError(GuidekitError):
    """A checkpoint is missing, of the wrong kind, damaged, or does not match."""


class PluginError(GuidekitError):
    """A plugin is unknown, broken, or registers a name another plugin already has."""


class DivergedError(GuidekitError):
    """Sampling produced non-finite values (a guidance's g, or the samples themselves)."""


class Interrupted(GuidekitError):
    """Ctrl-C (SIGINT) or SIGTERM stopped a command; the message says what was kept."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
