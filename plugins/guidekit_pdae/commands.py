"""``guidekit pdae ...``: encode, reconstruct, interpolate, manipulate, gap, onestep, probe,
sample. Each module registers its own commands on the group."""

from __future__ import annotations

import typer

from . import analysis, autoencoding, latent

pdae_app = typer.Typer(help="PDAE experiments on a trained PDAE checkpoint.",
                       no_args_is_help=True)
for _module in (autoencoding, analysis, latent):
    _module.register(pdae_app)
