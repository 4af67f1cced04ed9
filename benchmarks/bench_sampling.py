"""images/s of DDIM-50 sampling, eager vs compiled, with host syncs per step, for three workloads.

Each workload runs through guidekit's public sampling functions (no re-implementation):

1. ``unguided``: ``guidekit.sample(dpm, B, sampler="ddim", steps=K, seed=1)``;
2. ``classifier``: ``guidekit_classifier.evaluate.guided_samples(dpm, clf, classes, 16, steps=K)``,
   i.e. ``dpm.sampler(...).sample("ddim", guidance=[ClassifierGuidance])`` at the quickstart's
   scale (``QS_SCALE``), classes cycling 0..9;
3. ``pdae``: ``guidekit_pdae.latent.decode_latents(pdae, z, steps=K)``: DDIM from random x_T
   with the ε-form ``PDAEGuidance`` (G_ψ toward z, scale 1), z = E_φ(random images).

Networks: by default the quickstart's digits shapes with ``torch.manual_seed(0)`` weights whose
zero-initialised layers are filled (``bench_adm.fill_zero_layers``) so ε, the classifier's
gradient and G_ψ are non-trivial: ``UNetConfig(image_size=16, in_channels=1, model_channels=32)``,
the classifier ``default_config(digits, **QS_CLASSIFIER)``, the PDAE encoder/estimator of
``train_pdae``'s defaults (32 channels, latent 64). ``--dpm``, ``--classifier``, ``--pdae``
load trained checkpoints instead.

"compiled" is what guidekit offers plus the networks: the Sampler's step ops with
``compile=True`` (``torch.compile(fullgraph=True)`` of ``ops.ddim_step`` & co., the switch
``guidekit.sample(compile=True)`` sets), and ``torch.compile(dynamic=False)`` of the UNet's two
halves ``down`` and ``middle_up`` (compiled separately so the sampler still hands the down-path
features to guidances: PDAE's G_ψ reads them), of the classifier's forward (its backward
through AOTAutograd) and of G_ψ. Guidance code (log-softmax, autograd.grad, composing) and the
sampling loop stay eager. The first compiled run (compilation included) is timed apart and
not counted; compile s ≈ first run − median run.

Measured per workload and mode: a warm-up run, then ``--repeats`` timed runs alternating eager
and compiled; median s per run, images/s, ms per sampling step, compiled/eager speedup. Host
syncs per step, each with the source line that made it: eager with
``bench_diffusers.HostReadCounter`` (a TorchDispatchMode, at ``--sync-batch``; dynamo refuses
to run compiled code under one) and in both modes with torch's profiler (the same reads,
found as ``aten::_local_scalar_dense`` / ``nonzero`` / ``equal`` / ``masked_select`` events,
and host-device copies on CUDA); on CUDA also ``torch.cuda.set_sync_debug_mode``, torch's
own flag on every synchronising call, which the table then shows. The
compiled samples must equal the eager ones within ``allclose(rtol=RTOL, atol=ATOL)``, else a
``FAILED:`` line and exit status 1.

    python benchmarks/bench_sampling.py                      # batch 64, DDIM-50, 3 workloads
    python benchmarks/bench_sampling.py --tiny               # smoke run: tiny nets, batch 4
    python benchmarks/bench_sampling.py --only pdae --repeats 5 --threads 1
    python benchmarks/bench_sampling.py --no-compile --json > sampling.json
    python benchmarks/bench_sampling.py --dpm runs/ddpm --classifier runs/classifier \\
        --pdae runs/pdae --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_adm import fill_zero_layers  # this folder is on sys.path when run as a script
from bench_diffusers import count_syncs, dynamo_graphs, load_warnings, one_line
from bench_step import cuda_missing, machine_info
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from guidekit.checkpoint import Checkpoint
from guidekit.ddpm import DPM
from guidekit.unet import ClassifierConfig, UNet, UNetConfig

WORKLOADS = ("unguided", "classifier", "pdae")
MODES = ("eager", "compiled")
SEED_WEIGHTS, SEED_SAMPLE, SEED_LATENT = 0, 1, 2
# compiled vs eager samples (clamped to [-1, 1]) after K steps: float32 re-association in the
# compiled networks and step ops (≈1e-6 per step) is amplified by the DDIM recursion and, in
# the classifier workload, by the scale-16 gradient; measured max |Δ| is ≤ ~1e-4 (see README).
RTOL, ATOL = 1e-3, 1e-3


@dataclasses.dataclass(frozen=True)
class Sizes:
    unet: UNetConfig
    classifier: dict[str, Any]  # overrides of guidekit_classifier's default_config
    encoder_channels: int
    latent_dim: int
    batch: int
    steps: int
    repeats: int


FULL = Sizes(UNetConfig(image_size=16, in_channels=1, model_channels=32), {},
             encoder_channels=32, latent_dim=64, batch=64, steps=50, repeats=3)
# --tiny: 20k-53k parameters per network (attention kept, one level less).
TINY = Sizes(
    UNetConfig(image_size=16, in_channels=1, model_channels=8, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(8,), num_heads=1),
    {"model_channels": 8, "channel_mult": (1, 2)},
    encoder_channels=8, latent_dim=8, batch=4, steps=10, repeats=2)


# --------------------------------------------------------------------------- models


class CompiledUNet:
    """A UNet whose halves ``down`` and ``middle_up`` are each ``torch.compile``d.

    ``torch.compile(unet)`` would not do: its module forwards ``down``/``middle_up`` (which the
    Sampler calls on any SplitModel) to the eager UNet. This is a SplitModel itself, so the
    step's down-path features still reach guidances that read them (PDAE)."""

    def __init__(self, unet: UNet) -> None:
        self.unet = unet
        self.config = unet.config  # guidekit.sample reads num_classes
        self.down = torch.compile(unet.down, dynamic=False)
        self.middle_up = torch.compile(unet.middle_up, dynamic=False)

    def parameters(self) -> Iterator[torch.nn.Parameter]:  # samplers find the device here
        return self.unet.parameters()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                 ) -> torch.Tensor:
        return self.middle_up(self.down(x, t, y))


