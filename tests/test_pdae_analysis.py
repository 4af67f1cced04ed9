"""``guidekit pdae gap|onestep|probe`` and their Python API on tiny models: the gap is the
posterior mean identity computed by hand, PDAE's shift is the one it trains, a zero G changes
nothing, a short training closes the gap, and mistakes are one line."""

from __future__ import annotations

import json

import pytest
import torch
from guidekit_pdae.analysis import (
    default_gap_timesteps,
    linear_probe,
    one_step_x0,
    parse_timesteps,
    posterior_mean_gap,
    probe_targets,
)
from guidekit_pdae.networks import (
    Encoder,
    EncoderConfig,
    EstimatorConfig,
    GradientEstimator,
    PDAEModel,
)
from guidekit_pdae.training import LoadedPDAE, fingerprint, load_pdae, train_pdae
from PIL import Image

from guidekit import ops
from guidekit.data import ImageData, make_shapes, save_images
from guidekit.ddpm import train_ddpm
from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset
from guidekit.schedule import ScheduleConfig
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli, tiny_unet_config
from guidekit.training import TrainConfig

T = 100  # the tiny DPM's schedule


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=16, lr=2e-3, log_every=steps, save_every=steps)


@pytest.fixture(scope="module")
def test_images():
    return load_dataset("digits", "test").images


@pytest.fixture(scope="module")
def trained(guidekit_dpm, tmp_path_factory):
    """A tiny PDAE trained 30 steps on the tiny DPM (about 2 s)."""
    out = tmp_path_factory.mktemp("pdae_analysis") / "pdae"
    train_pdae(load_dataset("digits", "train"), out, pretrained=guidekit_dpm, latent_dim=8,
               encoder_channels=8, config=_cfg(30), progress=False)
    return out


@pytest.fixture(scope="module")
def pdae(trained):
    return load_pdae(trained)


