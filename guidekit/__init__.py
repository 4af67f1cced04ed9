"""guidekit: guided diffusion with one DDPM/DDIM engine and guidance methods as plugins."""

__version__ = "0.1.0"