@dataclasses.dataclass
class CompiledDPM(DPM):
    """A DPM whose samplers compile their step ops (``Sampler(compile=True)``), so public
    functions without a compile switch (``guided_samples``, ``decode_latents``) get it too."""

    def sampler(self, **kwargs: Any) -> Any:
        kwargs.setdefault("compile", True)
        return super().sampler(**kwargs)


def random_dpm(cfg: UNetConfig, device: torch.device) -> DPM:
    """A DPM on the default linear schedule (T = 1000) with seeded, filled random weights."""
    from guidekit.schedule import NoiseSchedule, ScheduleConfig

    torch.manual_seed(SEED_WEIGHTS)
    unet = fill_zero_layers(UNet(cfg)).to(device).eval().requires_grad_(False)
    config = {"data": {"channels": cfg.in_channels, "image_size": cfg.image_size}}
    return DPM(unet, NoiseSchedule.from_config(ScheduleConfig()).to(device),
               Checkpoint(Path("(random init)"), config))


def load_or_random_dpm(path: Path | None, sizes: Sizes, device: torch.device) -> DPM:
    from guidekit.ddpm import load_dpm
    from guidekit.errors import GuidekitError

    if path is None:
        return random_dpm(sizes.unet, device)
    dpm = load_dpm(path, device)
    if getattr(getattr(dpm.model, "config", None), "num_classes", None) is not None:
        raise GuidekitError(f"--dpm {path} is class-conditional: this benchmark samples "
                            "unconditional DPMs (the quickstart's)")
    return dpm


def load_or_random_classifier(path: Path | None, dpm: DPM, sizes: Sizes,
                              device: torch.device) -> Any:
    from guidekit_classifier import QS_CLASSIFIER
    from guidekit_classifier.training import (
        LoadedClassifier,
        check_compatible,
        default_config,
        load_classifier,
    )

    from guidekit.data import ImageData
    from guidekit.errors import GuidekitError
    from guidekit.unet import EncoderUNet

    c, s, _ = dpm.image_shape
    if path is not None:
        clf = load_classifier(path, device=device)
        if "schedule" in dpm.config:  # a loaded DPM: the classifier must share its schedule
            check_compatible(clf, dpm.config)
        elif clf.image_shape != dpm.image_shape:
            raise GuidekitError(f"--classifier {path} takes {clf.image_shape} images, the "
                                f"DPM makes {dpm.image_shape}")
        return clf
    # default_config reads only the data's shape and class count: the digits' (10 classes)
    shape_only = ImageData("digits", torch.zeros(1, c, s, s), torch.zeros(1, dtype=torch.long),
                           10)
    cfg: ClassifierConfig = default_config(shape_only, **{**QS_CLASSIFIER, **sizes.classifier})
    torch.manual_seed(SEED_WEIGHTS)
    model = fill_zero_layers(EncoderUNet(cfg)).to(device).eval().requires_grad_(False)
    return LoadedClassifier(model, {}, cfg.num_classes, (c, s, s), None)


