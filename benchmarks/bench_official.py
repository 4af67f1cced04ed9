"""Training-step throughput and peak memory of guidekit against the official PDAE code.

The official implementation (github ckczzj/PDAE) is imported at run time from a local
checkout given with ``--official PATH`` (its ``model/`` and ``diffusion/`` modules only; the
trainers, datasets and metrics are never imported). Both sides train the same configuration:
guidekit's quickstart digits (1×16×16, batch 32) with the default ``UNetConfig(image_size=16,
in_channels=1, model_channels=32)`` (1.37M parameters), timesteps 1000, linear β 1e-4..0.02.

Steps (each: loss forward, backward, AdamW update; lr 1e-4, weight decay 0):

1. ``ddpm``: ``guidekit.ddpm.DDPMTask`` (uniform λ) on guidekit's UNet vs the official
   ``model/unet.py`` ``UNet`` (what ``MNISTDenoiseFn`` aliases) with ``GaussianDiffusion.
   regular_train_one_batch``. The official network is built from ``config/mnist_regular.yml``
   with the widths, levels, attention and heads of guidekit's UNetConfig.
2. ``pdae``: ``guidekit_pdae.training.PDAETask`` (frozen UNet, ``Encoder``,
   ``GradientEstimator``; weighting ``pdae`` γ = 0.1) vs the official ``ShiftUNet`` +
   ``CELEBA64Encoder`` (its smallest encoder; stem and head resized to 1×16×16) with
   ``representation_learning_train_one_batch`` (λ_t = SNR^0.1/(1+SNR), hard-coded there).
3. ``classifier``: guidekit's noisy-classifier step (``guidekit_classifier.training.
   ClassifierTask``, the digits ``default_config``). The official code trains no noisy
   classifier, so this row has no official counterpart.

Rows (``--variants``, comma-separated): ``fp32`` guidekit eager float32; ``bf16`` guidekit
under ``torch.autocast(device, bfloat16)`` (what ``TrainConfig(bf16=True)`` does); ``compile``
guidekit bf16 with what ``TrainConfig(compile=True)`` compiles: ``torch.compile`` of each
trainable module and, for PDAE, of the frozen ε_θ's forward (``PDAETask.compile_frozen``).
Every guidekit row updates with the AdamW ``fit`` builds (``training.make_adamw``: fused
wherever torch has the kernel, CPU and CUDA). ``official`` is the official step in float32;
``official-bf16`` the official step under the same autocast; ``official-compile`` (not run
by default) the official step with bf16, ``torch.compile`` of what its runner compiles
(encoder and decoder / the denoise fn) and fused AdamW.

Method: every row runs in its own persistent child process (so its memory is its own); the
parent drives them through pipes. Per task, each child runs one first step (reported apart as
"first step s": compilation for ``compile`` rows) and ``--warmup`` − 1 more steps, then
``--rounds`` rounds of ``--steps`` timed steps alternate between the rows (A B C, then C B A,
...); ms/step is the median over rounds of the round's mean. Memory, CPU: the peak resident
set size during the timed steps (VmHWM, reset through /proc/self/clear_refs after warm-up)
minus the resident size just before the first step: what training adds (activations kept for
backward, gradients, optimiser state, and for compiled rows the compiler's resident state).
CUDA: ``max_memory_allocated`` during the timed steps minus ``memory_allocated`` before the
first step. Checks (exit status 1 and a ``FAILED:`` line): every loss finite, every trainable
group updated, frozen weights unchanged, and, with ``--official``, that guidekit's UNet given
the official UNet's weights reproduces its output and that both sides use the same schedule,
shift coefficient and PDAE weighting.

    python benchmarks/bench_official.py --official /path/to/PDAE       # all tasks, 5 rows each
    python benchmarks/bench_official.py                                 # guidekit rows only
    python benchmarks/bench_official.py --official PDAE --variants fp32,official --tasks pdae
    python benchmarks/bench_official.py --official PDAE --json > official.json  # tables: stderr
    python benchmarks/bench_official.py --official PDAE --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_adm import _reset_peak, _status_kib, fill_zero_layers  # this folder is on sys.path
from bench_diffusers import load_warnings, one_line
from bench_step import cpu_model
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from guidekit.cli.params import json_safe
from guidekit.training import make_adamw

TASKS = ("ddpm", "pdae", "classifier")
CHANNELS, SIZE = 1, 16  # the quickstart's digits
LATENT_DIM = 64  # guidekit's default z (the official configs use 512 at 64 px and up)
ENCODER_CHANNELS = 32  # guidekit's default --encoder-channels
PDAE_GAMMA = 0.1  # the official GaussianDiffusion's hard-coded γ
# Zero-initialised output convs (the step's last layer and each ResBlock's) keep z's gradient
# at zero for the first two updates on both sides, so the encoder moves from the third step on.
MIN_UPDATE_STEPS = 3
LR = 1e-4  # the official configs' lr (guidekit trains PDAE at 1e-3; speed does not care)
# Files a checkout of ckczzj/PDAE must have for this benchmark.
OFFICIAL_FILES = ("model/module.py", "model/unet.py", "model/shift_unet.py",
                  "model/representation_learning/encoder/celeba64.py",
                  "diffusion/gaussian_diffusion.py", "config/mnist_regular.yml")
OFFICIAL_MODULES = ("model.module", "model.unet", "model.shift_unet",
                    "model.representation_learning.encoder", "diffusion.gaussian_diffusion")


@dataclass(frozen=True)
class Variant:
    side: str  # "guidekit" | "official"
    label: str
    bf16: bool = False
    compile: bool = False
    fused: bool = False


VARIANTS = {
    "fp32": Variant("guidekit", "guidekit fp32 eager"),
    "bf16": Variant("guidekit", "guidekit bf16 autocast", bf16=True),
    "compile": Variant("guidekit", "guidekit bf16 + compile", True, True, True),
    "official": Variant("official", "official fp32 eager"),
    "official-bf16": Variant("official", "official + bf16 autocast", bf16=True),
    "official-compile": Variant("official", "official + bf16 + compile", True, True, True),
}
DEFAULT_VARIANTS = "fp32,bf16,compile,official,official-bf16"
CLASSIFIER_NOTE = (
    "classifier: guidekit only. The official PDAE code has no noisy-classifier trainer; its "
    "one classifier (trainer/train_manipulation.py) is nn.Linear(512, 40) trained with BCE on "
    "frozen, normalised latents for CelebA-HQ attribute manipulation: another model on "
    "another input, so no official row."
)


class NotOfficial(Exception):
    """--official PATH is not a usable checkout of ckczzj/PDAE."""


def unet_config() -> Any:
    from guidekit.unet import UNetConfig

    return UNetConfig(image_size=SIZE, in_channels=CHANNELS, model_channels=32)


def count(params: Any) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------- official code


_LOADED: dict[Path, types.SimpleNamespace] = {}


def load_official(path: Path) -> types.SimpleNamespace:
    """The official modules, imported from ``path`` (put first on sys.path). tqdm, which
    gaussian_diffusion imports for its sampling loops only, is stubbed when not installed."""
    if path.resolve() in _LOADED:
        return _LOADED[path.resolve()]
    missing = [f for f in OFFICIAL_FILES if not (path / f).is_file()]
    if missing:
        raise NotOfficial(f"--official {path} is not a checkout of ckczzj/PDAE "
                          f"({missing[0]} not found)")
    root = path.resolve()
    taken = [m for m in ("model", "diffusion") if m in sys.modules]
    if taken:  # another package of that name is loaded: the official one cannot be
        raise NotOfficial(f"a module named '{taken[0]}' is already imported")
    sys.path.insert(0, str(root))
    stubs = []
    try:
        import tqdm  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tqdm")
        stub.tqdm = lambda it=None, *a, **k: it  # type: ignore[attr-defined]
        sys.modules["tqdm"] = stub
        stubs.append("tqdm")
    try:
        mods = {name: importlib.import_module(name) for name in OFFICIAL_MODULES}
    except Exception as exc:  # any failure means the checkout is not usable here
        raise NotOfficial(f"--official {path}: importing its modules failed: "
                          f"{one_line(exc)}") from None
    for name, mod in mods.items():
        file = Path(getattr(mod, "__file__", None) or next(iter(mod.__path__)))
        if not file.resolve().is_relative_to(root):
            raise NotOfficial(f"--official {path}: '{name}' resolved to {file}, outside it")
    ns = types.SimpleNamespace(
        module=mods["model.module"], UNet=getattr(mods["model.unet"], "UNet", None),
        ShiftUNet=getattr(mods["model.shift_unet"], "ShiftUNet", None),
        Encoder=getattr(mods["model.representation_learning.encoder"], "CELEBA64Encoder", None),
        GaussianDiffusion=getattr(mods["diffusion.gaussian_diffusion"], "GaussianDiffusion",
                                  None),
        root=root, stubs=stubs)
    for attr in ("UNet", "ShiftUNet", "Encoder", "GaussianDiffusion"):
        if getattr(ns, attr) is None:
            raise NotOfficial(f"--official {path}: its modules lack {attr}")
    for meth in ("regular_train_one_batch", "representation_learning_train_one_batch"):
        if not hasattr(ns.GaussianDiffusion, meth):
            raise NotOfficial(f"--official {path}: GaussianDiffusion has no {meth}")
    import yaml

    doc = yaml.safe_load((root / "config/mnist_regular.yml").read_text())
    ns.yml = doc
    ns.diffusion_config = dict(doc["diffusion_config"])  # timesteps 1000, linear betas
    ns.denoise_config = official_denoise_config(doc["denoise_fn_config"])
    _LOADED[root] = ns
    return ns


def official_denoise_config(yml: dict[str, Any]) -> dict[str, Any]:
    """mnist_regular.yml's denoise_fn_config with guidekit's UNetConfig's layout."""
    cfg = unet_config()
    return {
        **yml,
        "input_channel": cfg.in_channels,
        "base_channel": cfg.model_channels,
        "channel_multiplier": list(cfg.channel_mult),
        "num_residual_blocks_of_a_block": cfg.num_res_blocks,
        # guidekit names feature-map sizes (8 px), the official code downsampling factors (2)
        "attention_resolutions": [cfg.image_size // r for r in cfg.attention_resolutions],
        "num_heads": cfg.num_heads,
        "head_channel": cfg.num_head_channels,
        "use_new_attention_order": cfg.use_new_attention_order,
        "dropout": cfg.dropout,
    }


def official_encoder(off: types.SimpleNamespace) -> nn.Module:
    """The official CELEBA64Encoder (written for 3×64×64) with its stem taking 1 channel and
    its head reading the 128×1×1 map that its four stride-2 convolutions leave of 16 px."""
    enc = off.Encoder(latent_dim=LATENT_DIM)
    seq = enc.encoder
    if not (isinstance(seq[0], nn.Conv2d) and isinstance(seq[14], nn.Linear)):
        raise NotOfficial("CELEBA64Encoder's layout is not the one this benchmark adapts")
    seq[0] = nn.Conv2d(CHANNELS, seq[0].out_channels, 3, 2, 1)
    side = SIZE // 16
    width = seq[14].in_features // 16  # 128 channels × 4 × 4 at 64 px
    seq[13] = off.module.View((-1, width * side * side))
    seq[14] = nn.Linear(width * side * side, LATENT_DIM)
    return enc


# --------------------------------------------------------------------------- the steps


@dataclass
class Built:
    loss: Callable[[dict[str, nn.Module]], Tensor]
    nets: dict[str, nn.Module]  # what the loss is called with (eager)
    groups: dict[str, list[nn.Parameter]]  # trainable, by part: each must update
    frozen: list[nn.Parameter] = field(default_factory=list)  # must not change
    counts: dict[str, int] = field(default_factory=dict)
    # what else TrainConfig(compile=True) compiles (PDAETask.compile_frozen: the frozen ε_θ)
    compile_frozen: Callable[[], None] | None = None


def batch_inputs(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=gen).clamp(-1, 1)
    return x0.to(device), torch.randint(0, 10, (batch,), generator=gen).to(device)


def build_guidekit(task: str, device: torch.device, batch: int) -> Built:
    from guidekit_classifier.training import ClassifierTask, default_config
    from guidekit_pdae.networks import Encoder, EncoderConfig, EstimatorConfig, GradientEstimator
    from guidekit_pdae.training import PDAETask

    from guidekit.data import ImageData
    from guidekit.ddpm import DDPMTask
    from guidekit.lookup import weighting_table
    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.unet import EncoderUNet, UNet

    x0, y = batch_inputs(batch, device)
    gen = torch.Generator(device).manual_seed(0)
    sched = NoiseSchedule.from_config(ScheduleConfig())
    cfg = unet_config()
    torch.manual_seed(0)
    frozen: list[nn.Parameter] = []
    labels = None
    if task == "ddpm":
        data = ImageData("bench", torch.zeros(1, CHANNELS, SIZE, SIZE), None, 0)
        t: Any = DDPMTask(UNet(cfg), sched, torch.ones(sched.num_steps), {"name": "uniform"},
                          data)
    elif task == "pdae":
        unet = UNet(cfg).to(device)
        enc = Encoder(EncoderConfig(image_size=SIZE, in_channels=CHANNELS,
                                    channels=ENCODER_CHANNELS, latent_dim=LATENT_DIM))
        est = GradientEstimator(EstimatorConfig(cfg, LATENT_DIM))
        weights = weighting_table("pdae", sched, {"pdae_gamma": PDAE_GAMMA})
        t = PDAETask(unet, enc, est, sched, weights, {})
        frozen = list(unet.parameters())
    else:
        data = ImageData("bench", torch.zeros(1, CHANNELS, SIZE, SIZE),
                         torch.zeros(1, dtype=torch.long), 10)
        t = ClassifierTask(EncoderUNet(default_config(data)), sched, data)
        labels = y
    nets = {k: m.to(device).train() for k, m in t.trainable().items()}
    groups = {k: [p for p in m.parameters() if p.requires_grad] for k, m in nets.items()}
    counts = {f"trainable {k}": count(g) for k, g in groups.items()}
    if frozen:
        counts["frozen unet"] = count(frozen)
    return Built(lambda n: t.loss(n, x0, labels, gen), nets, groups, frozen, counts,
                 getattr(t, "compile_frozen", None))


def build_official(task: str, device: torch.device, batch: int, path: Path) -> Built:
    off = load_official(path)
    x0, _ = batch_inputs(batch, device)
    diffusion = off.GaussianDiffusion(off.diffusion_config, device)
    torch.manual_seed(0)
    if task == "ddpm":
        net = off.UNet(**off.denoise_config).to(device).train()
        groups = {"denoise_fn": list(net.parameters())}
        return Built(
            lambda n: diffusion.regular_train_one_batch(n["denoise_fn"], x0)["prediction_loss"],
            {"denoise_fn": net}, groups, [], {"trainable denoise_fn": count(net.parameters())})
    if task != "pdae":
        raise ValueError(f"no official {task} step")
    enc = official_encoder(off).to(device).train()
    dec = off.ShiftUNet(latent_dim=LATENT_DIM, **off.denoise_config).to(device)
    dec.set_train_mode()  # what the official trainer does: shift parts train, the rest frozen
    # The parameter groups of the official trainer's optimiser.
    groups = {"encoder": list(enc.parameters()),
              **{k: list(getattr(dec, k).parameters())
                 for k in ("label_emb", "shift_middle_block", "shift_output_blocks",
                           "shift_out")}}
    frozen = [p for p in dec.parameters() if not p.requires_grad]
    counts = {f"trainable {k}": count(g) for k, g in groups.items()}
    counts["frozen unet"] = count(frozen)

    def loss(n: dict[str, nn.Module]) -> Tensor:
        return diffusion.representation_learning_train_one_batch(
            n["encoder"], n["decoder"], x0)["prediction_loss"]

    return Built(loss, {"encoder": enc, "decoder": dec}, groups, frozen, counts)


# --------------------------------------------------------------------------- child


class Runner:
    """One row: its step, optimiser and measurements, driven by the parent's commands."""

    def __init__(self, task: str, variant: str, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.v = VARIANTS[variant]
        self.built = (build_official(task, self.device, args.batch, Path(args.official))
                      if self.v.side == "official" else
                      build_guidekit(task, self.device, args.batch))
        params = [p for g in self.built.groups.values() for p in g]
        # guidekit's rows: the AdamW that fit builds (fused wherever torch has the kernel)
        self.opt = (make_adamw(params, LR, 0.0) if self.v.side == "guidekit" else
                    torch.optim.AdamW(params, lr=LR, weight_decay=0.0,
                                      fused=True if self.v.fused else None))
        self.nets = ({k: torch.compile(m) for k, m in self.built.nets.items()}
                     if self.v.compile else self.built.nets)
        if self.v.compile and self.built.compile_frozen is not None:
            self.built.compile_frozen()
        self.before = {k: [p.detach().clone() for p in g] for k, g in self.built.groups.items()}
        self.frozen_before = [p.detach().clone() for p in self.built.frozen]
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.cuda = self.device.type == "cuda"
        self.mem0 = self.after_warmup = 0.0
        self.method = ""
        self.steps_done = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mem_mib(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20
        return (_status_kib("VmRSS") or 0) / 1024

    def step(self) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.v.bf16):
            loss = self.built.loss(self.nets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps_done += 1
        loss = loss.detach()
        self.bad |= ~torch.isfinite(loss)  # read once per block: no host sync per step
        return loss

    def warmup(self, n: int) -> dict[str, Any]:
        gc.collect()
        self.sync()
        self.mem0 = self.mem_mib()
        t0 = time.perf_counter()
        self.step()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(n - 1):
            self.step()
        self.sync()
        self.after_warmup = self.mem_mib()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "max_memory_allocated over the timed steps − allocated before"
        elif _reset_peak():
            self.method = "VmHWM over the timed steps (reset after warm-up) − VmRSS before"
        else:  # no clear_refs: the peak then includes warm-up (and compilation)
            self.method = "ru_maxrss − VmRSS before the first step"
        return {"first_step_s": first}

    def run(self, n: int) -> dict[str, Any]:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        self.sync()
        seconds = time.perf_counter() - t0
        return {"ms": 1000 * seconds / n, "loss": float(loss), "finite": not bool(self.bad)}

    def finish(self) -> dict[str, Any]:
        self.sync()
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            peak = (_status_kib("VmHWM") or 0) / 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        updated = {k: any(not torch.equal(a, p.detach()) for a, p in zip(
            self.before[k], g, strict=True)) for k, g in self.built.groups.items()
            } if self.steps_done >= MIN_UPDATE_STEPS else None
        frozen_same = all(torch.equal(a, p.detach()) for a, p in zip(
            self.frozen_before, self.built.frozen, strict=True))
        return {"peak_mib": peak - self.mem0, "memory_method": self.method,
                "after_warmup_mib": self.after_warmup - self.mem0, "updated": updated,
                "frozen_unchanged": frozen_same, "finite": not bool(self.bad),
                "gflop_per_step": self.flops() / 1e9}

    def flops(self) -> float:
        """FLOPs of one forward + backward of the eager networks (after memory is read)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            self.built.loss(self.built.nets).backward()
        self.opt.zero_grad(set_to_none=True)
        return float(fc.get_total_flops())

    def info(self) -> dict[str, Any]:
        return {"ready": True, "counts": self.built.counts,
                "trainable_params": sum(count(g) for g in self.built.groups.values())}


def child_main(args: argparse.Namespace) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (compilers, official code) go to the log, not the protocol

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(json_safe(obj)) + "\n")

    task, variant = args.child.split(":")
    try:
        runner = Runner(task, variant, args)
        send(runner.info())
        for line in sys.stdin:
            cmd = json.loads(line)
            send(getattr(runner, cmd["cmd"])(*cmd.get("args", [])))
            if cmd["cmd"] == "finish":
                break
    except Exception as exc:
        traceback.print_exc()
        send({"error": one_line(exc)})
        return 1
    return 0


# --------------------------------------------------------------------------- parent


class Child:
    """A row's persistent child process, spoken to in JSON lines."""

    def __init__(self, task: str, variant: str, args: argparse.Namespace, logs: Path) -> None:
        self.log = logs / f"{task}-{variant}.log"
        flags = ["--device", args.device, "--batch", str(args.batch)]
        if args.threads:
            flags += ["--threads", str(args.threads)]
        if args.official:
            flags += ["--official", str(args.official)]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *flags, "--_child",
                 f"{task}:{variant}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.error: str | None = None

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = [s for s in self.log.read_text().splitlines() if s.strip()]
            return {"error": f"child exited with status {self.proc.returncode}: "
                             f"{tail[-1] if tail else 'no output'}"}
        return json.loads(line)

    def ask(self, cmd: str, *a: Any) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": cmd, "args": list(a)}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: recv reports how
        out = self.recv()
        self.error = out.get("error")
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_task(task: str, variants: list[str], args: argparse.Namespace, logs: Path,
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
    children = {v: Child(task, v, args, logs) for v in variants}
    rows = {v: {"task": task, "variant": v, "side": VARIANTS[v].side,
                "label": VARIANTS[v].label, "ms_rounds": []} for v in variants}
    try:
        for v, c in children.items():
            rows[v].update(c.recv())
            c.error = rows[v].get("error")
        for v, c in children.items():  # one at a time: compilation is not timed
            say(f"{task}: first step and warm-up of {v} ...")
            rows[v].update(c.ask("warmup", args.warmup))
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                out = children[v].ask("run", args.steps)
                if "ms" in out:
                    rows[v]["ms_rounds"].append(out["ms"])
                    rows[v]["loss"], rows[v]["finite"] = out["loss"], out["finite"]
                else:
                    rows[v].setdefault("error", out["error"])
            say(f"{task}: round {r + 1}/{args.rounds} done")
        for v, c in children.items():
            out = c.ask("finish")
            if "error" in out:
                rows[v].setdefault("error", out["error"])
            else:
                rows[v].update(out)
    finally:
        for c in children.values():
            c.close()
    for row in rows.values():
        ms = row["ms_rounds"]
        if ms and "error" not in row:
            row["ms_per_step"] = statistics.median(ms)
            row["images_per_s"] = args.batch * 1000 / row["ms_per_step"]
        row.pop("ready", None)
    for row in rows.values():  # official_time / this row's time: > 1 means this row is faster
        for ref in ("official", "official-bf16"):
            base = rows.get(ref, {}).get("ms_per_step")
            if base and row.get("ms_per_step"):
                row[f"speedup_vs_{ref}"] = base / row["ms_per_step"]
    return list(rows.values())


def architecture_check(off: types.SimpleNamespace) -> dict[str, Any]:
    """guidekit's UNet given the official UNet's weights (guidekit's PDAE converter mapping)
    must give its output; and the schedule, shift coefficient and PDAE λ_t must agree."""
    from guidekit.convert import _load
    from guidekit.lookup import weighting_table
    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.unet import UNet

    torch.manual_seed(0)
    theirs = fill_zero_layers(off.UNet(**off.denoise_config)).eval()
    ours = UNet(unet_config()).eval()
    _load(ours, theirs.state_dict(), False, "", "the official UNet")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, CHANNELS, SIZE, SIZE, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    with torch.no_grad():
        out_theirs, out_ours = theirs(x, t), ours(x, t)
    unet_diff = float((out_theirs - out_ours).abs().max() / out_theirs.abs().max())
    sched = NoiseSchedule.from_config(ScheduleConfig())
    tab = sched.tables
    gd = off.GaussianDiffusion(off.diffusion_config, "cpu")
    coef = tab["alphas"].sqrt() * (1 - tab["alphas_cumprod_prev"]) / tab[
        "sqrt_one_minus_alphas_cumprod"]
    pairs = {
        "sqrt_alphas_cumprod": (gd.sqrt_alphas_cumprod, tab["sqrt_alphas_cumprod"]),
        "sqrt_one_minus_alphas_cumprod": (gd.sqrt_one_minus_alphas_cumprod,
                                          tab["sqrt_one_minus_alphas_cumprod"]),
        "shift_coef": (-gd.shift_coef, coef),
        "pdae_weight": (gd.weight, weighting_table("pdae", sched, {"pdae_gamma": PDAE_GAMMA})),
    }
    # |Δ| relative to the table's largest value: near t = 0 both sides round 1 − ᾱ_{t−1}
    # differently (float64 numpy vs float32 torch) and a per-entry ratio would blow that up
    rel = {k: float((a.double().cpu() - b.double()).abs().max() / b.double().abs().max())
           for k, (a, b) in pairs.items()}
    return {"unet_max_rel_diff": unet_diff, "unet_ok": unet_diff < 1e-4,
            "tables_max_rel_diff": rel, "tables_ok": all(v < 1e-5 for v in rel.values()),
            "timesteps": off.diffusion_config.get("timesteps"),
            "betas_type": off.diffusion_config.get("betas_type")}


def differences(off: types.SimpleNamespace | None, params: dict[str, Any]) -> list[str]:
    def p(side: str, key: str) -> str:
        v = params.get(side, {}).get(key)
        return f"{v:,}" if isinstance(v, int) else "?"

    out = [
        f"frozen ε_θ: the same network on both sides ({p('guidekit', 'frozen unet')} vs "
        f"{p('official', 'frozen unet')} params: widths 32·(1,2,2), one AdaGN ResBlock per "
        "level, ResBlock resampling, 4-head attention at 8 px and in the middle, q/k/v-first "
        "layout); guidekit attends with SDPA, the official code with einsum + softmax.",
        f"G_ψ / shift path: both mirror the UNet's middle + output blocks (attention at the same "
        f"places) with a zero-initialised output conv; trainable {p('guidekit', 'decoder')} vs "
        f"{p('official', 'decoder')} params.",
        "z injection: guidekit gives every ResBlock its own Linear(z 64 → 2·C) scale/shift "
        "applied after the AdaGN; the official ShiftUNet maps z once (label_emb: Linear(64 → "
        "128)) and every ResBlockShift applies SiLU + Linear(128 → 2·C) to that.",
        f"encoder: guidekit's E_φ is a strided CNN, 32·(1,2,4) channels, two 3×3 convs per "
        f"level, no attention, flatten 128×2×2 → 64 ({p('guidekit', 'encoder')} params); the "
        "official CELEBA64Encoder (its smallest; written for 3×64×64) has four stride-2 convs "
        "64→128→128→128 with 4-head attention after the second, here with a 1-channel stem "
        f"and its Linear reading the 128×1×1 map left of 16 px ({p('official', 'encoder')} "
        "params).",
        "loss: the same on both sides: DDPM L_simple with uniform λ; PDAE ‖ε − (ε_θ − coef_t·G)‖² "
        "with λ_t = SNR^0.1/(1+SNR) (guidekit's 'pdae' weighting, γ 0.1; hard-coded in the "
        "official GaussianDiffusion); schedule T 1000, linear β 1e-4..0.02.",
        "update: AdamW lr 1e-4, weight decay 0 on both sides (the official trainer's Adam with "
        "weight decay 0 is the same update); fused on guidekit's rows (what fit uses), on the "
        "official side only in its compile row. Neither side's "
        "timed step has data loading, EMA, grad clipping or logging.",
        "bf16 rows: torch.autocast(device, bfloat16) around the loss on both sides (the "
        "official trainer's own AMP is CUDA fp16 autocast with a GradScaler).",
        "random draws: guidekit takes t and ε from a torch.Generator, the official code from "
        "the global RNG.",
    ]
    if off is not None and off.stubs:
        out.append(f"stubbed for the official import: {', '.join(off.stubs)} (not installed)")
    return out


def collect_params(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Parameter counts by side from the children's reports."""
    out: dict[str, dict[str, int]] = {"guidekit": {}, "official": {}}
    for row in rows:
        c, side = row.get("counts") or {}, out[row["side"]]
        if row["task"] == "ddpm":
            side["ddpm trainable"] = row.get("trainable_params", 0)
        elif row["task"] == "classifier":
            side["classifier"] = row.get("trainable_params", 0)
        elif row["task"] == "pdae" and c:
            side["frozen unet"] = c.get("frozen unet", 0)
            side["encoder"] = c.get("trainable encoder", 0)
            side["decoder"] = (c.get("trainable estimator", 0) if row["side"] == "guidekit"
                               else sum(v for k, v in c.items() if k.startswith("trainable ")
                                        and k != "trainable encoder"))
            side["pdae trainable"] = row.get("trainable_params", 0)
    return out


def failures(result: dict[str, Any]) -> list[str]:
    out = []
    arch = result.get("architecture_check")
    if arch and not arch["unet_ok"]:
        out.append(f"guidekit's UNet with the official UNet's weights differs from it "
                   f"(max rel diff {arch['unet_max_rel_diff']:.2e})")
    if arch and not arch["tables_ok"]:
        out.append(f"schedule / shift coefficient / PDAE weighting differ: "
                   f"{arch['tables_max_rel_diff']}")
    for row in result["rows"]:
        name = f"{row['task']} {row['variant']}"
        if row.get("error"):
            out.append(f"{name}: {row['error']}")
            continue
        if not row.get("finite", False):
            out.append(f"{name}: a loss was not finite")
        stale = [k for k, ok in (row.get("updated") or {}).items() if not ok]
        if stale:
            out.append(f"{name}: parameters of {', '.join(stale)} did not update")
        if not row.get("frozen_unchanged", True):
            out.append(f"{name}: the frozen UNet's weights changed")
    return out


def summaries(rows: list[dict[str, Any]]) -> list[str]:
    """Per task with official rows: guidekit's fastest row against the official steps."""
    out = []
    for task in TASKS:
        ours = [r for r in rows if r["task"] == task and r["side"] == "guidekit"
                and r.get("ms_per_step")]
        if not ours or not any(r.get("speedup_vs_official") for r in ours):
            continue
        best = min(ours, key=lambda r: r["ms_per_step"])
        vs = [f"×{best[f'speedup_vs_{ref}']:.2f} the official {name} step's"
              for ref, name in (("official", "fp32 eager"), ("official-bf16", "bf16"))
              if best.get(f"speedup_vs_{ref}")]
        out.append(f"{task}: guidekit's fastest row ({best['label']}) has {' and '.join(vs)} "
                   "throughput")
    return out


def fmt(x: Any, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def print_report(console: Console, result: dict[str, Any]) -> None:
    m, c = result["machine"], result["config"]
    console.print(
        f"guidekit vs official PDAE training step — torch {m['torch']}, device {m['device']}"
        f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, {m['threads']} torch threads on "
        f"{m['cpus']} CPUs ({m['processor']}), load average {m['loadavg_start']} at start, "
        f"{m.get('loadavg_end')} at end; batch {c['batch']}, {CHANNELS}x{SIZE}x{SIZE}, "
        f"{c['rounds']} rounds × {c['steps']} steps after {c['warmup']} warm-up")
    for w in load_warnings(m):
        console.print(f"[yellow]{w}[/yellow]")
    params = result["params"]
    table = Table(title="parameters")
    for col in ("part", "guidekit", "official"):
        table.add_column(col, justify="right")
    for key in ("frozen unet", "encoder", "decoder", "pdae trainable", "ddpm trainable",
                "classifier"):
        g, o = params["guidekit"].get(key), params["official"].get(key)
        if g is None and o is None:
            continue
        table.add_row(key, fmt(g, ","), fmt(o, ","))
    console.print(table)
    table = Table(title="training step: median ms/step over rounds; speed-up = official ms / "
                        "row ms (> 1: row faster)")
    for col in ("task", "row", "ms/step", "range", "images/s", "vs off. fp32",
                "vs off. bf16", "peak MiB", "first step s", "GFLOP/step", "loss"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        ms = r.get("ms_rounds") or []
        table.add_row(
            r["task"], r["label"],
            fmt(r.get("ms_per_step")) if not r.get("error") else "[red]error[/red]",
            f"{min(ms):.1f}–{max(ms):.1f}" if ms else "—", fmt(r.get("images_per_s")),
            fmt(r.get("speedup_vs_official"), ".2f", "x"),
            fmt(r.get("speedup_vs_official-bf16"), ".2f", "x"), fmt(r.get("peak_mib")),
            fmt(r.get("first_step_s"), ".2f"), fmt(r.get("gflop_per_step"), ".2f"),
            fmt(r.get("loss"), ".4f"))
    console.print(table)
    for line in result["summary"]:
        console.print(line)
    methods = {r["memory_method"] for r in result["rows"] if r.get("memory_method")}
    for method in sorted(methods):
        console.print(f"peak memory: {method}")
    arch = result.get("architecture_check")
    if arch:
        rel = ", ".join(f"{k} {v:.1e}" for k, v in arch["tables_max_rel_diff"].items())
        console.print(f"check: guidekit UNet with the official UNet's weights: max rel diff "
                      f"{arch['unet_max_rel_diff']:.1e}; tables ({rel})")
    if result["differences"]:
        console.print("how the configurations differ:")
    for d in result["differences"]:
        console.print(f"  - {d}")
    for note in result["notes"]:
        console.print(note)
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]error[/red] {row['task']} {row['variant']}: {row['error']}")
    for f in result["failed"]:
        console.print(f"[red]FAILED:[/red] {f}")
    console.print(f"wall time {result['wall_s']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, help="a local checkout of github ckczzj/PDAE")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated rows of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated of "
                   f"{', '.join(TASKS)} (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 1; the "
                   "first is timed apart as 'first step s')")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every process")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "steps", "rounds", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [v for v in args.variants if v not in VARIANTS] + [
        t for t in args.tasks if t not in TASKS]
    if bad or not args.variants or not args.tasks:
        p.error(f"unknown or empty --variants/--tasks: {', '.join(bad) or 'none given'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    console = Console(stderr=args.json)
    if not console.is_terminal:  # a pipe or file: keep the tables unwrapped
        console.width = 200
    off = None
    if args.official is not None:
        try:
            off = load_official(args.official)
        except NotOfficial as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    machine = {"torch": torch.__version__, "python": platform.python_version(),
               "processor": cpu_model(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "loadavg_start": round(os.getloadavg()[0], 2)}
    for w in load_warnings(machine):
        console.print(f"[yellow]{w}[/yellow]")
    notes = []
    variants = args.variants
    if off is None:
        skipped = [v for v in variants if VARIANTS[v].side == "official"]
        variants = [v for v in variants if VARIANTS[v].side == "guidekit"]
        notes.append("official: skipped (no --official PATH given); guidekit rows only"
                     + (f", {', '.join(skipped)} not run" if skipped else ""))
        console.print(notes[-1])
    if any(VARIANTS[v].compile for v in variants):
        notes.append("'+ compile' rows: bf16 autocast, torch.compile of each trainable module "
                     "and guidekit's frozen ε_θ forward (official: of what its runner compiles, "
                     "encoder and decoder / the denoise fn, with AdamW(fused=True)); 'first "
                     "step s' is their compilation")
    if "classifier" in args.tasks:
        notes.append(CLASSIFIER_NOTE)
    result: dict[str, Any] = {
        "machine": machine,
        "config": {"batch": args.batch, "shape": [CHANNELS, SIZE, SIZE], "steps": args.steps,
                   "rounds": args.rounds, "warmup": args.warmup, "lr": LR,
                   "latent_dim": LATENT_DIM, "variants": variants, "tasks": args.tasks},
        "official": ({"path": str(off.root), "skipped": False,
                      "denoise_fn_config": off.denoise_config,
                      "diffusion_config": off.diffusion_config} if off else
                     {"path": None, "skipped": True}),
    }
    if off is not None:
        console.print("checking the official UNet and tables against guidekit's ...")
        result["architecture_check"] = architecture_check(off)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_official_") as logs:
        for task in args.tasks:
            vs = [v for v in variants if VARIANTS[v].side == "guidekit" or task != "classifier"]
            if vs:
                console.print(f"measuring {task}: {', '.join(vs)} ...")
                rows += measure_task(task, vs, args, Path(logs), console.print)
    result["rows"] = rows
    result["params"] = collect_params(rows)
    result["summary"] = summaries(rows)
    result["differences"] = differences(off, result["params"]) if off else []
    if any(r.get("updated", False) is None for r in rows):
        notes.append(f"parameter-update check skipped: it needs >= {MIN_UPDATE_STEPS} steps per "
                     "row (--warmup + --rounds × --steps)")
    result["notes"] = notes
    machine["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["failed"] = failures(result)
    result["wall_s"] = time.perf_counter() - t_start
    print_report(console, result)
    if args.json:
        print(json.dumps(json_safe(result)))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