def untrained(p: LoadedPDAE, seed: int = 0) -> LoadedPDAE:
    """The PDAE as train_pdae initialises it (seeded): G_ψ is exactly 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Encoder(EncoderConfig.from_dict(p.config["encoder"]))
        est = GradientEstimator(EstimatorConfig.from_dict(p.config["estimator"]))
    model = PDAEModel(p.dpm.model, enc, est).eval().requires_grad_(False)
    return LoadedPDAE(p.dpm, model, p.config, p.path, fingerprint(enc, est))


# --------------------------------------------------------------------------- timesteps


def test_default_timesteps_spread_over_1_to_T_minus_1():
    ts = default_gap_timesteps(1000)
    assert ts == [1, 10, 25, 50, *range(100, 1000, 100), 999]
    small = default_gap_timesteps(T)
    assert small[0] == 1 and small[-1] == T - 1 and small == sorted(set(small))
    assert parse_timesteps(None, T, minimum=0) == [10, 30, 50, 70, 90]
    assert parse_timesteps("50, 5,50", T) == [5, 50]


@pytest.mark.parametrize("text, needle", [("0,10", "β̃ = 0"), ("10,100", "1..99"),
                                           ("a,b", "comma-separated"), (",", "at least one")])
def test_bad_timesteps_are_errors(text, needle):
    with pytest.raises(GuidekitError, match=needle):
        parse_timesteps(text, T)


# --------------------------------------------------------------------------- gap


def test_gap_is_c1_squared_times_the_x0_error(pdae, test_images):
    """μ_θ = μ̃(x_t, x̂_0), so ‖μ − μ̃(x_t, x_0)‖² = c1_t² ‖x̂_0 − x_0‖²; PDAE's x̂_0 comes from
    guided_eps, so its gap being the same identity shows the measured shift is β̃_t·G."""
    x0, ts, seed = test_images[:32], [5, 40, 90], 3
    rows = posterior_mean_gap(pdae, x0, ts, seed=seed)
    tab = pdae.dpm.schedule.tables
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    z = pdae.encode(x0)
    for row, t in zip(rows, ts, strict=True):
        k = torch.full((len(x0),), t)
        x_t = ops.q_sample(tab, x0, k, noise)
        eps, g = pdae.shift(x_t, k, z)
        c1 = float(tab["posterior_mean_coef1"][t])
        pre = c1**2 * (ops.predict_x0(tab, x_t, k, eps) - x0).square().mean()
        eps_hat = ops.guided_eps(tab, x_t, k, eps, g)
        post = c1**2 * (ops.predict_x0(tab, x_t, k, eps_hat) - x0).square().mean()
        assert row["t"] == t
        assert row["pretrained"] == pytest.approx(float(pre), rel=1e-4)
        assert row["pdae"] == pytest.approx(float(post), rel=1e-4)
        assert row["ratio"] == pytest.approx(row["pdae"] / row["pretrained"])


def test_untrained_pdae_has_exactly_the_pretrained_gap(pdae, test_images):
    rows = posterior_mean_gap(untrained(pdae), test_images[:16], [1, 50, 99])
    for r in rows:
        assert r["pdae"] == r["pretrained"] > 0 and r["ratio"] == 1.0


def test_short_training_closes_the_gap(pdae, test_images):
    rows = posterior_mean_gap(pdae, test_images[:64], [20, 50, 90])
    # measured: ratios 0.49, 0.20, 0.20 after 30 steps
    assert all(r["ratio"] < 0.7 for r in rows), rows


def test_gap_depends_on_the_seed_only(pdae, test_images):
    a = posterior_mean_gap(pdae, test_images[:16], [30], seed=1)
    assert a == posterior_mean_gap(pdae, test_images[:16], [30], seed=1)
    assert a != posterior_mean_gap(pdae, test_images[:16], [30], seed=2)


# --------------------------------------------------------------------------- one step


def test_one_step_shapes_range_and_mse(pdae, test_images):
    x0, ts = test_images[:4], [10, 60]
    res = one_step_x0(pdae, x0, ts)
    assert [r["t"] for r in res["rows"]] == ts
    for key in ("x_t", "pretrained", "pdae"):
        assert len(res[key]) == len(ts)
        for x in res[key]:
            assert x.shape == x0.shape and x.min() >= -1 and x.max() <= 1
    for r, pre, post in zip(res["rows"], res["pretrained"], res["pdae"], strict=True):
        assert r["pretrained_mse"] == pytest.approx(float(((pre - x0) / 2).square().mean()))
        assert r["pdae_mse"] == pytest.approx(float(((post - x0) / 2).square().mean()))
    # the trained shift recovers x_0 better from a mid-noise x_t (measured 0.09 vs 0.15)
    mid = one_step_x0(pdae, test_images[:32], [30])["rows"][0]
    assert mid["pdae_mse"] < 0.9 * mid["pretrained_mse"]


def test_untrained_one_step_equals_the_pretrained_one(pdae, test_images):
    res = one_step_x0(untrained(pdae), test_images[:4], [50])
    assert torch.equal(res["pretrained"][0], res["pdae"][0])


# --------------------------------------------------------------------------- probe


def test_probe_on_digits_reports_the_label(pdae):
    train_d, test_d = load_dataset("digits", "train"), load_dataset("digits", "test")
    res = linear_probe(pdae, train_d, test_d)
    assert (res["n_train"], res["n_test"], res["latent_dim"]) == (1500, 297, 8)
    (row,) = res["targets"]
    assert row["target"] == "label" and row["metric"] == "accuracy"
    assert all(0 <= row[k] <= 1 for k in ("pdae", "pixels", "random", "chance"))
    assert row["pixels"] > 0.9  # digits are nearly linearly separable in pixel space


def test_random_encoder_is_the_seeded_initialisation(pdae):
    """train_pdae seeds E_φ's init with the training seed, so an untrained PDAE (seed 0) and
    the probe's random encoder (seed 0) are the same network: identical scores."""
    data = load_dataset("digits", "train")
    res = linear_probe(untrained(pdae, seed=0), data, load_dataset("digits", "test"), seed=0)
    (row,) = res["targets"]
    assert row["pdae"] == row["random"]
    other = linear_probe(untrained(pdae, seed=0), data, load_dataset("digits", "test"), seed=5)
    assert other["targets"][0]["random"] != row["random"]