def load_or_random_pdae(path: Path | None, dpm_path: Path | None, dpm: DPM, sizes: Sizes,
                        device: torch.device) -> Any:
    from guidekit_pdae.networks import (
        Encoder,
        EncoderConfig,
        EstimatorConfig,
        GradientEstimator,
        PDAEModel,
    )
    from guidekit_pdae.training import LoadedPDAE, _encoder_levels, fingerprint, load_pdae

    if path is not None:
        return load_pdae(path, dpm_path, device)
    c, s, _ = dpm.image_shape
    torch.manual_seed(SEED_WEIGHTS)
    enc = Encoder(EncoderConfig(image_size=s, in_channels=c, channels=sizes.encoder_channels,
                                channel_mult=_encoder_levels(s), latent_dim=sizes.latent_dim))
    est = fill_zero_layers(GradientEstimator(EstimatorConfig(dpm.model.config,
                                                             sizes.latent_dim)))
    model = PDAEModel(dpm.model, enc, est).to(device).eval().requires_grad_(False)
    return LoadedPDAE(dpm, model, {}, Path("(random init)"), fingerprint(enc, est))


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass
class Workload:
    name: str
    what: str  # the public call
    # (mode, batch) -> one sampling run; call once per mode (each call compiles afresh)
    make: Callable[[str, int], Callable[[], torch.Tensor]]


def compiled_dpm(dpm: DPM, cache: dict[int, Any]) -> CompiledDPM:
    """``dpm`` with its network compiled, once per network (the workloads share it): a UNet
    as a CompiledUNet, any other model whole."""
    from guidekit.engine import SplitModel

    key = id(dpm.model)
    if key not in cache:
        cache[key] = (CompiledUNet(dpm.model) if isinstance(dpm.model, SplitModel)
                      else torch.compile(dpm.model, dynamic=False))
    return CompiledDPM(cache[key], dpm.schedule, dpm.checkpoint)


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def build_workloads(names: list[str], args: argparse.Namespace, sizes: Sizes,
                    device: torch.device) -> tuple[dict[str, Workload], dict[str, int]]:
    """The networks, built (or loaded) once, and per workload a factory of sampling runs;
    also each network's parameter count."""
    from guidekit.sampling import sample

    k = sizes.steps
    dpm = load_or_random_dpm(args.dpm, sizes, device)
    params = {"unet": count_params(dpm.model)}
    cache: dict[int, Any] = {}
    out: dict[str, Workload] = {}
    if "unguided" in names:
        def unguided(mode: str, b: int) -> Callable[[], torch.Tensor]:
            d = dpm if mode == "eager" else compiled_dpm(dpm, cache)
            return lambda: sample(d, b, sampler="ddim", steps=k, seed=SEED_SAMPLE,
                                  compile=mode == "compiled")

        out["unguided"] = Workload(
            "unguided", f"guidekit.sample(dpm, B, sampler='ddim', steps={k}, compile=…)",
            unguided)
    if "classifier" in names:
        from guidekit_classifier import QS_SCALE
        from guidekit_classifier.evaluate import guided_samples

        clf = load_or_random_classifier(args.classifier, dpm, sizes, device)
        params["classifier"] = count_params(clf.model)

        def guided(mode: str, b: int) -> Callable[[], torch.Tensor]:
            d, c = dpm, clf
            if mode == "compiled":
                d = compiled_dpm(dpm, cache)
                c = dataclasses.replace(clf, model=torch.compile(clf.model, dynamic=False))
            classes = torch.arange(b) % clf.num_classes
            return lambda: guided_samples(d, c, classes, QS_SCALE, steps=k, seed=SEED_SAMPLE)

        out["classifier"] = Workload(
            "classifier", f"guided_samples(dpm, clf, classes, scale={QS_SCALE:g}, steps={k})",
            guided)
    if "pdae" in names:
        from guidekit_pdae.latent import decode_latents
        from guidekit_pdae.networks import PDAEModel

        pdae = load_or_random_pdae(args.pdae, args.dpm, dpm, sizes, device)
        params["pdae_encoder"] = count_params(pdae.model.encoder)
        params["pdae_estimator"] = count_params(pdae.model.estimator)
        gen = torch.Generator().manual_seed(SEED_LATENT)
        images = torch.rand((sizes.batch, *pdae.dpm.image_shape), generator=gen) * 2 - 1
        z_all = pdae.encode(images)

        def decode(mode: str, b: int) -> Callable[[], torch.Tensor]:
            p = pdae
            if mode == "compiled":
                m = pdae.model
                est = torch.compile(m.estimator, dynamic=False)
                p = dataclasses.replace(pdae, dpm=compiled_dpm(pdae.dpm, cache),
                                        model=PDAEModel(m.unet, m.encoder, est))
            z = z_all[:b]
            return lambda: decode_latents(p, z, steps=k, seed=SEED_SAMPLE)

        out["pdae"] = Workload("pdae", f"decode_latents(pdae, z, steps={k})", decode)
    return out, params


