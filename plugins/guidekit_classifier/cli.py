"""The classifier plugin's commands: ``guidekit eval guidance``, ``eval samples`` and ``eval
stages``. The work is in :mod:`guidekit_classifier.evaluate`, :mod:`~guidekit_classifier.quality`
and :mod:`~guidekit_classifier.stages`; this module only reads the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from guidekit.cli.params import (
    EXTRA_ARGS,
    Classes,
    ClassPerRow,
    Clip,
    ClipOrder,
    Device,
    Eta,
    Guidances,
    GuidanceSchedules,
    JSONOut,
    Respacing,
    SamplerName,
    SampleSteps,
    Scales,
    Spacing,
    Variance,
    parse_scales,
    report,
    requests_from_cli,
)
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
    stages: bool = typer.Option(
        False, "--stages", help="Guidance on in one SNR band at a time (off, SNR < 0.01, "
        "0.01 <= SNR < 1, SNR >= 1, all) at the one --scales value, with FD against held-out "
        "images."),
    data: str = typer.Option(None, help="With --stages: held-out images for FD, a dataset "
                             "name (its test split) or a folder. Default: the DPM's dataset."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Sweep the classifier-guidance scale; a separate judge scores every class's samples."""
    # imported here so a broken evaluate module costs only this command (and torch loads on
    # first use: `guidekit --help` must not import it)
    from guidekit.ddpm import load_dpm
    from guidekit.engine import check_sampler
    from guidekit.sampling import GuidanceRequest, check_request

    from .evaluate import evaluate_guidance, same_path, save_sweep
    from .training import JUDGE_KIND, KIND, load_classifier

    scale_list = parse_scales(scales)
    check_seed(seed)
    # the schedule rule of `guidekit sample` (an empty spec is a mistake, not "constant")
    check_request(GuidanceRequest("classifier", 1.0, guidance_schedule))
    if stages and len(scale_list) != 1:
        raise GuidekitError("--stages takes one guidance scale: give e.g. --scales 8")
    if stages and guidance_schedule != "constant":
        raise GuidekitError("--stages sets the guidance schedule of each band: leave out "
                            "--guidance-schedule")
    if data is not None and not stages:
        raise GuidekitError("--data is for --stages (FD against held-out images): add --stages "
                            "or leave out --data")
    if same_path(judge, classifier):
        raise GuidekitError("the judge must not be the guiding classifier")
    check_sampler(sampler)
    dpm = load_dpm(checkpoint, device)
    clf = load_classifier(classifier, KIND, device)
    jdg = load_classifier(judge, JUDGE_KIND, device)
    if stages:
        from .quality import held_out_images
        from .stages import evaluate_guidance_stages, save_guidance_stages

        real = held_out_images(dpm, data, None, seed)
        res = evaluate_guidance_stages(dpm, clf, jdg, scale_list[0], real, sampler=sampler,
                                       steps=steps, per_class=per_class, seed=seed,
                                       progress=not json_out)
        report(save_guidance_stages(res, out_dir or classifier / f"eval_{sampler}_stages"),
               json_out)
        return
    result = evaluate_guidance(
        dpm, clf, jdg, scale_list, sampler=sampler, steps=steps, per_class=per_class,
        seed=seed, schedule=guidance_schedule, progress=not json_out,
    )
    report(save_sweep(result, out_dir or classifier / f"eval_{sampler}"), json_out)


