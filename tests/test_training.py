"""The training loop: exact resumption, atomic checkpoints, NaN handling, and checkpoint
checks (missing, wrong kind, wrong shapes)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guidekit import checkpoint as ckpt_mod
from guidekit.checkpoint import read_checkpoint
from guidekit.ddpm import load_dpm
from guidekit.errors import CheckpointError, GuidekitError, Interrupted
from guidekit.lookup import load_dataset
from guidekit.testing import make_tiny_dpm
from guidekit.training import TrainConfig, batch_indices, fit


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = read_checkpoint(path, "ddpm")
    return {f"{role}/{k}": v for role in ("model", "ema", "state")
            for k, v in ck.tensors(role).items()}


def test_resume_continues_exactly(tmp_path):
    straight = make_tiny_dpm(tmp_path / "straight", steps=6)
    part = make_tiny_dpm(tmp_path / "part", steps=3)
    assert read_checkpoint(part).step == 3
    make_tiny_dpm(part, steps=6, resume=True)
    a, b = _all_tensors(straight), _all_tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log continues from step 4, after a line recording what the resume changed
    recs = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    (resumed,) = [r for r in recs if r.get("resumed")]
    assert resumed["step"] == 3 and resumed["changed"]["steps"] == [3, 6]


def test_batches_are_a_pure_function_of_step():
    a = batch_indices(100, 16, seed=3, step=7)
    assert torch.equal(a, batch_indices(100, 16, seed=3, step=7))
    epoch = torch.cat([batch_indices(96, 16, 0, s) for s in range(6)])
    assert sorted(epoch.tolist()) == list(range(96))  # one epoch covers each image once


def test_existing_checkpoint_needs_resume(guidekit_dpm, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(guidekit_dpm, out)
    with pytest.raises(CheckpointError, match="pass --resume"):
        make_tiny_dpm(out, steps=2)


def test_resume_with_other_settings_is_refused(tmp_path):
    out = make_tiny_dpm(tmp_path / "a", steps=2)
    with pytest.raises(CheckpointError, match="'schedule' settings differ"):
        make_tiny_dpm(out, steps=4, timesteps=50, resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        make_tiny_dpm(tmp_path / "none", steps=2, resume=True)


def test_crash_while_writing_weights_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = make_tiny_dpm(tmp_path / "c", steps=2)
    before = _all_tensors(out)
    real = ckpt_mod.atomic_write_bytes
    calls = []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:  # the disk fills while the second file of the next save is written
            with ckpt_mod.atomic_path(path) as tmp:
                tmp.write_bytes(data[:100])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", flaky)
    with pytest.raises(GuidekitError, match=r"cannot save step 4 .*No space left on device: "
                       r"free disk space or fix the folder; the checkpoint of step 2 .* is kept"):
        make_tiny_dpm(out, steps=4, resume=True)
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", real)
    assert read_checkpoint(out).step == 2
    after = _all_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(out.glob(".*.tmp"))  # no temp files left behind
    assert not list(out.glob("*-0000004.safetensors"))  # the failed save gave its space back
    load_dpm(out)  # still loads
    make_tiny_dpm(out, steps=4, resume=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"{role}-0000004.safetensors" for role in ("ema", "model", "state")]


def test_crash_before_config_is_replaced_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = make_tiny_dpm(tmp_path / "c", steps=2)

    def boom(path, data):
        raise OSError("power cut")

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", boom)
    with pytest.raises(GuidekitError, match="cannot save step 4 .*power cut"):
        make_tiny_dpm(out, steps=4, resume=True)
    assert read_checkpoint(out).step == 2
    load_dpm(out)


class _NaNAfter:
    """A DDPM-like task whose loss turns NaN from call ``bad`` on."""

    kind = "ddpm"

    def __init__(self, bad: int):
        self.net = torch.nn.Linear(4, 4)
        self.calls = 0
        self.bad = bad

    def trainable(self):
        return {"model": self.net}

    def loss(self, nets, x0, labels, gen):
        self.calls += 1
        out = nets["model"](x0.flatten(1)[:, :4]).pow(2).mean()
        return out * float("nan") if self.calls >= self.bad else out

    def config(self):
        return {"model": {"name": "linear"}}


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    data = load_dataset("digits")
    out = tmp_path / "nan"
    cfg = TrainConfig(steps=10, batch_size=8, log_every=1, save_every=2)
    with pytest.raises(GuidekitError) as exc:
        fit(_NaNAfter(bad=4), data, out, cfg, progress=False)
    msg = str(exc.value)
    assert "NaN" in msg and "by step 4" in msg and "the checkpoint of step 2" in msg
    ck = read_checkpoint(out, "ddpm")
    assert ck.step == 2
    assert all(torch.isfinite(v).all() for v in ck.tensors("model").values())


def test_missing_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*guidekit train ddpm"):
        load_dpm(tmp_path / "nothing")


def test_not_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a guidekit checkpoint"):
        load_dpm(tmp_path)


def test_wrong_kind_error(guidekit_dpm, tmp_path):
    out = tmp_path / "clf"
    shutil.copytree(guidekit_dpm, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["kind"] = "classifier"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is a 'classifier' checkpoint"):
        load_dpm(out)


def test_wrong_shape_error(guidekit_dpm, tmp_path):
    out = tmp_path / "wide"
    shutil.copytree(guidekit_dpm, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["config"]["model_channels"] //= 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match .* in the file but .* in the model"):
        load_dpm(out)
    cfg["model"]["config"]["model_channels"] = 1024  # a 200 KB checkpoint asking for 3 GB
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"describes a model of [\d.]+ GB, but its 'ema' "
                       r"weights file holds [\d.]+ KB"):
        load_dpm(out)


def test_p2_weighting_is_recorded_and_used(tmp_path):
    from guidekit.ddpm import weighting_table
    from guidekit.schedule import NoiseSchedule, ScheduleConfig

    out = make_tiny_dpm(tmp_path / "p2", steps=1)
    sched = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=100))
    w = weighting_table("p2", sched, {"p2_gamma": 1.0, "p2_k": 1.0})
    assert w[0] < w[-1]  # the clean-up stage (high SNR, small t) gets the least weight
    assert read_checkpoint(out).config["weighting"] == {"name": "uniform", "options": {}}


def test_bf16_autocast_trains_and_saves_float32(tmp_path):
    out = make_tiny_dpm(tmp_path / "bf16", steps=2, bf16=True)
    ck = read_checkpoint(out)
    assert ck.config["train"]["bf16"] is True
    weights = ck.tensors("model")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_ema_warms_up_before_reaching_its_decay():
    from guidekit.training import ema_decay_at, ema_update

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.99, 10_000) == 0.99
    ema, new = [torch.zeros(3)], [torch.ones(3)]
    ema_update(0.99)(ema, new, torch.tensor(1))  # second update: d = 2/11
    torch.testing.assert_close(ema[0], torch.full((3,), 9 / 11))


class _NaNGrad(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss whose update breaks the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _BadUpdateAfter(_NaNAfter):
    def loss(self, nets, x0, labels, gen):
        self.calls += 1
        out = nets["model"](x0.flatten(1)[:, :4]).pow(2).mean()
        return _NaNGrad.apply(out) if self.calls >= self.bad else out


def test_an_update_that_breaks_the_weights_is_never_saved(tmp_path):
    data = load_dataset("digits")
    out = tmp_path / "bad"
    cfg = TrainConfig(steps=10, batch_size=8, log_every=100, save_every=2)
    with pytest.raises(GuidekitError) as exc:
        fit(_BadUpdateAfter(bad=4), data, out, cfg, progress=False)
    msg = str(exc.value)  # the loss of step 4 is finite; its update is not
    assert "not saving step 4" in msg and "NaN or inf" in msg
    assert "the checkpoint of step 2" in msg
    ck = read_checkpoint(out, "ddpm")
    assert ck.step == 2
    assert all(torch.isfinite(v).all() for role in ("model", "ema", "state")
               for v in ck.tensors(role).values() if v.is_floating_point())
    with pytest.raises(GuidekitError, match="no checkpoint was written"):
        fit(_BadUpdateAfter(bad=1), data, tmp_path / "never", cfg, progress=False)
    assert not (tmp_path / "never" / "config.json").exists()


class _StopAt(_NaNAfter):
    """A task that is interrupted (Ctrl-C, or a signal sent to the process) at call ``bad``."""

    def __init__(self, bad: int, signum: int | None = None):
        super().__init__(bad)
        self.signum = signum

    def loss(self, nets, x0, labels, gen):
        self.calls += 1
        if self.calls == self.bad:
            if self.signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), self.signum)
        return nets["model"](x0.flatten(1)[:, :4]).pow(2).mean()


@pytest.mark.parametrize(("signum", "code"), [(None, 130), (signal.SIGTERM, 143)])
def test_interrupts_name_the_kept_step_and_exit_130_or_143(tmp_path, signum, code):
    data = load_dataset("digits")
    cfg = TrainConfig(steps=10, batch_size=8, log_every=1, save_every=2)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as exc:
        fit(_StopAt(5, signum), data, tmp_path / "int", cfg, progress=False)
    assert exc.value.exit_code == code
    assert str(exc.value).startswith("interrupted at step 4 of 10; the checkpoint of step 4")
    assert read_checkpoint(tmp_path / "int").step == 4
    # the handlers are put back (SIGINT may have been ignored: a backgrounded test run)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(Interrupted, match="no checkpoint was written"):
        fit(_StopAt(1), data, tmp_path / "early", cfg, progress=False)


def test_a_second_writer_on_one_out_is_refused(tmp_path, lock_holder):
    out = make_tiny_dpm(tmp_path / "a", steps=2)
    with lock_holder(out), pytest.raises(CheckpointError, match="in use by another guidekit"):
        make_tiny_dpm(out, steps=4, resume=True)
    make_tiny_dpm(out, steps=4, resume=True)  # the dead holder's lock is gone
    assert read_checkpoint(out).step == 4


def test_resume_applies_new_rates_and_refuses_what_cannot_change(tmp_path):
    base = make_tiny_dpm(tmp_path / "base", steps=2)
    same, faster = tmp_path / "same", tmp_path / "faster"
    shutil.copytree(base, same)
    shutil.copytree(base, faster)
    make_tiny_dpm(same, steps=4, resume=True)
    make_tiny_dpm(faster, steps=4, resume=True, lr=0.05)
    a, b = _all_tensors(same), _all_tensors(faster)
    assert not torch.equal(a["model/model.out.2.weight"], b["model/model.out.2.weight"])
    recs = [json.loads(x) for x in (faster / "metrics.jsonl").read_text().splitlines()]
    (resumed,) = [r for r in recs if r.get("resumed")]
    assert resumed["changed"]["lr"][1] == 0.05
    assert [r["lr"] for r in recs if "loss" in r][-1] == 0.05
    assert read_checkpoint(faster).config["train"]["lr"] == 0.05
    with pytest.raises(GuidekitError, match="already trained to step 4: give --steps above 4"):
        make_tiny_dpm(faster, steps=3, resume=True)
    with pytest.raises(CheckpointError, match="--seed 7: the first run used 0"):
        make_tiny_dpm(faster, steps=6, resume=True, seed=7)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", float("nan"), r"--lr must be a number in \[0, 1000\]"),
    ("lr", -1.0, r"--lr must be a number in \[0, 1000\]"),
    ("lr", 1e38, r"--lr must be a number in \[0, 1000\]"),
    ("weight_decay", float("nan"), r"--weight-decay must be a number in \[0, 1000\]"),
    ("grad_clip", float("nan"), "--grad-clip must be > 0"),
    ("grad_clip", 0.0, "--grad-clip must be > 0"),
    ("ema_decay", float("nan"), r"--ema-decay must be in \[0, 1\)"),
    ("batch_size", 10**9, r"--batch-size must be in 1\.\.65536"),
    ("steps", 0, r"--steps must be in 1\.\."),
    ("seed", 2**64, r"--seed must be an integer from 0 to 2\*\*63 - 1"),
    ("seed", -1, r"--seed must be an integer from 0 to 2\*\*63 - 1"),
])
def test_train_settings_are_checked(field, value, message):
    with pytest.raises(GuidekitError, match=message):
        TrainConfig(**{field: value})


def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(tmp_path):
    from guidekit.ddpm import train_ddpm
    from guidekit.unet import UNetConfig

    data = load_dataset("digits")
    unet = UNetConfig(image_size=data.image_size, in_channels=1, model_channels=4096)
    with pytest.raises(GuidekitError, match=r"training a UNet of --model-channels 4096.* needs "
                       r"about [\d.]+ [GT]B, more than the [\d.]+ [GT]B of cpu memory here: "
                       "lower --model-channels"):
        train_ddpm(data, tmp_path / "big", unet=unet, config=TrainConfig(device="cpu"),
                   samples=0, progress=False)


def test_ctrl_c_in_the_cli_names_the_kept_step_and_exits_130(tmp_path):
    """Also when the run inherits SIGINT ignored, as a background job of a script does."""
    out = tmp_path / "run"
    train = [sys.executable, "-m", "guidekit", "train", "ddpm", "--out", str(out), "--steps",
             "100000", "--save-every", "5", "--model-channels", "8", "--attention", "",
             "--batch-size", "8", "--samples", "0"]
    # `trap '' INT` then exec: the run starts with SIGINT ignored, under the same pid
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *train],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    m = re.fullmatch(r"error: interrupted at step \d+ of 100000; the checkpoint of step (\d+) "
                     r"in .* is kept \(continue it with --resume\)", line)
    assert m, line
    assert read_checkpoint(out).step == int(m.group(1)) > 0


def test_a_crafted_optimizer_state_is_one_line_on_resume(tmp_path):
    out = make_tiny_dpm(tmp_path / "c", steps=2)
    ck = read_checkpoint(out)
    state = ck.tensors("state")
    key = next(k for k in state if k.endswith("exp_avg"))
    state[key] = torch.zeros(3)  # hashes recomputed: only the shape betrays it
    config = {k: v for k, v in ck.config.items()
              if k not in ("format", "guidekit_version", "step", "files", "hashes")}
    ckpt_mod.save_checkpoint(out, config, {"model": ck.tensors("model"),
                                           "ema": ck.tensors("ema"), "state": state}, 2)
    with pytest.raises(CheckpointError, match="cannot resume .* optimizer state does not match"):
        make_tiny_dpm(out, steps=4, resume=True)


class _StopBeforeTraining(_NaNAfter):
    def trainable(self):
        raise KeyboardInterrupt(143)  # what SIGTERM raises while a resume is still loading


def test_a_stop_before_the_first_step_keeps_its_exit_status(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8)
    with pytest.raises(Interrupted, match="interrupted before training started; nothing new "
                       "was written") as exc:
        fit(_StopBeforeTraining(1), load_dataset("digits"), tmp_path / "x", cfg, progress=False)
    assert exc.value.exit_code == 143


def test_native_bf16_follows_the_hardware():
    from guidekit.training import native_bf16

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    assert native_bf16(torch.device("cpu")) is bool(caps.get("amx_bf16", False))
    assert native_bf16(torch.device("meta")) is False


def test_adamw_is_fused_on_cpu_and_resumes_its_state():
    from guidekit.training import make_adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = make_adamw([p], 1e-2, 0.0)
    assert opt.defaults["fused"] is True
    p.grad = torch.full((3,), 0.5)
    opt.step()
    again = make_adamw([p], 1e-2, 0.0)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])