@pytest.fixture(scope="module")
def shapes_pdae(tmp_path_factory):
    """A tiny DPM and PDAE on 16 px shapes, a few steps each."""
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes("train", n=256, image_size=16)
    train_ddpm(data, root / "ddpm", unet=tiny_unet_config(data),
          schedule=ScheduleConfig(num_timesteps=T), config=_cfg(2), samples=0, progress=False)
    train_pdae(data, root / "pdae", pretrained=root / "ddpm", latent_dim=8, encoder_channels=8,
               config=_cfg(2), progress=False)
    return root / "pdae"


def test_probe_on_shapes_reports_every_factor(shapes_pdae):
    p = load_pdae(shapes_pdae)
    res = linear_probe(p, make_shapes("train", n=256, image_size=16),
                       make_shapes("test", n=128, image_size=16))
    rows = {r["target"]: r for r in res["targets"]}
    assert list(rows) == ["shape", "colour", "x", "y", "scale"]
    for name in ("shape", "colour"):
        assert rows[name]["metric"] == "accuracy" and rows[name]["kind"] == "categorical"
    for name in ("x", "y", "scale"):
        assert rows[name]["metric"] == "r2" and rows[name]["chance"] == 0.0
    assert rows["colour"]["pixels"] > 0.9  # colour is a linear function of the pixels
    assert rows["colour"]["pixels"] > rows["colour"]["chance"] + 0.5


def test_probe_needs_labels_or_factors():
    data = ImageData("plain", torch.zeros(4, 1, 8, 8), labels=None, num_classes=0)
    with pytest.raises(GuidekitError, match="neither labels nor factors"):
        probe_targets(data)


# --------------------------------------------------------------------------- CLI


def test_gap_cli_json_table_and_plot(capsys, trained, tmp_path):
    code, out, _ = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--timesteps",
                           "1,50,99", "--n", "8", "--out-dir", str(tmp_path), "--json")
    assert code == 0
    res = json.loads(out)
    assert res["n"] == 8 and [r["t"] for r in res["timesteps"]] == [1, 50, 99]
    assert set(res["timesteps"][0]) == {"t", "pretrained", "pdae", "ratio"}
    with Image.open(res["plot"]) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    code, out, _ = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--n", "4",
                           "--out-dir", str(tmp_path))
    assert code == 0 and "Posterior mean gap" in out and "gap.png" in out
    assert "99" in out  # the default spread ends at T - 1


def test_onestep_cli_grid_layout(capsys, trained, tmp_path):
    code, out, _ = run_cli(capsys, "pdae", "onestep", "--pdae", str(trained), "--timesteps",
                           "10,50,90", "--n", "5", "--out-dir", str(tmp_path), "--json")
    assert code == 0
    res = json.loads(out)
    assert [r["t"] for r in res["timesteps"]] == [10, 50, 90] and res["mse_scale"] == "[0, 1]"
    rows, cols, cell = 1 + 3 * 3, 5, 16 * 4 + 1  # originals, then x_t / pre / PDAE per t
    # the images fill the bottom-right corner; every row has its label beside it
    assert_grid_layout(res["grid"], rows, cols, cell, row_labels=True)
    with Image.open(res["grid"]) as im:  # labels over 40 px wide, and a title above
        assert im.size[0] > cols * cell + 1 + 40 and im.size[1] > rows * cell + 1
    code, out, _ = run_cli(capsys, "pdae", "onestep", "--pdae", str(trained), "--n", "2",
                           "--out-dir", str(tmp_path))
    assert code == 0 and "[0, 1] scale" in out


