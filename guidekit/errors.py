"""User-facing errors: the CLI prints these as one line, without a traceback."""

__all__ = [
    "CheckpointError",
    "DivergedError",
    "GuidekitError",
    "PluginError",
]


class GuidekitError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class CheckpointError(GuidekitError):
    """A checkpoint is missing, of the wrong kind, or does not match."""


class PluginError(GuidekitError):
    """A plugin is unknown, broken, or registers a name another plugin already has."""


class DivergedError(GuidekitError):
    """Sampling produced non-finite values (a guidance's g, or the samples themselves)."""