@eval_app.command("samples", context_settings=EXTRA_ARGS)
def samples_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="The ddpm checkpoint to sample."),
    judge: Path = typer.Option(..., help="A clean judge (`guidekit train judge`) whose "
                               "features the samples are compared in."),
    n: int = typer.Option(256, help="Number of samples (>= 2)."),
    data: str = typer.Option(None, help="Held-out images: a dataset name (its test split) or "
                             "a folder. Default: the DPM's own dataset."),
    n_real: int = typer.Option(None, help="Held-out images to compare with. Default: --n, or "
                               "the whole test split when it is smaller."),
    k: int = typer.Option(5, help="Neighbours k of precision/recall and density/coverage "
                          "(below --n and --n-real)."),
    sampler: SamplerName = "ddim",
    steps: SampleSteps = 50,
    spacing: Spacing = None,
    respacing: Respacing = None,
    eta: Eta = 0.0,
    variance: Variance = None,
    clip: Clip = None,
    clip_order: ClipOrder = "clip-then-guide",
    class_: Classes = (),
    class_per_row: ClassPerRow = False,
    guidance: Guidances = (),
    scale: Scales = (),
    guidance_schedule: GuidanceSchedules = (),
    seed: int = typer.Option(0, help="Seed of x_T, the sampling noise and the held-out subset."),
    fid_weights: Path = typer.Option(
        None, help="Also report real (Inception) FID with torch-fidelity: the local file "
        "weights-inception-2015-12-05-6726825d.pth (pip install 'guidekit[fid]')."),
    out_dir: Path = typer.Option(None, help="Where the sample grid goes "
                                 "(default: CHECKPOINT/eval_samples)."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Score a DPM's samples against held-out images in a judge's features: Fréchet distance,
    precision/recall, density/coverage (and judged accuracy with target classes). Plugin
    options (e.g. --classifier) follow the --guidance that declares them."""
    # imported here so a broken quality module costs only this command
    from guidekit.data import check_output_dir
    from guidekit.ddpm import load_dpm
    from guidekit.lookup import guidance_spec

    from .quality import evaluate_samples, save_samples
    from .training import JUDGE_KIND, load_classifier

    if respacing is not None and spacing is not None:
        raise GuidekitError("give --spacing (with --steps) or --respacing, not both")
    out = check_output_dir(out_dir or checkpoint / "eval_samples", "--out-dir")
    requests = requests_from_cli(guidance, scale, guidance_schedule, ctx.args,
                                 lambda name: guidance_spec(name).options)
    dpm = load_dpm(checkpoint, device)
    jdg = load_classifier(judge, JUDGE_KIND, device)
    result = evaluate_samples(
        dpm, jdg, n, data=data, n_real=n_real, k=k, sampler=sampler,
        steps=steps if respacing is None else respacing, eta=eta, spacing=spacing,
        clip_x0=clip, clip_order=clip_order, variance=variance, guidance=requests,
        classes=class_, class_per_row=class_per_row, seed=seed, fid_weights=fid_weights,
        progress=not json_out,
    )
    # one row per class, as --class-per-row lays the samples out
    classes = getattr(getattr(dpm.model, "config", None), "num_classes", None) or jdg.num_classes
    nrow = n // classes if class_per_row else None
    labels = [f"class {c}" for c in range(classes)] if class_per_row else None
    result = {"checkpoint": str(checkpoint), "judge": str(judge), **result}
    report(save_samples(result, out, nrow, labels), json_out)


@eval_app.command("stages")
def stages_command(
    checkpoint: Path = typer.Option(..., help="The (unconditional) ddpm checkpoint."),
    judge: Path = typer.Option(..., help="A clean judge (`guidekit train judge`) that labels "
                               "the reconstructions."),
    snrs: str = typer.Option("10,1,0.1,0.01,0.001", help="Comma-separated SNRs to noise x_0 "
                             "to (each taken at the timestep of nearest SNR)."),
    n: int = typer.Option(100, help="Held-out images (the first n of the test split)."),
    repeats: int = typer.Option(4, help="DDPM draws back to x_0 per image (>= 2)."),
    steps: int = typer.Option(100, help="At most this many DDPM steps from t to 0."),
    data: str = typer.Option(None, help="Labelled held-out images: a dataset name (its test "
                             "split). Default: the DPM's own dataset."),
    grid_images: int = typer.Option(4, help="Images shown in the grid (each with every draw)."),
    seed: int = typer.Option(0, help="Seed of the noise to x_t and of the DDPM draws."),
    out_dir: Path = typer.Option(None, help="Where stages.png and stages_plot.png go "
                                 "(default: CHECKPOINT/eval_stages)."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """What each stage of sampling decides (P2's Figure 1): held-out x_0 noised to each SNR and
    sampled back with DDPM several times; the judge's agreement with x_0's label, the pixel
    distance to x_0 and the spread between draws, per SNR."""
    from guidekit.data import check_output_dir
    from guidekit.ddpm import load_dpm

    from .quality import labelled_held_out
    from .stages import check_snrs, evaluate_stages, save_stages
    from .training import JUDGE_KIND, load_classifier

    snr_list = check_snrs(parse_scales(snrs, "--snrs"))
    check_seed(seed)
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    if grid_images < 1:
        raise GuidekitError(f"--grid-images must be >= 1, got {grid_images}")
    out = check_output_dir(out_dir or checkpoint / "eval_stages", "--out-dir")
    dpm = load_dpm(checkpoint, device)
    jdg = load_classifier(judge, JUDGE_KIND, device)
    x0, labels = labelled_held_out(dpm, data, n)
    result = evaluate_stages(dpm, jdg, x0, labels, snrs=snr_list, repeats=repeats, steps=steps,
                             seed=seed, progress=not json_out)
    report(save_stages(result, out, grid_images), json_out)