def test_probe_cli_on_digits(capsys, trained):
    code, out, _ = run_cli(capsys, "pdae", "probe", "--pdae", str(trained), "--json")
    assert code == 0
    res = json.loads(out)
    assert [r["target"] for r in res["targets"]] == ["label"]
    code, out, _ = run_cli(capsys, "pdae", "probe", "--pdae", str(trained))
    assert code == 0 and "Linear probe" in out and "random encoder" in out


def test_probe_of_an_unlabelled_folder_is_one_line(capsys, shapes_pdae, tmp_path):
    save_images(make_shapes("test", n=3, image_size=16).images, tmp_path / "imgs")
    code, _, err = run_cli(capsys, "pdae", "probe", "--pdae", str(shapes_pdae), "--data",
                           str(tmp_path / "imgs"), "--image-size", "16")
    assert_one_line_error(code, err, "neither labels nor factors")


@pytest.mark.parametrize("args, needles", [
    (["gap", "--timesteps", "0,5"], ("β̃ = 0",)),
    (["onestep", "--timesteps", "100"], ("out of range", "T = 100")),
    (["gap", "--n", "0"], ("--n must be >= 1",)),
    (["gap", "--data", "shapes"], ("1x16x16", "3x32x32")),
])
def test_cli_mistakes_are_one_line(capsys, trained, tmp_path, args, needles):
    code, _, err = run_cli(capsys, "pdae", *args, "--pdae", str(trained),
                           "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, *needles)


def test_missing_checkpoint_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pdae", "probe", "--pdae", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "nope")


# --------------------------------------------------------------------------- gap over DPMs


@pytest.fixture(scope="module")
def cond_dpm(tmp_path_factory):
    """A tiny class-conditional DPM on digits, the PDAE's schedule (T = 100), 2 steps."""
    import dataclasses

    data = load_dataset("digits", "train")
    out = tmp_path_factory.mktemp("cond") / "cond"
    train_ddpm(data, out, unet=dataclasses.replace(tiny_unet_config(data), num_classes=10),
               schedule=ScheduleConfig(num_timesteps=T), config=_cfg(2), samples=0,
               progress=False)
    return out


def _hand_gap(dpm, x0, t, seed, y=None):
    """c1_t² ‖x̂_0 − x_0‖² per pixel from the DPM's own ε on the seeded x_t."""
    tab = dpm.schedule.tables
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    k = torch.full((len(x0),), t)
    x_t = ops.q_sample(tab, x0, k, noise)
    eps = dpm.model(x_t, k) if y is None else dpm.model(x_t, k, y)
    c1 = float(tab["posterior_mean_coef1"][t])
    return float(c1**2 * (ops.predict_x0(tab, x_t, k, eps[:, :1]) - x0).square().mean())


def test_gap_of_other_dpms_on_the_same_x_t(pdae, cond_dpm, test_images):
    from guidekit import load_dpm

    test = load_dataset("digits", "test")
    x0, y, ts, seed = test.images[:24], test.labels[:24], [5, 60], 2
    cond = load_dpm(cond_dpm)
    dpms = {"self": pdae.dpm, "cond": cond}
    rows = posterior_mean_gap(pdae, x0, ts, seed=seed, dpms=dpms, labels=y)
    for row, t in zip(rows, ts, strict=True):
        # the PDAE's own DPM as a --dpm is exactly the pre-trained column
        assert row["dpms"]["self"] == pytest.approx(row["pretrained"], rel=1e-6)
        assert row["dpms"]["cond"] == pytest.approx(_hand_gap(cond, x0, t, seed, y), rel=1e-4)
        every = {**row["dpms"], "pretrained": row["pretrained"], "pdae": row["pdae"]}
        assert row["order"] == sorted(every, key=lambda k: -every[k])
        assert set(row) == {"t", "pretrained", "pdae", "ratio", "dpms", "order"}
    # the class-conditional DPM sees the labels given: other labels, another gap
    wrong = posterior_mean_gap(pdae, x0, ts[:1], seed=seed, dpms={"cond": cond},
                               labels=(y + 1) % 10)
    assert wrong[0]["dpms"]["cond"] != pytest.approx(rows[0]["dpms"]["cond"], rel=1e-6)
    # without other DPMs the rows are as before
    assert set(posterior_mean_gap(pdae, x0, ts[:1])[0]) == {"t", "pretrained", "pdae", "ratio"}


def test_other_dpms_must_match_schedule_shape_and_labels(pdae, cond_dpm, shapes_pdae,
                                                         tmp_path, test_images):
    from guidekit_pdae.analysis import check_comparable

    from guidekit import load_dpm
    from guidekit.testing import make_tiny_dpm

    x0 = test_images[:4]
    other_t = load_dpm(make_tiny_dpm(tmp_path / "t50", steps=1, timesteps=50))
    with pytest.raises(GuidekitError, match=r"another noise schedule \(T = 50\)"):
        posterior_mean_gap(pdae, x0, [5], dpms={"t50": other_t})
    rgb = load_dpm(shapes_pdae.parent / "ddpm")
    with pytest.raises(GuidekitError, match="3x16x16 images but the PDAE's DPM on 1x16x16"):
        posterior_mean_gap(pdae, x0, [5], dpms={"rgb": rgb})
    cond = load_dpm(cond_dpm)
    with pytest.raises(GuidekitError, match="class-conditional: it needs the images' true"):
        posterior_mean_gap(pdae, x0, [5], dpms={"cond": cond})
    with pytest.raises(GuidekitError, match="knows 10 classes but the images have label 12"):
        check_comparable(pdae, {"cond": cond}, torch.tensor([3, 12]))


def test_gap_cli_with_dpms(capsys, trained, guidekit_dpm, cond_dpm, tmp_path):
    code, out, _ = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--timesteps",
                           "10,50", "--n", "8", "--dpm", str(guidekit_dpm), "--dpm",
                           str(cond_dpm), "--dpm-name", "uncond", "--dpm-name", "class-cond",
                           "--out-dir", str(tmp_path), "--json")
    assert code == 0
    res = json.loads(out)
    assert [m["name"] for m in res["dpms"]] == ["uncond", "class-cond"]
    assert [m["kind"] for m in res["dpms"]] == ["unconditional", "class-conditional, true y"]
    row = res["timesteps"][0]
    assert set(row["dpms"]) == {"uncond", "class-cond"}
    assert row["dpms"]["uncond"] == pytest.approx(row["pretrained"], rel=1e-6)  # the same DPM
    with Image.open(res["plot"]) as im:
        assert im.format == "PNG"
    code, out, _ = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--timesteps", "50",
                           "--n", "4", "--dpm", str(cond_dpm), "--out-dir", str(tmp_path))
    assert code == 0 and "cond" in out and "class-conditional, true y" in out


@pytest.mark.parametrize("extra, needles", [
    (["--dpm-name", "a", "--dpm-name", "b"], ("2 --dpm-name for 1 --dpm",)),
    (["--dpm-name", "PDAE"], ("already a column",)),
])
def test_gap_cli_dpm_mistakes_are_one_line(capsys, trained, cond_dpm, tmp_path, extra,
                                           needles):
    code, _, err = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--dpm",
                           str(cond_dpm), *extra, "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, *needles)


def test_gap_cli_missing_dpm_is_one_line(capsys, trained, tmp_path):
    code, _, err = run_cli(capsys, "pdae", "gap", "--pdae", str(trained), "--dpm",
                           str(tmp_path / "nope"), "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, "nope")
