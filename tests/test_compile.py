"""The per-step math compiles with fullgraph=True (no graph break, no host sync), and the
--compile paths of sampling and training run and agree with eager."""

from __future__ import annotations

import json

import pytest
import torch

from guidekit import ops
from guidekit.schedule import NoiseSchedule, ScheduleConfig

pytestmark = pytest.mark.slow


def _args():
    tab = NoiseSchedule.from_config(ScheduleConfig()).respace("ddim20").tables
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    k = torch.tensor([0, 5, 10, 19])
    eps, guide, noise = (torch.randn(x.shape, generator=g) for _ in range(3))
    return tab, x, k, eps, guide, noise


@pytest.mark.parametrize("clip", [False, True])
def test_step_ops_compile_fullgraph_and_match_eager(clip):
    torch._dynamo.reset()
    tab, x, k, eps, g, noise = _args()
    var, log_var = ops.variance(tab, k, x, "small")
    cases = [
        (ops.ddim_step, (tab, x, k, eps, g, noise, 0.5, clip)),
        (ops.ddim_step, (tab, x, k, eps, None, None, 0.0, clip)),  # unguided, η = 0
        (ops.ddpm_step, (tab, x, k, eps, var, log_var, g, noise, clip)),
        (ops.ddim_invert_step, (tab, x, k, eps, g, clip)),
    ]
    for fn, args in cases:
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, fn.__name__
        compiled = torch.compile(fn, fullgraph=True)
        eager_out, comp_out = fn(*args), compiled(*args)
        for a, b in zip(
            torch.utils._pytree.tree_leaves(eager_out),
            torch.utils._pytree.tree_leaves(comp_out),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_sampler_matches_eager(guidekit_dpm):
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import sample

    dpm = load_dpm(guidekit_dpm)
    eager = sample(dpm, 3, steps=4, seed=2)
    compiled = sample(dpm, 3, steps=4, seed=2, compile=True)
    torch.testing.assert_close(eager, compiled, rtol=1e-4, atol=1e-4)


def test_compiled_training_runs(tmp_path):
    from guidekit.testing import make_tiny_dpm

    out = make_tiny_dpm(tmp_path / "c", steps=2, compile=True)
    assert (out / "config.json").exists()


def test_compiled_pdae_training_compiles_the_frozen_dpm_and_matches_eager(guidekit_dpm,
                                                                        tmp_path):
    """--compile compiles PDAE's frozen ε_θ as well as what trains, and its first loss (the
    same weights and batch: only the compiled forward differs) agrees with eager's."""
    from guidekit_pdae.training import PDAETask, load_pdae, train_pdae

    from guidekit.lookup import load_dataset
    from guidekit.training import TrainConfig

    data = load_dataset("digits", "train")
    compiled: list[PDAETask] = []
    original = PDAETask.compile_frozen

    def spy(self: PDAETask) -> None:
        compiled.append(self)
        original(self)

    PDAETask.compile_frozen = spy  # type: ignore[method-assign]
    try:
        for name, flag in (("eager", False), ("compiled", True)):
            train_pdae(data, tmp_path / name, pretrained=guidekit_dpm, progress=False,
                       config=TrainConfig(steps=2, batch_size=8, save_every=2, log_every=1,
                                          compile=flag))
    finally:
        PDAETask.compile_frozen = original  # type: ignore[method-assign]
    assert len(compiled) == 1 and compiled[0]._frozen is not compiled[0]._frozen_forward
    eager, comp = (json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])
                   for n in ("eager", "compiled"))
    assert eager["step"] == comp["step"] == 1
    assert comp["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert load_pdae(tmp_path / "compiled").config["train"]["compile"] is True
