"""``guidekit pdae ...``: encode, reconstruct, interpolate, manipulate, gap, onestep, probe,
sample, fewstep. The only module of the plugin that imports typer: each command parses its
flags, calls the library functions of autoencoding, analysis, latent and fewstep, and prints
one report."""

from __future__ import annotations

from pathlib import Path

import typer

from guidekit import GuidekitError, StepReport
from guidekit.cli.params import Device, JSONOut, parse_scales, report
from guidekit.options import check_seed

# Each command imports the modules it runs (torch among them) when it runs: `guidekit --help`
# must not import torch, and a broken module costs only its commands.

pdae_app = typer.Typer(help="PDAE experiments on a trained PDAE checkpoint.",
                       no_args_is_help=True)

# the options the commands share, declared once
PDAE_OPT = typer.Option(..., help="A PDAE checkpoint (guidekit train pdae).")
PRETRAINED_OPT = typer.Option(None, help="The DPM it was trained on (default: the recorded "
                              "path).")
DATA_OPT = typer.Option("digits", help="Dataset name or a folder of images.")
SIZE_OPT = typer.Option(None, help="Resize images (default: the dataset's size).")
STEPS_OPT = typer.Option(100, help="DDIM steps (respaced as the DPM says, else ddimK).")
SEED_OPT = typer.Option(0, help="Seed of the noise (and of the random encoder).")


# --------------------------------------------------------------------------- autoencoding


@pdae_app.command("encode")
def encode_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="train or test (a folder is used whole)."),
    out: Path = typer.Option(Path("latents.safetensors"), help="Latent file to write."),
    image_size: int = SIZE_OPT,
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Encode every image of a split: z = E_φ(x_0), for `--guidance pdae --latents`."""
    from .autoencoding import encode_images, load_images
    from .training import load_pdae

    model = load_pdae(pdae, pretrained, device)
    summary = encode_images(model, load_images(model, data, split, image_size), out)
    report(StepReport(f"wrote {summary['n']} latents ({summary['latent_dim']}-d) of "
                      f"{data}/{split} -> {summary['out']}", metrics=summary), json_out)


@pdae_app.command("reconstruct")
def reconstruct_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="Held-out split to reconstruct."),
    n: int = typer.Option(64, help="Number of images (the first N of the split)."),
    steps: int = STEPS_OPT,
    xT: str = typer.Option("both", "--xT", help="inferred (DDIM inversion), random "
                           "(x_T ~ N(0, I)) or both."),
    seed: int = typer.Option(0, help="Seed of the random x_T."),
    out_dir: Path = typer.Option(Path("runs/pdae_reconstruct"), help="Where grid.png goes."),
    lpips_alexnet: Path = typer.Option(None, help="torchvision's alexnet-owt-7be5be79.pth "
                                       "(for LPIPS)."),
    lpips_linear: Path = typer.Option(None, help="LPIPS v0.1's alex.pth (for LPIPS)."),
    image_size: int = SIZE_OPT,
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Autoencode held-out images; SSIM, MSE (images in [0, 1]) and LPIPS per method, and a
    grid: originals, then one row per method."""
    from .autoencoding import (
        XT_CHOICES,
        load_images,
        reconstruct,
        reconstruction_grid,
        reconstruction_table,
    )
    from .metrics import load_lpips
    from .training import load_pdae

    check_seed(seed)
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    if xT not in XT_CHOICES:
        raise GuidekitError(f"unknown --xT '{xT}': choose inferred, random or both")
    files = None
    if lpips_alexnet is not None or lpips_linear is not None:
        load_lpips(lpips_alexnet, lpips_linear)  # a missing one fails before any sampling
        files = (lpips_alexnet, lpips_linear)
    model = load_pdae(pdae, pretrained, device)
    x0 = load_images(model, data, split, image_size).images[:n]
    result = reconstruct(model, x0, steps=steps, xT=xT, seed=seed, lpips_files=files,
                         progress=not json_out)
    grid = reconstruction_grid(x0, result.pop("images"), out_dir / "grid.png",
                               title=f"Reconstruction of held-out '{data}', DDIM-{steps}")
    result["grid"] = str(grid)
    rows = ", ".join(["originals", *(r["method"] for r in result["methods"])])
    report(StepReport(f"grid (rows: {rows}): {grid}", metrics=result,
                      tables=reconstruction_table(result)), json_out)


