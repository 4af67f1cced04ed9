"""The options every ``guidekit pdae`` command shares, declared once."""

from __future__ import annotations

import typer

PDAE_OPT = typer.Option(..., help="A PDAE checkpoint (guidekit train pdae).")
PRETRAINED_OPT = typer.Option(None, help="The DPM it was trained on (default: the recorded "
                              "path).")
DATA_OPT = typer.Option("digits", help="Dataset name or a folder of images.")
SIZE_OPT = typer.Option(None, help="Resize images (default: the dataset's size).")
DEVICE_OPT = typer.Option("cpu", help="cpu or cuda.")
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON.")
