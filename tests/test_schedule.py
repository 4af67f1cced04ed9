"""Noise schedules against their formulas, computed independently in float64 numpy.

Every expected value here is derived from the math in DESIGN.md (or the papers it cites), not
from guidekit's own tables: betas from the DDPM / improved-DDPM formulas, the posterior from
Gaussian conditioning of the forward chain, respaced steps from the ᾱ'_k = ᾱ_{s_k} rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidekit import ops
from guidekit.errors import GuidekitError
from guidekit.guidance import timestep_weight
from guidekit.schedule import NoiseSchedule, ScheduleConfig, make_betas, space_timesteps

# ---------------------------------------------------------------------------------------------
# Independent reference formulas (float64 numpy)
# ---------------------------------------------------------------------------------------------


def ref_linear_betas(T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas, scaled by 1000/T so any T spans the range of T=1000 (improved
    DDPM's convention), capped below 1 at 0.999."""
    scale = 1000 / T
    i = np.arange(T, dtype=np.float64)
    frac = i / (T - 1) if T > 1 else np.zeros(1)
    return np.minimum(scale * start + (scale * end - scale * start) * frac, 0.999)


def ref_cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    """Improved DDPM: ᾱ(u) = cos²((u + s)/(1 + s) · π/2), β_t = min(1 − ᾱ(t+1/T)/ᾱ(t/T), 0.999)."""

    def f(u):
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    out = np.empty(T)
    for t in range(T):
        out[t] = min(1 - f((t + 1) / T) / f(t / T), 0.999)
    return out