@pdae_app.command("interpolate")
def interpolate_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="Split the two images come from."),
    a: int = typer.Option(0, help="Index of the first image."),
    b: int = typer.Option(1, help="Index of the second image."),
    mode: str = typer.Option("both", help="z (lerp z), shift (lerp G_ψ) or both."),
    frames: int = typer.Option(7, help="Interpolation points, ends included."),
    steps: int = STEPS_OPT,
    out: Path = typer.Option(Path("runs/pdae_interpolate.png"), help="PNG grid to write."),
    image_size: int = SIZE_OPT,
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Interpolate between two images: slerp of inferred x_T, lerp of z or of the shift.
    Grid: one row per mode, image a, the frames, image b."""
    from .autoencoding import INTERP_MODES, interpolate, interpolation_grid, load_images, pick_image
    from .training import load_pdae

    if mode not in INTERP_MODES:
        raise GuidekitError(f"unknown --mode '{mode}': choose z, shift or both")
    modes = ("z", "shift") if mode == "both" else (mode,)
    model = load_pdae(pdae, pretrained, device)
    images = load_images(model, data, split, image_size)
    xa, xb = pick_image(images, a, "--a"), pick_image(images, b, "--b")
    result = interpolate(model, xa, xb, modes=modes, frames=frames, steps=steps,
                         progress=not json_out)
    grid = interpolation_grid(xa, xb, result, out,
                              title=f"Interpolating {split} images {a} and {b}, DDIM-{steps}")
    summary = {"grid": str(grid), "a": a, "b": b, "modes": list(modes), "frames": frames,
               "steps": steps}
    report(StepReport(f"grid (rows: {', '.join(modes)}; image a, {frames} frames, image b): "
                      f"{grid}", metrics=summary), json_out)


@pdae_app.command("manipulate")
def manipulate_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    label: int = typer.Option(..., help="The attribute: images of this label."),
    scales: str = typer.Option("-2,-1,0,1,2", help="Edit scales s (z' = z + s·w, w unit in "
                               "normalised z)."),
    judge: Path = typer.Option(..., help="A clean judge (guidekit train judge)."),
    n: int = typer.Option(16, help="Held-out images (label != N) to edit."),
    steps: int = STEPS_OPT,
    seed: int = typer.Option(0, help="Seed of the logistic regression."),
    out_dir: Path = typer.Option(Path("runs/pdae_manipulate"), help="Where grid.png goes."),
    image_size: int = SIZE_OPT,
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Attribute manipulation: a linear probe on z finds the direction of a label; edit
    held-out images along it and let a judge say whether they moved toward it. Grid: one row
    per image, the original, then one column per scale."""
    from guidekit_classifier.training import JUDGE_KIND, load_classifier

    from .autoencoding import edit_held_out, load_images, manipulation_grid, manipulation_table
    from .training import load_pdae

    check_seed(seed)
    scale_list = parse_scales(scales)
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    model = load_pdae(pdae, pretrained, device)
    train = load_images(model, data, "train", image_size)
    test = load_images(model, data, "test", image_size)
    jdg = load_classifier(judge, JUDGE_KIND, model.device)
    result = edit_held_out(model, jdg, train, test, label, scale_list, n=n, steps=steps,
                           seed=seed, progress=not json_out)
    grid = manipulation_grid(result.pop("originals"), result.pop("images"), scale_list,
                             out_dir / "grid.png", title=f"Editing toward label {label}")
    result["grid"] = str(grid)
    report(StepReport(f"grid (rows: images; columns: original, s = {scales}): {grid}",
                      metrics=result, tables=manipulation_table(result)), json_out)