# --------------------------------------------------------------------------- sync counting


@contextlib.contextmanager
def quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 (kineto writes a line to it at each profiler start/stop)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


SYNC_EVENTS = {"aten::_local_scalar_dense": "_local_scalar_dense", "aten::nonzero": "nonzero",
               "aten::equal": "equal", "aten::masked_select": "masked_select"}
FRAME = re.compile(r"^(?P<path>.+)\((?P<line>\d+)\): (?P<func>.+)$")


def _frame_site(name: str) -> str | None:
    """``path:line (func)`` of a profiler Python-frame event outside torch and this file, else
    None. The profiler names a frame by its function's first line, not the calling line."""
    m = FRAME.match(name)
    if m is None:
        return None
    path = m["path"].replace(os.sep, "/")
    if (path.startswith("torch/") or "/torch/" in path or "torchinductor" in path
            or path.endswith(Path(__file__).name)):
        return None
    return f"{'/'.join(path.split('/')[-2:])} ({m['func']}, def line {m['line']})"


def profile_syncs(run: Callable[[], Any], steps: int, batch: int,
                  device: torch.device) -> dict[str, Any]:
    """Host reads during one call of ``run``, found in torch's profiler trace.

    Counts the outermost ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ...), ``nonzero``
    (inside ``aten::index``: ``index (bool mask)``), ``equal`` and ``masked_select`` events,
    and on CUDA each device-to-host memcpy and each from pageable host memory (torch waits
    for a blocking copy; ``torch.tensor(x, device=...)`` makes one) outside those. Unlike a
    TorchDispatchMode it sees into compiled code; it does not record which device a tensor
    was on, so on CUDA a read of a CPU tensor is counted too. It works on kineto's raw
    events: ``prof.events()`` builds a Python tree of every op (minutes for one run).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, with_stack=True)
    t0 = time.perf_counter()
    with quiet_stderr_fd():
        prof.__enter__()
    try:
        run()
        sync(device)
    finally:
        with quiet_stderr_fd():
            prof.__exit__(None, None, None)
    # parents before children: by start, the longer first
    raw = sorted(prof.profiler.kineto_results.events(),
                 key=lambda e: (e.start_ns(), -e.end_ns()))
    cpu = [(e.name(), e.start_ns(), e.end_ns(), e.start_thread_id(), e.correlation_id())
           for e in raw if e.device_type() == DeviceType.CPU]
    launched = {c[4]: i for i, c in enumerate(cpu) if c[4] and c[0].startswith("cuda")}
    found: dict[int, str] = {i: SYNC_EVENTS[c[0]] for i, c in enumerate(cpu)
                             if c[0] in SYNC_EVENTS}
    for e in raw:  # CUDA memcpys, at the CPU runtime call that launched them
        name, i = e.name(), launched.get(e.correlation_id())
        if i is None or "Memcpy" not in name:
            continue
        if "DtoH" in name:
            found[i] = "d2h copy"
        elif "HtoD" in name and "Pageable" in name:
            found[i] = "h2d copy (pageable)"
    # one pass with a stack of open events per thread gives each found event its ancestors
    ancestors: dict[int, list[str]] = {}
    stacks: dict[int, list[int]] = {}
    for i, (_, start, _, tid, _) in enumerate(cpu):
        stack = stacks.setdefault(tid, [])
        while stack and cpu[stack[-1]][2] <= start:
            stack.pop()
        if i in found:
            ancestors[i] = [cpu[j][0] for j in reversed(stack)]  # innermost first
        stack.append(i)
    counts: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    for i, what in found.items():
        names = ancestors.get(i, [])
        if any(n in SYNC_EVENTS for n in names):  # masked_select → item → … is one read
            continue
        aten = next((n for n in names if n.startswith("aten::")), None)
        if what == "nonzero" and aten == "aten::index":
            what = "index (bool mask)"
        site = next((s for n in names if (s := _frame_site(n)) is not None), "?")
        counts[what] += 1
        sites[f"{what} at {site}"] += 1
    total = sum(counts.values())
    return {"method": "profiler", "batch": batch, "steps": steps, "total": total,
            "per_step": total / steps, "by_op": dict(sorted(counts.items())),
            "sites": [{"site": s, "count": n} for s, n in sites.most_common()],
            "run_s": time.perf_counter() - t0}


def python_site() -> str:
    """The innermost frame of the current stack outside torch, ``warnings`` and this file."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace(os.sep, "/")
        if ("/torch/" in path or path.endswith("/warnings.py")
                or os.path.abspath(frame.filename) == here):
            continue
        return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