def ref_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every derived table of DESIGN.md, step by step in float64 (no vectorised shortcuts)."""
    T = len(betas)
    ab = np.empty(T)
    prod = 1.0
    for t in range(T):
        prod *= 1 - betas[t]
        ab[t] = prod
    ab_prev = np.array([1.0] + list(ab[:-1]))
    b = betas
    return {
        "betas": b,
        "alphas": 1 - b,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "alphas_cumprod_next": np.array(list(ab[1:]) + [0.0]),
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ab - 1),
        "posterior_variance": b * (1 - ab_prev) / (1 - ab),
        "posterior_mean_coef1": b * np.sqrt(ab_prev) / (1 - ab),
        "posterior_mean_coef2": np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab),
        "snr": ab / (1 - ab),
    }


def gaussian_conditioning(ab_prev: float, beta: float) -> tuple[float, float, float]:
    """(c1, c2, var) of q(x_{t−1} | x_t, x_0), by conditioning the joint Gaussian numerically.

    Forward chain given x_0: x_{t−1} = √ᾱ_{t−1} x_0 + √(1−ᾱ_{t−1}) ε1,
    x_t = √α_t x_{t−1} + √β_t ε2. Write (x_{t−1}, x_t) = m(x_0) + L (ε1, ε2) and condition
    with the Schur complement — generic linear algebra, not the simplified closed form.
    """
    a = 1 - beta
    L = np.array(
        [
            [math.sqrt(1 - ab_prev), 0.0],
            [math.sqrt(a) * math.sqrt(1 - ab_prev), math.sqrt(beta)],
        ]
    )
    S = L @ L.T  # covariance of (x_{t−1}, x_t) given x_0
    m = np.array([math.sqrt(ab_prev), math.sqrt(a) * math.sqrt(ab_prev)])  # mean per unit x_0
    gain = S[0, 1] / S[1, 1]
    # E[x_{t−1}|x_t, x_0] = m0 x_0 + gain (x_t − m1 x_0) = (m0 − gain m1) x_0 + gain x_t
    return m[0] - gain * m[1], gain, S[0, 0] - gain * S[0, 1]


def np_tab(schedule: NoiseSchedule, name: str) -> np.ndarray:
    return schedule.float64[name].numpy()


# ---------------------------------------------------------------------------------------------
# Betas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 10, 250, 1000])
def test_linear_betas_match_formula(T):
    got = make_betas(ScheduleConfig("linear", T)).numpy()
    np.testing.assert_allclose(got, ref_linear_betas(T), rtol=1e-12, atol=0)


def test_linear_betas_endpoints_at_T1000():
    b = make_betas(ScheduleConfig()).numpy()
    assert len(b) == 1000
    assert b[0] == pytest.approx(1e-4, rel=1e-12)
    assert b[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.all(np.diff(b) > 0)


def test_linear_betas_custom_range_scaled():
    cfg = ScheduleConfig("linear", 100, beta_start=2e-4, beta_end=0.01)
    np.testing.assert_allclose(make_betas(cfg).numpy(), ref_linear_betas(100, 2e-4, 0.01), 1e-12)
    assert make_betas(cfg)[0].item() == pytest.approx(10 * 2e-4)  # scale 1000/T = 10


@pytest.mark.parametrize("T", [1, 10, 1000, 4000])
def test_cosine_betas_match_improved_ddpm(T):
    got = make_betas(ScheduleConfig("cosine", T)).numpy()
    np.testing.assert_allclose(got, ref_cosine_betas(T), rtol=1e-12, atol=1e-15)
    assert np.all(got <= 0.999) and np.all(got > 0)
    assert got[-1] == pytest.approx(0.999)  # ᾱ(1) = 0 exactly, so the last beta is capped


def test_cosine_alphas_cumprod_follow_the_cosine():
    T = 1000
    ab = NoiseSchedule.from_config(ScheduleConfig("cosine", T)).float64["alphas_cumprod"].numpy()
    u = np.arange(1, T + 1) / T
    f = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    # Equal until the 0.999 cap bites at the very end.
    np.testing.assert_allclose(ab[:-1], f[:-1], rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    ScheduleConfig("linear", 1000),
    ScheduleConfig("cosine", 1000),
    ScheduleConfig("linear", 10),
    ScheduleConfig("cosine", 10),
    ScheduleConfig("linear", 1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}{c.num_timesteps}")
def test_every_table_matches_its_formula(cfg):
    s = NoiseSchedule.from_config(cfg)
    ref = ref_tables(
        ref_linear_betas(cfg.num_timesteps)
        if cfg.kind == "linear"
        else ref_cosine_betas(cfg.num_timesteps)
    )
    for name, want in ref.items():
        got = np_tab(s, name)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300, err_msg=name)
        # The float32 tables the engine uses are the float64 ones, rounded once.
        f32 = getattr(s, name)
        assert f32.dtype == torch.float32
        np.testing.assert_allclose(f32.numpy(), want.astype(np.float32), rtol=1e-6, err_msg=name)
    assert s.num_steps == cfg.num_timesteps
    assert torch.equal(s.timesteps, torch.arange(cfg.num_timesteps))


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: f"{c.kind}{c.num_timesteps}")
def test_clipped_log_variances(cfg):
    """β̃_0 = 0, so log β̃ is clipped to β̃_1 at the first step; "large" is β_t with β̃_1 there."""
    s = NoiseSchedule.from_config(cfg)
    b = np_tab(s, "betas")
    pv = np_tab(s, "posterior_variance")
    assert pv[0] == 0.0
    np.testing.assert_allclose(
        np_tab(s, "posterior_log_variance_clipped"), np.log(np.r_[pv[1], pv[1:]]), rtol=1e-12
    )
    np.testing.assert_allclose(
        np_tab(s, "large_log_variance"), np.log(np.r_[pv[1], b[1:]]), rtol=1e-12
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_is_the_gaussian_conditional_of_the_forward_chain(kind):
    """c1, c2 and β̃ are RIGHT: they are what conditioning q(x_{t−1}, x_t | x_0) gives."""
    s = NoiseSchedule.from_config(ScheduleConfig(kind, 1000))
    ab_prev, b = np_tab(s, "alphas_cumprod_prev"), np_tab(s, "betas")
    for k in [0, 1, 2, 10, 100, 500, 998, 999]:
        c1, c2, var = gaussian_conditioning(ab_prev[k], b[k])
        assert np_tab(s, "posterior_mean_coef1")[k] == pytest.approx(c1, rel=1e-9, abs=1e-15)
        assert np_tab(s, "posterior_mean_coef2")[k] == pytest.approx(c2, rel=1e-9, abs=1e-15)
        assert np_tab(s, "posterior_variance")[k] == pytest.approx(var, rel=1e-7, abs=1e-15)


@pytest.mark.parametrize("k", [1, 50, 400, 999])
def test_posterior_by_monte_carlo_regression(k):
    """Sample the forward chain, regress x_{t−1} on (x_0, x_t): slopes are c1, c2 and the residual
    variance is β̃. n = 400k draws; the slopes' standard errors are √(β̃/(n·Var(regressor))),
    below 1e-3 here, so 5e-3 absolute (and 2% on the variance, whose relative standard error is
    √(2/n) ≈ 0.2%) leaves > 5σ of room."""
    s = NoiseSchedule.from_config(ScheduleConfig())
    ab_prev, b = np_tab(s, "alphas_cumprod_prev")[k], np_tab(s, "betas")[k]
    rng = np.random.default_rng(k)
    n = 400_000
    x0 = rng.standard_normal(n) * 1.5 + 0.3
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * rng.standard_normal(n)
    x_t = math.sqrt(1 - b) * x_prev + math.sqrt(b) * rng.standard_normal(n)
    A = np.stack([x0, x_t], 1)
    coef, *_ = np.linalg.lstsq(A, x_prev, rcond=None)
    resid_var = np.mean((x_prev - A @ coef) ** 2)
    assert coef[0] == pytest.approx(np_tab(s, "posterior_mean_coef1")[k], abs=5e-3)
    assert coef[1] == pytest.approx(np_tab(s, "posterior_mean_coef2")[k], abs=5e-3)
    assert resid_var == pytest.approx(np_tab(s, "posterior_variance")[k], rel=0.02)


def test_first_step_posterior_is_x0():
    s = NoiseSchedule.from_config(ScheduleConfig())
    assert np_tab(s, "posterior_mean_coef1")[0] == pytest.approx(1.0, rel=1e-12)
    assert np_tab(s, "posterior_mean_coef2")[0] == 0.0
    assert np_tab(s, "posterior_variance")[0] == 0.0


@pytest.mark.parametrize(
    "bad",
    [torch.tensor([]), torch.tensor([0.1, 0.0]), torch.tensor([0.5, 1.0]), torch.full((2, 2), 0.1)],
)
def test_bad_betas_rejected(bad):
    with pytest.raises(GuidekitError):
        NoiseSchedule(bad)


# ---------------------------------------------------------------------------------------------
# ops: the per-step formulas agree with each other
# ---------------------------------------------------------------------------------------------


def _batch(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    eps = torch.randn(n, 3, generator=gen)
    g = torch.randn(n, 3, generator=gen)
    k = torch.randint(0, 1000, (n,), generator=gen)
    return x, eps, g, k


def test_q_sample_and_predict_x0_are_inverse():
    tab = NoiseSchedule.from_config(ScheduleConfig()).tables
    x, eps, _, k = _batch()
    k = k.clamp(max=900)  # keep √ᾱ away from 0 so float32 inversion is well conditioned
    x_t = ops.q_sample(tab, x, k, eps)
    torch.testing.assert_close(ops.predict_x0(tab, x_t, k, eps), x, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ops.eps_from_x0(tab, x_t, k, x), eps, atol=2e-4, rtol=1e-4)


def test_model_mean_is_posterior_mean_of_predicted_x0():
    tab = NoiseSchedule.from_config(ScheduleConfig()).tables
    x, eps, _, k = _batch()
    want = ops.posterior_mean(tab, ops.predict_x0(tab, x, k, eps), x, k)
    torch.testing.assert_close(ops.model_mean(tab, x, k, eps), want, atol=1e-4, rtol=1e-4)


def test_model_mean_matches_design_formula_in_float64():
    s = NoiseSchedule.from_config(ScheduleConfig())
    x, eps, _, k = _batch()
    b = s.float64["betas"][k][:, None]
    ab = s.float64["alphas_cumprod"][k][:, None]
    want = (x.double() - b / (1 - ab).sqrt() * eps.double()) / (1 - b).sqrt()
    got = ops.model_mean(s.tables, x, k, eps)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def _ddpm_mean(tab, x, k, eps, g):
    var, log_var = ops.variance(tab, k, x, "small")
    mean, _ = ops.ddpm_step(tab, x, k, eps, var, log_var, g, torch.zeros_like(x))
    return mean


def test_guided_eps_is_the_ddpm_mean_shift_by_posterior_variance():
    """ε̂ = guided_eps(ε, g) with no shift gives the same step mean as ε with the shift β̃_t·g
    (variance "small"), for t ≥ 1 (index k ≥ 1)."""
    tab = NoiseSchedule.from_config(ScheduleConfig()).tables
    x, eps, g, k = _batch()
    k = k.clamp(min=1)
    eps_hat = ops.guided_eps(tab, x, k, eps, g)
    a = _ddpm_mean(tab, x, k, eps_hat, torch.zeros_like(g))
    b = _ddpm_mean(tab, x, k, eps, g)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # and the shift really is β̃·g with the true posterior variance
    pv = ops.at(tab["posterior_variance"], k, x)
    torch.testing.assert_close(
        b - _ddpm_mean(tab, x, k, eps, torch.zeros_like(g)), pv * g, atol=2e-6, rtol=1e-3
    )


def test_ddpm_mean_shift_at_last_step_uses_true_posterior_variance():
    """At the last step (k = 0) β̃_0 = 0, so the "small" mean shift Σ·g must vanish, as
    guided_eps (PDAE's training target) says: its coefficient √α(1−ᾱ_{t−1})/√(1−ᾱ_t) is 0 there.

    The clipped log-variance (β̃_1 at k = 0) exists only so log β̃ is finite; it is not Σ_0.
    """
    tab = NoiseSchedule.from_config(ScheduleConfig()).tables
    x, eps, g, _ = _batch()
    k = torch.zeros(len(x), dtype=torch.long)
    eps_hat = ops.guided_eps(tab, x, k, eps, g)
    assert torch.equal(eps_hat, eps)  # ε form: no shift at t = 0
    torch.testing.assert_close(
        _ddpm_mean(tab, x, k, eps, g),
        _ddpm_mean(tab, x, k, eps, torch.zeros_like(g)),
        atol=1e-7,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------


def ref_sections(T: int, counts: list[int]) -> list[int]:
    """guided-diffusion's space_timesteps for section counts, transcribed."""
    size, extra = divmod(T, len(counts))
    start, out = 0, []
    for i, c in enumerate(counts):
        n = size + (1 if i < extra else 0)
        frac = (n - 1) / (c - 1) if c > 1 else 1
        cur = 0.0
        for _ in range(c):
            out.append(start + round(cur))
            cur += frac
        start += n
    return out


def test_space_ddim_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "DDIM10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    # K that does not divide T: exactly K steps with stride T // K
    got = space_timesteps(1000, "ddim300")
    assert len(got) == 300 and got == list(range(0, 900, 3))


@pytest.mark.parametrize("spec", [50, "50", 7, 1000, 2, 1])
def test_space_count_even_and_ends_at_last(spec):
    T = 1000
    k = int(spec)
    got = space_timesteps(T, spec)
    assert len(got) == k and got == sorted(set(got))
    assert got[-1] == T - 1
    if k > 1:
        assert got[0] == 0
        want = [round(i * (T - 1) / (k - 1)) for i in range(k)]
        assert got == want
        d = np.diff(got)
        assert d.max() - d.min() <= 1


@pytest.mark.parametrize(
    "T,spec", [(1000, "10,5"), (1000, "1,1"), (10, "3,3,3"), (100, "25,1,10"), (1000, "500,500")]
)
def test_space_sections(T, spec):
    counts = [int(c) for c in spec.split(",")]
    got = space_timesteps(T, spec)
    assert got == ref_sections(T, counts)
    assert len(got) == sum(counts)


def test_space_sections_10_5_explicit():
    got = space_timesteps(1000, "10,5")
    first, second = got[:10], got[10:]
    assert first[0] == 0 and first[-1] == 499
    assert second == [500, 625, 750, 874, 999]


def test_space_explicit_list():
    assert space_timesteps(1000, [999, 0, 10, 10]) == [0, 10, 999]
    assert space_timesteps(5, (4,)) == [4]


@pytest.mark.parametrize(
    "spec",
    [
        "ddim0",
        "ddim1001",
        "0",
        "1001",
        0,
        -3,
        1001,
        "abc",
        "",
        "10,600",
        "10,0",
        "ddim",
        "1.5",
        [],
        [-1, 3],
        [0, 1000],
    ],
)
def test_space_bad_specs(spec):
    with pytest.raises(GuidekitError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec", ["ddim50", 37, "10,5", [0, 1, 2, 500, 999]])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_respaced_schedule(kind, spec):
    base = NoiseSchedule.from_config(ScheduleConfig(kind, 1000))
    keep = space_timesteps(1000, spec)
    r = base.respace(spec)
    ab = np_tab(base, "alphas_cumprod")[keep]
    assert r.timesteps.tolist() == keep
    assert r.num_steps == len(keep)
    # "Exactly" up to float64 cancellation: the table is rebuilt from β' = 1 − ᾱ'_k/ᾱ'_{k−1},
    # which for cosine's tiny last ᾱ (~1e-9) costs ~1e-16/ᾱ' relative. 1e-7 is still below
    # float32 resolution, i.e. invisible in the tables the engine uses.
    np.testing.assert_allclose(np_tab(r, "alphas_cumprod"), ab, rtol=1e-7)
    want_beta = 1 - ab / np.r_[1.0, ab[:-1]]
    np.testing.assert_allclose(np_tab(r, "betas"), want_beta, rtol=1e-12)
    # every other table follows from the new betas exactly as for a fresh schedule
    ref = ref_tables(want_beta)
    for name, want in ref.items():
        np.testing.assert_allclose(np_tab(r, name), want, rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("spec", [1000, "ddim1000", list(range(1000)), "500,500"])
def test_respacing_to_all_steps_is_identity(spec):
    base = NoiseSchedule.from_config(ScheduleConfig())
    r = base.respace(spec)
    assert torch.equal(r.timesteps, torch.arange(1000))
    for name, v in base.float64.items():
        np.testing.assert_allclose(r.float64[name].numpy(), v.numpy(), rtol=1e-9, err_msg=name)


def test_respacing_a_respaced_schedule_is_rejected():
    r = NoiseSchedule.from_config(ScheduleConfig()).respace("ddim50")
    with pytest.raises(GuidekitError):
        r.respace(10)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [ScheduleConfig(), ScheduleConfig("cosine", 4000), ScheduleConfig("linear", 10, 1e-3, 0.05)],
)
def test_config_round_trip(cfg):
    d = cfg.to_dict()
    assert d["kind"] == cfg.kind and d["num_timesteps"] == cfg.num_timesteps
    assert ScheduleConfig.from_dict(d) == cfg
    assert NoiseSchedule.from_config(ScheduleConfig.from_dict(d)).config == cfg


def test_config_errors():
    with pytest.raises(GuidekitError):
        ScheduleConfig("sigmoid")
    with pytest.raises(GuidekitError):
        ScheduleConfig.from_dict({"kind": "quadratic"})
    with pytest.raises(GuidekitError):
        ScheduleConfig.from_dict({"kind": "linear", "steps": 10})
    with pytest.raises(GuidekitError):
        ScheduleConfig("linear", 0)


# ---------------------------------------------------------------------------------------------
# Per-timestep guidance weights
# ---------------------------------------------------------------------------------------------


def test_weight_constant_is_none():
    s = NoiseSchedule.from_config(ScheduleConfig())
    assert timestep_weight(s, "constant") is None
    assert timestep_weight(s, " Constant ") is None


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_weight_snr_band(kind):
    s = NoiseSchedule.from_config(ScheduleConfig(kind, 1000))
    ref = ref_tables(ref_linear_betas(1000) if kind == "linear" else ref_cosine_betas(1000))
    snr = ref["snr"]
    w = timestep_weight(s, "snr:0.01:1")
    assert w.shape == (1000,) and w.dtype == torch.float32
    want = ((snr >= 0.01) & (snr < 1)).astype(np.float32)
    assert 0 < want.sum() < 1000
    np.testing.assert_array_equal(w.numpy(), want)
    # open bounds
    below, above = (snr < 1).astype(np.float32), (snr >= 1).astype(np.float32)
    np.testing.assert_array_equal(timestep_weight(s, "snr::1").numpy(), below)
    np.testing.assert_array_equal(timestep_weight(s, "snr:1:").numpy(), above)


def test_weight_timestep_band():
    s = NoiseSchedule.from_config(ScheduleConfig())
    w = timestep_weight(s, "t:100:200").numpy()
    want = np.zeros(1000, np.float32)
    want[100:200] = 1
    np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(timestep_weight(s, "t::10").numpy()[:12], [1] * 10 + [0, 0])


@pytest.mark.parametrize(
    "spec", ["snr", "snr:1", "snr:a:b", "t:1:2:3", "x:1:2", "t:5:5", "snr:1e9:", "t:2000:"]
)
def test_weight_bad_specs(spec):
    s = NoiseSchedule.from_config(ScheduleConfig())
    with pytest.raises(GuidekitError):
        timestep_weight(s, spec)


def test_weight_needs_unrespaced_schedule():
    r = NoiseSchedule.from_config(ScheduleConfig()).respace("ddim50")
    with pytest.raises(GuidekitError):
        timestep_weight(r, "t:0:500")


# --------------------------------------------------------------------------- clipping


def _clip_case():
    sched = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=100))
    tab = sched.tables
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4, 1, 3, 3, generator=gen)  # x̂_0 far outside [−1, 1]
    eps, g = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    k = torch.tensor([10, 40, 70, 99])
    return tab, x, k, eps, g