# --------------------------------------------------------------------------- analysis


def _first_held_out(model, data: str, n: int, image_size: int | None, seed: int):
    """The first ``n`` test images and, for a class-conditional DPM, their labels."""
    from .analysis import first_images, held_out

    images = held_out(model, data, image_size=image_size, seed=seed)
    x0 = first_images(images, n)
    return x0, model.labels(images, len(x0))


@pdae_app.command("gap")
def gap_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    timesteps: str = typer.Option(None, help="Comma-separated t in 1..T-1 (default: 1, T/100, "
                                  "T/40, T/20, every T/10, T-1)."),
    n: int = typer.Option(256, help="Test images to average over."),
    dpm: list[Path] = typer.Option([], "--dpm", help="Another DDPM checkpoint to measure on "
                                   "the same x_t (repeatable); a class-conditional one is "
                                   "given each image's true label. Same T, betas and image "
                                   "shape as the PDAE's DPM."),
    dpm_name: list[str] = typer.Option([], "--dpm-name", help="Names of the --dpm models, in "
                                       "order (repeatable; default: their folder names)."),
    image_size: int = SIZE_OPT,
    seed: int = SEED_OPT,
    out_dir: Path = typer.Option(None, help="Where gap.png goes (default: PDAE/analysis)."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Posterior mean gap per t of the pre-trained DPM and of PDAE, beside any other DPMs
    (--dpm) on the same held-out images, noise and t."""
    from guidekit import load_dpm

    from .analysis import (
        dpm_num_classes,
        first_images,
        gap_table,
        held_out,
        parse_timesteps,
        plot_gap,
        posterior_mean_gap,
    )
    from .training import load_pdae

    check_seed(seed)
    names = _dpm_names(dpm, dpm_name)
    model = load_pdae(pdae, pretrained, device)
    ts = parse_timesteps(timesteps, model.dpm.schedule.num_steps)
    others = {name: load_dpm(path, model.device) for name, path in zip(names, dpm, strict=True)}
    images = held_out(model, data, image_size=image_size, seed=seed)
    x0 = first_images(images, n)
    y = model.labels(images, len(x0))
    labels = None if images.labels is None else images.labels[: len(x0)]
    rows = posterior_mean_gap(model, x0, ts, seed=seed, y=y, dpms=others, labels=labels)
    kinds = {name: "class-conditional, true y" if dpm_num_classes(d) is not None
             else "unconditional" for name, d in others.items()}
    legend = {name: f"{name} ({kinds[name]}): μ_θ" for name in others}
    plot = plot_gap(rows, (out_dir or pdae / "analysis") / "gap.png",
                    f"Posterior mean gap, {len(x0)} held-out '{images.name}' images", legend)
    models = [{"name": name, "path": str(path), "kind": kinds[name]}
              for name, path in zip(names, dpm, strict=True)]
    compared = "".join(f"\n--dpm {m['name']}: {m['kind']}, {m['path']}" for m in models)
    report(StepReport(f"plot: {plot}{compared}", tables=gap_table(rows, len(x0)),
                      metrics={"n": len(x0), "timesteps": rows, "plot": str(plot),
                               "dpms": models}), json_out)


def _dpm_names(paths: list[Path], names: list[str]) -> list[str]:
    """The --dpm models' names: --dpm-name in order, else folder names; unique, and none
    of the fixed columns' names."""
    if names and len(names) != len(paths):
        raise GuidekitError(f"{len(names)} --dpm-name for {len(paths)} --dpm: give one name "
                            "per --dpm, or none to use their folder names")
    chosen = [n.strip() for n in names] if names else [Path(p).resolve().name for p in paths]
    taken = {"pretrained", "pre-trained", "pdae", "t"}
    for name in chosen:
        if not name:
            raise GuidekitError("--dpm-name must not be empty: name each --dpm")
        if name.lower() in taken:
            raise GuidekitError(f"the --dpm name '{name}' is already a column (or repeats "
                                "another): give distinct names with --dpm-name")
        taken.add(name.lower())
    return chosen


@pdae_app.command("onestep")
def onestep_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    timesteps: str = typer.Option(None, help="Comma-separated t in 0..T-1 (default: T/10, "
                                  "3T/10, ..., 9T/10: 100,300,500,700,900 for T = 1000)."),
    n: int = typer.Option(8, help="Test images (one grid column each)."),
    image_size: int = SIZE_OPT,
    seed: int = SEED_OPT,
    out_dir: Path = typer.Option(None, help="Where onestep.png goes (default: PDAE/analysis)."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """x̂_0 from x_t in one step, pre-trained vs PDAE."""
    from .analysis import one_step_x0, onestep_grid, onestep_table, parse_timesteps
    from .training import load_pdae

    check_seed(seed)
    model = load_pdae(pdae, pretrained, device)
    ts = parse_timesteps(timesteps, model.dpm.schedule.num_steps, minimum=0)
    x0, y = _first_held_out(model, data, n, image_size, seed)
    result = one_step_x0(model, x0, ts, seed=seed, y=y)
    grid = onestep_grid(x0, result, (out_dir or pdae / "analysis") / "onestep.png",
                        title=f"One-step x̂_0 from x_t, held-out '{data}'")
    summary = {"n": len(x0), "mse_scale": "[0, 1]", "timesteps": result["rows"],
               "grid": str(grid)}
    report(StepReport(f"grid (row 1 the originals, then per t: x_t / pre-trained x̂_0 / PDAE "
                      f"x̂_0): {grid}", metrics=summary,
                      tables=onestep_table(result["rows"], len(x0))), json_out)


@pdae_app.command("probe")
def probe_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    image_size: int = SIZE_OPT,
    seed: int = SEED_OPT,
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Linear-probe accuracy (or R²) of z against raw pixels and a random encoder."""
    from .analysis import held_out, linear_probe, probe_table, probe_targets
    from .training import load_pdae

    check_seed(seed)
    model = load_pdae(pdae, pretrained, device)
    train = held_out(model, data, "train", image_size, seed)
    probe_targets(train)  # fail before encoding anything
    result = linear_probe(model, train, held_out(model, data, "test", image_size, seed),
                          seed=seed)
    report(StepReport("", metrics=result, tables=probe_table(result, data)), json_out)


# --------------------------------------------------------------------------- generation


@pdae_app.command("sample")
def sample_command(
    pdae: Path = PDAE_OPT,
    latent_dpm: Path = typer.Option(..., help="Its latent DPM (guidekit train pdae-latent)."),
    n: int = typer.Option(64, help="Number of images."),
    steps: int = typer.Option(100, help="DDIM steps of the image decoding."),
    latent_steps: int = typer.Option(100, help="DDIM steps of the latent DPM."),
    seed: int = typer.Option(0, help="Seed of the latent noise (x_T uses seed + 1)."),
    out: Path = typer.Option(None, help="Grid PNG (default: LATENT_DPM/samples.png); the "
                             "latents go beside it as .safetensors."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Generate new images: z from the latent DPM, decoded by DDIM with PDAE guidance."""
    from guidekit import save_image_grid

    from .guidance import save_latents
    from .latent import load_latent_dpm, sample_pdae
    from .training import load_pdae

    check_seed(seed)
    loaded = load_pdae(pdae, device=device)
    latent = load_latent_dpm(latent_dpm, loaded, loaded.device)
    res = sample_pdae(loaded, latent, n, steps=steps, latent_steps=latent_steps, seed=seed,
                      progress=not json_out)
    grid = out or latent_dpm / "samples.png"
    summary = {
        "grid": str(save_image_grid(res["images"], grid, scale=4,
                                    title=f"PDAE samples: z by DDIM-{latent_steps}, decoded "
                                    f"by DDIM-{steps}")),
        "latents": str(save_latents(res["z"], Path(grid).with_suffix(".safetensors"), loaded)),
        "n": n, "steps": steps, "latent_steps": latent_steps, "seed": seed,
        "latent_seconds": res["latent_seconds"], "decode_seconds": res["decode_seconds"],
    }
    stages = [
        {"stage": "latent DPM → z", "DDIM steps": str(latent_steps),
         "seconds": f"{res['latent_seconds']:.2f}"},
        {"stage": "z → image (PDAE-guided)", "DDIM steps": str(steps),
         "seconds": f"{res['decode_seconds']:.2f}"},
    ]
    report(StepReport("", metrics=summary, tables={f"{n} PDAE samples": stages},
                      text=f"grid: {summary['grid']}\nlatents: {summary['latents']}"), json_out)


@pdae_app.command("fewstep")
def fewstep_command(
    pdae: Path = PDAE_OPT,
    latent_dpm: Path = typer.Option(..., help="Its latent DPM (guidekit train pdae-latent)."),
    judge: Path = typer.Option(..., help="A clean judge on the same data (guidekit train "
                               "judge): its features score the samples."),
    pretrained: Path = PRETRAINED_OPT,
    steps: str = typer.Option(None, help="Comma-separated DDIM step counts (default: "
                              "10,20,50,100)."),
    n: int = typer.Option(500, help="Samples per method and step count."),
    latent_steps: int = typer.Option(100, help="DDIM steps of the latent DPM (z is drawn once "
                                     "and reused at every step count)."),
    k: int = typer.Option(5, help="Neighbours of the precision / recall balls."),
    data: str = DATA_OPT,
    image_size: int = SIZE_OPT,
    seed: int = typer.Option(0, help="Seed of the latent noise (x_T uses seed + 1)."),
    out_dir: Path = typer.Option(Path("runs/pdae_fewstep"), help="Where fewstep.png and "
                                 "grid.png go."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Few-step generation: FD (judge features) of plain DDIM vs PDAE at each step count,
    from the same x_T, against held-out images (up to --n of the test split)."""
    from guidekit.data import check_output_dir

    from .analysis import held_out
    from .fewstep import fewstep_generation, fewstep_grid, fewstep_table, parse_steps, plot_fewstep
    from .latent import load_latent_dpm
    from .training import load_pdae

    try:  # the judge and its feature-space metrics live in the classifier plugin
        import guidekit_classifier.quality  # noqa: F401 -- fewstep_generation's metrics
        from guidekit_classifier.training import JUDGE_KIND, load_classifier
    except ImportError as exc:
        raise GuidekitError(f"pdae fewstep needs the classifier plugin for its judge and FD "
                            f"({exc}): install guidekit with guidekit_classifier") from None

    check_seed(seed)
    out = check_output_dir(out_dir)
    model = load_pdae(pdae, pretrained, device)
    model.require_unconditional("pdae fewstep")
    step_list = parse_steps(steps, model.dpm.schedule.num_steps)
    latent = load_latent_dpm(latent_dpm, model, model.device)
    jdg = load_classifier(judge, JUDGE_KIND, model.device)
    real = held_out(model, data, "test", image_size, seed).images[:n]
    result = fewstep_generation(model, latent, jdg, real, steps=step_list, n=n,
                                latent_steps=latent_steps, seed=seed, k=k,
                                progress=not json_out)
    result["grid"] = str(fewstep_grid(result, out / "grid.png"))
    result.pop("images")
    result["plot"] = str(plot_fewstep(result, out / "fewstep.png"))
    report(StepReport(f"plot: {result['plot']}\ngrid (rows: DDIM-K / PDAE-K): {result['grid']}",
                      metrics=result, tables=fewstep_table(result)), json_out)