def cuda_sync_debug(run: Callable[[], Any], steps: int, batch: int) -> dict[str, Any]:
    """The CUDA synchronisations of one call of ``run``, as torch itself flags them
    (``torch.cuda.set_sync_debug_mode("warn")``: a warning at every synchronising call,
    compiled code included). CUDA only; the exact measure there."""
    counts: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    shown = warnings.showwarning

    def hook(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            shown(message, category, filename, lineno, file, line)
            return
        counts["cuda sync"] += 1
        sites[f"cuda sync at {python_site()}"] += 1

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    total = sum(counts.values())
    return {"method": "cuda_sync_debug", "batch": batch, "steps": steps, "total": total,
            "per_step": total / steps, "by_op": dict(counts),
            "sites": [{"site": s, "count": n} for s, n in sites.most_common()],
            "run_s": time.perf_counter() - t0}


def every_step(counted: dict[str, Any]) -> float:
    """Reads per step at the sites that read at least once per step (the rest, e.g. one
    divergence check per run, do not grow with the step count)."""
    k = counted["steps"]
    return sum(s["count"] for s in counted["sites"] if s["count"] >= k) / k


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(w: Workload, sizes: Sizes, modes: tuple[str, ...], sync_batch: int,
            device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    """A first run per mode (the warm-up; compilation for the compiled mode), sync counts,
    then ``sizes.repeats`` timed rounds alternating the modes: one workload's figures."""
    b, k = sizes.batch, sizes.steps
    res: dict[str, Any] = {"call": w.what, "modes": {}, "syncs": {}}
    outs: dict[str, torch.Tensor] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for mode in modes:
        say(f"{w.name} {mode}: first run{' (compiles)' if mode == 'compiled' else ''} ...")
        try:
            calls[mode] = w.make(mode, b)
            first_s, outs[mode] = timed(calls[mode], device)
        except Exception as exc:  # noqa: BLE001 -- a mode that cannot run is a result
            res["modes"][mode] = {"error": one_line(exc)}
            calls.pop(mode, None)
            continue
        res["modes"][mode] = {"first_run_s": first_s}

    graphs_before = dynamo_graphs()
    for mode in calls:
        # A read is per op call, not per element, so eager counts at a small batch (under a
        # dispatch mode every op is a Python call); the compiled run counts at the timed
        # batch, since another batch would compile afresh.
        run, nb = ((w.make(mode, sync_batch), sync_batch) if mode == "eager"
                   else (calls[mode], b))
        say(f"{w.name} {mode}: counting host syncs (batch {nb}) ...")
        counted: dict[str, Any] = {}
        if mode == "eager":  # dynamo will not run compiled code under a TorchDispatchMode
            try:
                counted["dispatch_mode"] = {"method": "HostReadCounter",
                                            **count_syncs(run, k, nb)}
            except Exception as exc:  # noqa: BLE001
                counted["dispatch_mode"] = {"error": one_line(exc)}
        try:
            counted["profiler"] = profile_syncs(run, k, nb, device)
        except Exception as exc:  # noqa: BLE001
            counted["profiler"] = {"error": one_line(exc)}
        if device.type == "cuda":
            try:
                counted["cuda_sync_debug"] = cuda_sync_debug(run, k, nb)
            except Exception as exc:  # noqa: BLE001
                counted["cuda_sync_debug"] = {"error": one_line(exc)}
        for c in counted.values():
            if "error" not in c:
                c["every_step"] = every_step(c)
                c["sites"] = c["sites"][:10]
        res["syncs"][mode] = counted
        h = headline(counted)
        if h is not None and mode in res["modes"]:
            res["modes"][mode].update(syncs_per_step=h["per_step"],
                                      every_step_syncs=h["every_step"], syncs_method=h["method"])
    # a recompilation here would have been counted (tracing runs ops on fake tensors)
    res["graphs_compiled_in_sync_counts"] = dynamo_graphs() - graphs_before
    eager = res["syncs"].get("eager", {})
    if all("total" in eager.get(m, {}) for m in ("dispatch_mode", "profiler")):
        # the profiler is what counts compiled runs: on eager it must match the dispatch mode
        res["sync_methods_agree"] = (eager["dispatch_mode"]["total"]
                                     == eager["profiler"]["total"])

    seconds: dict[str, list[float]] = {m: [] for m in calls}
    graphs_before = dynamo_graphs()
    for r in range(sizes.repeats):
        for mode in calls:
            say(f"{w.name} round {r + 1}/{sizes.repeats}: {mode} ...")
            s, _ = timed(calls[mode], device)
            seconds[mode].append(s)
    res["graphs_compiled_in_rounds"] = dynamo_graphs() - graphs_before

    for mode, secs in seconds.items():
        med = statistics.median(secs)
        row = res["modes"][mode]
        row.update(seconds=secs, median_s=med, images_per_s=b / med,
                   ms_per_step=1000 * med / k)
        if mode == "compiled":
            row["compile_s"] = max(row["first_run_s"] - med, 0.0)
    e, c = res["modes"].get("eager", {}), res["modes"].get("compiled", {})
    if "images_per_s" in e and "images_per_s" in c:
        res["speedup"] = c["images_per_s"] / e["images_per_s"]
    if "eager" in outs and "compiled" in outs:
        a, ref = outs["compiled"].double(), outs["eager"].double()
        diff = (a - ref).abs()
        res["agreement"] = {
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / ref.abs().max().clamp(min=1e-30)),
            "rtol": RTOL, "atol": ATOL,
            "ok": bool(torch.allclose(a, ref, rtol=RTOL, atol=ATOL)),
        }
    # how much of the eager samples the clamp to [-1, 1] pins: a saturated sample compares
    # nothing, so this says how informative the agreement check is
    if "eager" in outs:
        res["eager_saturated_fraction"] = float((outs["eager"].abs() >= 1).double().mean())
    return res


# --------------------------------------------------------------------------- reporting


HEADLINE = ("cuda_sync_debug", "dispatch_mode", "profiler")


def headline(mode_syncs: dict[str, Any]) -> dict[str, Any] | None:
    """The count a mode's 'syncs/step' column shows: on CUDA torch's own sync flag, else the
    dispatch mode's where it ran (eager), else the profiler's."""
    for key in HEADLINE:
        c = mode_syncs.get(key)
        if c is not None and "error" not in c:
            return c
    return None


def print_tables(console: Console, result: dict[str, Any]) -> None:
    m, c = result["machine"], result["config"]
    load = m.get("loadavg_start")
    console.print(
        f"guidekit sampling benchmark — torch {m['torch']}, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch threads {m['threads']} on {m['cpus']} CPUs ({m['processor']}); "
        f"1-min load average {load} at start, {m.get('loadavg_end')} at end; "
        f"batch {c['batch']}, DDIM-{c['steps']}, {c['repeats']} timed runs per mode, "
        f"{'tiny' if c['tiny'] else 'quickstart-size'} networks ("
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in c.get("params", {}).items())
        + f" parameters), wall {result['wall_s']:.0f} s",
        markup=False,
    )
    for w in load_warnings(m):
        console.print(w, style="yellow", markup=False)
    t = Table(title=f"DDIM-{c['steps']} sampling at batch {c['batch']}: median over "
                    f"{c['repeats']} runs (modes alternate)")
    cols = ("workload", "mode", "images/s", "ms/step", "s/run", "runs (s)", "first run s",
            "compile s", "speedup", "syncs/step", "every-step", "max |Δ| vs eager")
    for col in cols:
        t.add_column(col, justify="left" if col in ("workload", "mode", "runs (s)")
                     else "right")
    for name, w in result["workloads"].items():
        if "error" in w:
            t.add_row(name, "", escape(w["error"]), style="red")
            continue
        for mode, row in w["modes"].items():
            if "error" in row:
                t.add_row(name, mode, escape(row["error"]), style="red")
                continue
            h = headline(w["syncs"].get(mode, {}))
            agree = w.get("agreement") if mode == "compiled" else None
            t.add_row(
                name, mode, f"{row['images_per_s']:.1f}", f"{row['ms_per_step']:.1f}",
                f"{row['median_s']:.2f}", ", ".join(f"{s:.2f}" for s in row["seconds"]),
                f"{row['first_run_s']:.1f}",
                f"{row['compile_s']:.1f}" if "compile_s" in row else "",
                f"{w['speedup']:.2f}x" if mode == "compiled" and "speedup" in w else "",
                f"{h['per_step']:.2f}" if h else "?",
                f"{h['every_step']:.2f}" if h else "?",
                (f"{agree['max_abs_diff']:.1e} {'ok' if agree['ok'] else 'FAIL'}"
                 if agree else ""),
            )
    console.print(t)
    sat = {n: w["eager_saturated_fraction"] for n, w in result["workloads"].items()
           if "eager_saturated_fraction" in w}
    if sat:
        console.print("share of eager sample values at ±1 (clamped, so equal in any run): "
                      + ", ".join(f"{n} {f:.0%}" for n, f in sat.items()), markup=False)
    console.print(
        "syncs/step: host reads in one run ÷ steps (eager: bench_diffusers.HostReadCounter; "
        "compiled: torch profiler events); every-step: only the sites that read at least once "
        "per step. max |Δ|: compiled vs eager samples, allclose(rtol="
        f"{RTOL:g}, atol={ATOL:g}). compile s ≈ first run − median run. compiled = "
        f"{c['compiled']}", markup=False)

    st = Table(title="host reads in one sampling run, by method")
    for col in ("workload", "mode", "method", "batch", "total", "per step", "every-step",
                "by op [device]"):
        st.add_column(escape(col), justify="right" if col in (
            "batch", "total", "per step", "every-step") else "left")
    for name, w in result["workloads"].items():
        for mode, counted in w.get("syncs", {}).items():
            for method, s in counted.items():
                if "error" in s:
                    st.add_row(name, mode, method, "", "", "", "", escape(s["error"]),
                               style="red")
                    continue
                ops = ", ".join(f"{k} × {n}" for k, n in s["by_op"].items()) or "none"
                st.add_row(name, mode, method, str(s["batch"]), str(s["total"]),
                           f"{s['per_step']:.2f}",
                           f"{s['every_step']:.2f}", escape(ops))
    console.print(st)
    console.print("where (the method in the syncs/step column; profiler sites name the "
                  "function, at its def line):", markup=False)
    for name, w in result["workloads"].items():
        for mode, counted in w.get("syncs", {}).items():
            h = headline(counted)
            for row in (h or {}).get("sites", [])[:6]:
                console.print(f"  {name} {mode} ({h['method']}): {row['count']:>4} × "
                              f"{row['site']}", markup=False)
        if "sync_methods_agree" in w:
            console.print(f"  {name} eager: HostReadCounter and profiler totals "
                          f"{'agree' if w['sync_methods_agree'] else 'DIFFER'}", markup=False)
    for s in result["skipped"]:
        console.print(f"skipped: {s}", markup=False)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; tiny 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per mode, after one warm-up (default 3; tiny 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny networks, batch 4, 10 steps, 2 repeats: a smoke run")
    p.add_argument("--only", action="append", choices=WORKLOADS, default=None,
                   help="run this workload only (repeatable; default all three)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--sync-batch", type=int, default=4,
                   help="batch of the eager sync-counting runs (default 4: the count is per "
                        "op call, not per element; the compiled count runs at --batch)")
    p.add_argument("--dpm", type=Path, default=None,
                   help="a trained unconditional DPM checkpoint (default: random init)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="a trained noisy classifier checkpoint (default: random init)")
    p.add_argument("--pdae", type=Path, default=None,
                   help="a trained PDAE checkpoint (with --dpm: its frozen DPM; default: "
                        "random-init E_φ and G_ψ on the benchmark's DPM)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (tables go to stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = TINY if args.tiny else FULL
    sizes = dataclasses.replace(base, batch=args.batch or base.batch,
                                steps=args.steps or base.steps,
                                repeats=args.repeats or base.repeats)
    names = [w for w in WORKLOADS if args.only is None or w in args.only]
    modes = ("eager",) if args.no_compile else MODES
    sync_batch = min(args.sync_batch, sizes.batch)
    console = Console(stderr=args.json, width=160)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        console.print(f"{time.perf_counter() - t_start:6.0f} s  {msg}", style="dim",
                      markup=False)

    result: dict[str, Any] = {"machine": machine_info(device), "skipped": [], "failures": []}
    failures = result["failures"]
    m = result["machine"]
    say(f"1-min load average {m.get('loadavg_start')} on {m['cpus']} CPUs")
    for w in load_warnings(m):
        console.print(w, style="yellow", markup=False)
    result["config"] = {
        "tiny": args.tiny, "batch": sizes.batch, "steps": sizes.steps,
        "repeats": sizes.repeats, "sync_batch_eager": sync_batch, "device": str(device),
        "dtype": "float32",
        "workloads": names, "seeds": {"weights": SEED_WEIGHTS, "sampling": SEED_SAMPLE,
                                      "latents": SEED_LATENT},
        "dpm": str(args.dpm or "random init: " + repr(sizes.unet)),
        "classifier": str(args.classifier or "random init"),
        "pdae": str(args.pdae or "random init"), "rtol": RTOL, "atol": ATOL,
        "compiled": "none (--no-compile)" if args.no_compile else (
            "Sampler(compile=True) step ops (fullgraph) + torch.compile(dynamic=False) of "
            "UNet.down, UNet.middle_up, the classifier (forward; backward via AOTAutograd) "
            "and PDAE's G_ψ; guidance code and the loop eager"),
    }
    if args.no_compile:
        result["skipped"].append("compiled mode (--no-compile)")

    say("building the networks ...")
    workloads, result["config"]["params"] = build_workloads(names, args, sizes, device)
    result["workloads"] = {}
    for name, w in workloads.items():
        try:
            res = measure(w, sizes, modes, sync_batch, device, say)
        except Exception as exc:  # noqa: BLE001 -- report it, go on with the next workload
            res = {"error": one_line(exc)}
            failures.append(f"{name}: {res['error']}")
        result["workloads"][name] = res
        for mode, row in res.get("modes", {}).items():
            if "error" in row:
                failures.append(f"{name} {mode}: {row['error']}")
        agree = res.get("agreement")
        if agree is not None and not agree["ok"]:
            failures.append(f"{name}: compiled samples differ from eager by up to "
                            f"{agree['max_abs_diff']:.3e} (allclose rtol={RTOL:g}, "
                            f"atol={ATOL:g})")
        for key, what in (("graphs_compiled_in_rounds", "timed runs"),
                          ("graphs_compiled_in_sync_counts", "sync-counting runs")):
            if res.get(key):
                say(f"warning: {res[key]} graph(s) compiled during the {what} of {name}: a "
                    "recompilation")

    if hasattr(os, "getloadavg"):
        m["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = time.perf_counter() - t_start
    print_tables(console, result)
    for failure in failures:
        console.print(f"FAILED: {failure}", style="red", markup=False)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