def test_ddim_clip_orders_follow_their_definitions():
    """clip-then-guide (guided-diffusion's order): clamp the unguided x̂_0, re-derive ε, shift
    it, do not clamp again. guide-then-clip: shift, clamp, re-derive. Unguided they agree."""
    tab, x, k, eps, g = _clip_case()
    s1m = ops.at(tab["sqrt_one_minus_alphas_cumprod"], k, x)
    ab_prev = ops.at(tab["alphas_cumprod_prev"], k, x)

    def to_prev(x0, e):
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e

    e1 = ops.eps_from_x0(tab, x, k, ops.predict_x0(tab, x, k, eps).clamp(-1, 1)) - s1m * g
    first, x0_first = ops.ddim_step(tab, x, k, eps, g, None, 0.0, True, clip_first=True)
    torch.testing.assert_close(first, to_prev(ops.predict_x0(tab, x, k, e1), e1))
    assert x0_first.abs().max() > 1  # not clamped a second time

    x0 = ops.predict_x0(tab, x, k, eps - s1m * g).clamp(-1, 1)
    after, _ = ops.ddim_step(tab, x, k, eps, g, None, 0.0, True, clip_first=False)
    torch.testing.assert_close(after, to_prev(x0, ops.eps_from_x0(tab, x, k, x0)))
    assert not torch.allclose(first, after)
    plain = [ops.ddim_step(tab, x, k, eps, None, None, 0.0, True, clip_first=c)[0]
             for c in (True, False)]
    torch.testing.assert_close(plain[0], plain[1])


def test_inversion_with_clip_rederives_eps_from_the_clipped_x0():
    """Like the sampler (and guided-diffusion's and PDAE's encoders), inversion's direction
    term uses the ε that maps x to the clamped x̂_0, not the model's raw ε."""
    tab, x, k, eps, _ = _clip_case()
    ab_cur = ops.at(tab["alphas_cumprod_prev"], k, x)
    ab_next = ops.at(tab["alphas_cumprod"], k, x)
    x0 = ((x - (1 - ab_cur).sqrt() * eps) / ab_cur.sqrt()).clamp(-1, 1)
    eps_clipped = (x - ab_cur.sqrt() * x0) / (1 - ab_cur).sqrt()
    want = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps_clipped
    torch.testing.assert_close(ops.ddim_invert_step(tab, x, k, eps, None, clip=True), want)
    # At the clean start (ᾱ = 1) x̂_0 is x and the model's ε is kept: no 0/0.
    start = ops.ddim_invert_step(tab, x.clamp(-1, 1), torch.zeros(4, dtype=torch.long), eps,
                                 None, clip=True)
    assert torch.isfinite(start).all()
