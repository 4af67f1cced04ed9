"""The PDAE quickstart steps, in --fast settings on the tiny DPM and a tiny judge: each
writes its checkpoint, its figures and its tables where the report expects them."""

from __future__ import annotations

import shutil

from guidekit_classifier.training import default_config, train_judge
from guidekit_pdae.quickstart import (
    quickstart_autoencoding,
    quickstart_pdae,
    quickstart_sample,
    quickstart_steps,
)
from guidekit_pdae.training import load_pdae
from PIL import Image

from guidekit.lookup import load_dataset
from guidekit.lookup import quickstart_steps as registered_steps
from guidekit.quickstart import render_report
from guidekit.specs import QuickstartContext
from guidekit.training import TrainConfig

TINY = dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)


def test_steps_registered_after_the_classifier_steps():
    steps = {s.name: s for s in registered_steps()}
    names = [s.name for s in quickstart_steps()]
    assert names == ["pdae", "pdae-autoencoding", "pdae-sample"]
    assert all(steps[n].order > steps["guidance"].order for n in names)  # the judge exists


def test_pdae_steps_fast(guidekit_dpm, tmp_path):
    shutil.copytree(guidekit_dpm, tmp_path / "ddpm")
    data = load_dataset("digits", "train")
    train_judge(data, tmp_path / "judge", model=default_config(data, **TINY),
                config=TrainConfig(steps=2, batch_size=16, save_every=2), progress=False)
    ctx = QuickstartContext(out=tmp_path, seed=0, fast=True, progress=False)

    trained = quickstart_pdae(ctx)
    assert load_pdae(tmp_path / "pdae").config["step"] == 4
    gap = next(iter(trained.tables.values()))
    assert [r["t"] for r in gap] == [1, 50, 99]  # the tiny DPM has T = 100
    assert all(r["pretrained"] > 0 for r in gap)
    assert [p.name for p in trained.images] == ["gap.png", "onestep.png"]
    assert [c.claim.split(":")[0] for c in trained.claims] == [
        "PDAE fills the posterior mean gap", "PDAE's one-step x̂_0 is nearer x_0 than the "
        "pre-trained DPM's at every t shown"]
    assert "t from 5 to 80" in trained.claims[0].claim  # T = 100

    auto = quickstart_autoencoding(ctx)
    assert [p.name for p in auto.images] == ["reconstruct.png", "interpolate.png",
                                             "manipulate.png"]
    rec = next(rows for title, rows in auto.tables.items() if title.startswith("reconstr"))
    assert {r["method"] for r in rec} == {"DDIM (inferred x_T)", "PDAE (inferred x_T)",
                                          "PDAE (random x_T)", "DDIM (random x_T)"}
    probe = auto.tables["linear probe, held-out accuracy"]
    assert probe[0]["target"] == "label" and 0 <= probe[0]["pdae"] <= 1
    assert [c.claim.split(" ")[0:2] for c in auto.claims] == [
        ["PDAE", "reconstructs"], ["Moving", "z"], ["z", "holds"]]

    sampled = quickstart_sample(ctx)
    assert (tmp_path / "pdae_latent" / "config.json").is_file()
    with Image.open(sampled.images[0]) as im:
        assert im.format == "PNG"

    html = render_report({"pdae": trained, "pdae-autoencoding": auto, "pdae-sample": sampled},
                         {})
    assert html.count("data:image/png;base64") == 6
    assert "linear probe" in html


def test_autoencoding_without_a_judge_skips_the_edit(guidekit_dpm, tmp_path):
    """Without the classifier plugin's judge there is nothing to score edits: no edit grid."""
    shutil.copytree(guidekit_dpm, tmp_path / "ddpm")
    ctx = QuickstartContext(out=tmp_path, seed=0, fast=True, progress=False)
    quickstart_pdae(ctx)
    auto = quickstart_autoencoding(ctx)
    assert [p.name for p in auto.images] == ["reconstruct.png", "interpolate.png"]
    assert not any("Moving z" in c.claim for c in auto.claims)
    assert not any(title.startswith("editing") for title in auto.tables)
