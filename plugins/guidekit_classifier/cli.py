"""The classifier plugin's commands: ``guidekit eval guidance``. The work is in
:mod:`guidekit_classifier.evaluate`; this module only reads the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from guidekit.cli.params import Device, JSONOut, parse_scales, report
from guidekit.engine import check_sampler
from guidekit.errors import GuidekitError
from guidekit.options import check_seed

eval_app = typer.Typer(help="Evaluate guided sampling against a separate judge.",
                       no_args_is_help=True)


@eval_app.command("guidance")
def guidance_command(
    checkpoint: Path = typer.Option(..., help="The ddpm checkpoint to sample."),
    classifier: Path = typer.Option(..., help="The noisy classifier that guides."),
    judge: Path = typer.Option(..., help="A separate clean judge (`guidekit train judge`)."),
    scales: str = typer.Option("0,1,2,4,8", help="Comma-separated guidance scales."),
    sampler: str = typer.Option("ddim", help="ddim or ddpm."),
    steps: int = typer.Option(50, help="Sampling steps (respaced from the T training steps)."),
    per_class: int = typer.Option(10, help="Samples per class at each scale."),
    seed: int = typer.Option(0, help="Seed of x_T and the sampling noise (same every scale)."),
    guidance_schedule: str = typer.Option("constant", help="constant, snr:LO:HI or t:LO:HI."),
    out_dir: Path = typer.Option(None, help="Where the plot and grid go "
                                 "(default: CLASSIFIER/eval_SAMPLER)."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Sweep the classifier-guidance scale; a separate judge scores every class's samples."""
    # imported here so a broken evaluate module costs only this command
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import GuidanceRequest, check_request

    from .evaluate import evaluate_guidance, same_path, save_sweep
    from .training import JUDGE_KIND, KIND, load_classifier

    scale_list = parse_scales(scales)
    check_seed(seed)
    # the schedule rule of `guidekit sample` (an empty spec is a mistake, not "constant")
    check_request(GuidanceRequest("classifier", 1.0, guidance_schedule))
    if same_path(judge, classifier):
        raise GuidekitError("the judge must not be the guiding classifier")
    check_sampler(sampler)
    dpm = load_dpm(checkpoint, device)
    clf = load_classifier(classifier, KIND, device)
    jdg = load_classifier(judge, JUDGE_KIND, device)
    result = evaluate_guidance(
        dpm, clf, jdg, scale_list, sampler=sampler, steps=steps, per_class=per_class,
        seed=seed, schedule=guidance_schedule, progress=not json_out,
    )
    report(save_sweep(result, out_dir or classifier / f"eval_{sampler}"), json_out)

