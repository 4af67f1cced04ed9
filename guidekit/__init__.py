"""guidekit: guided diffusion with one DDPM/DDIM engine and guidance methods as plugins."""

__version__ = "0.1.0"

from guidekit.ddpm import DPM, load_dpm  # noqa: E402
from guidekit.engine import Sampler  # noqa: E402
from guidekit.errors import CheckpointError, GuidekitError, PluginError  # noqa: E402
from guidekit.guidance import Guidance, GuidanceTerm, StepInput  # noqa: E402
from guidekit.hookspecs import hookimpl  # noqa: E402
from guidekit.sampling import GuidanceRequest, sample  # noqa: E402
from guidekit.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402

__all__ = [
    "DPM",
    "CheckpointError",
    "Guidance",
    "GuidanceRequest",
    "GuidanceTerm",
    "GuidekitError",
    "NoiseSchedule",
    "PluginError",
    "Sampler",
    "ScheduleConfig",
    "StepInput",
    "__version__",
    "hookimpl",
    "load_dpm",
    "sample",
]
