"""The training loop: exact resumption, atomic checkpoints, NaN handling, and checkpoint
checks (missing, wrong kind, wrong shapes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from guidekit import checkpoint as ckpt_mod
from guidekit.checkpoint import read_checkpoint
from guidekit.ddpm import load_dpm
from guidekit.errors import CheckpointError, GuidekitError
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
    # the metrics log continues from step 4
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


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
    real = ckpt_mod.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # die while writing the second file of the next save
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_dpm(out, steps=4, resume=True)
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    assert read_checkpoint(out).step == 2
    after = _all_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(out.glob(".*.tmp"))  # no temp files left behind
    load_dpm(out)  # still loads


def test_crash_before_config_is_replaced_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = make_tiny_dpm(tmp_path / "c", steps=2)

    def boom(path, data):
        raise OSError("power cut")

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", boom)
    with pytest.raises(OSError, match="power cut"):
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
    assert "NaN" in msg and "by step 4" in msg and "last good checkpoint" in msg
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
    cfg["model"]["config"]["model_channels"] = 16
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match .* in the file but .* in the model"):
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
