"""The claims the quickstart report checks on its own figures: each holds on figures that
bear it out and fails on figures that don't, and the report and summary carry them."""

from __future__ import annotations

import pytest
import torch
from guidekit_classifier.evaluate import digits_like
from guidekit_classifier.training import JUDGE_KIND, load_classifier
from guidekit_pdae.quickstart import (
    QS_GAP_BAND,
    _edit_claim,
    _gap_claim,
    _onestep_claim,
    _probe_claim,
    _reconstruction_claim,
)

from guidekit.lookup import load_dataset
from guidekit.quickstart import render_report
from guidekit.specs import Claim, StepReport


def _gap(ratios: dict[int, float]) -> list[dict]:
    return [{"t": t, "pretrained": 1e-6, "pdae": 1e-6 * r, "ratio": r}
            for t, r in ratios.items()]


def test_gap_claim_covers_the_band_and_only_the_band():
    assert QS_GAP_BAND == (0.05, 0.8)
    inside = {50: 0.9, 300: 0.3, 800: 0.74}
    held = _gap_claim(_gap({1: 1.0, **inside, 900: 0.93, 999: 1.08}), 1000)
    assert held.holds and "50 to 800" in held.claim
    # the ends are shown, not claimed: a ratio above 1 at t = 999 doesn't fail it
    assert "t = 1 1.000" in held.evidence and "t = 999 1.080" in held.evidence
    assert "at most 0.900 (t = 50)" in held.evidence and "least 0.300 (t = 300)" in held.evidence
    assert not _gap_claim(_gap({1: 1.0, **inside, 500: 1.01, 999: 0.5}), 1000).holds
    assert not _gap_claim(_gap({**inside, 800: 1.0}), 1000).holds  # equal is not below


def test_onestep_claim():
    rows = [{"t": 100, "pretrained_mse": 0.002, "pdae_mse": 0.001},
            {"t": 900, "pretrained_mse": 0.22, "pdae_mse": 0.19}]
    assert _onestep_claim(rows).holds
    rows[1]["pdae_mse"] = 0.23
    claim = _onestep_claim(rows)
    assert not claim.holds and "t = 900: 0.2300 vs 0.2200" in claim.evidence


def test_reconstruction_claim_needs_both_orderings():
    mse = {"DDIM (inferred x_T)": 2e-4, "PDAE (inferred x_T)": 1e-4,
           "PDAE (random x_T)": 1e-2, "DDIM (random x_T)": 9e-2}

    def claim(changed: dict[str, float]) -> Claim:
        return _reconstruction_claim([{"method": k, "mse": v}
                                      for k, v in {**mse, **changed}.items()])

    assert claim({}).holds
    assert not claim({"PDAE (inferred x_T)": 3e-4}).holds
    assert not claim({"PDAE (random x_T)": 0.1}).holds


def test_edit_claim():
    edit = {"label": 0, "test_accuracy": 1.0, "scales": [
        {"scale": 0.0, "p_label": 0.01, "rose": 0.0},
        {"scale": 32.0, "p_label": 0.88, "rose": 1.0}]}
    assert _edit_claim(edit).holds
    edit["scales"][1]["rose"] = 0.875  # one digit did not move toward 0
    assert not _edit_claim(edit).holds
    edit["scales"][1].update(rose=1.0, p_label=0.4)
    assert not _edit_claim(edit).holds


def test_probe_claim():
    row = {"target": "label", "chance": 0.07, "pdae": 0.95, "pixels": 0.98, "random": 0.9}
    assert _probe_claim([row]).holds  # raw pixels beating z is shown, not claimed
    assert not _probe_claim([{**row, "pdae": 0.85}]).holds
    assert not _probe_claim([{**row, "pdae": 0.05, "random": 0.06}]).holds


@pytest.fixture(scope="module")
def judge(classifier_models):
    return load_classifier(classifier_models["judge"], JUDGE_KIND)


def test_digits_like_holds_for_digits_and_fails_for_noise(judge):
    test = load_dataset("digits", "test").images
    train = load_dataset("digits", "train").images
    digits = {"DDIM-50": train[-40:], "DDPM-100": train[-80:-40]}
    claim, rows = digits_like(judge, digits, test, train)
    assert claim.holds, claim.evidence
    assert [r["images"] for r in rows] == ["DDIM-50", "DDPM-100", "training digits",
                                           "shuffled digits"]
    assert all(r["n"] == 40 and 0 <= r["coverage"] <= 1 for r in rows)
    # the distance to the nearest held-out digit, by hand
    want = torch.cdist(train[-40:].flatten(1).double(), test.flatten(1).double()).min(1)
    assert rows[0]["nearest_l2"] == pytest.approx(float(want.values.median()), abs=1e-4)
    noise = torch.randn((40, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    claim, _ = digits_like(judge, {"DDIM-50": train[-40:], "DDPM-100": noise.clamp(-1, 1)},
                           test, train)
    assert not claim.holds and "DDPM-100" in claim.evidence
    # strokes smeared flat: the right intensities in the wrong places are no digit either
    blurred = train[-40:].mean((2, 3), keepdim=True).expand(-1, 1, 16, 16)
    assert not digits_like(judge, {"DDIM-50": blurred}, test, train)[0].holds


def test_report_lists_claims_first():
    good = StepReport("one", claims=[Claim("a holds", True, "1 < 2")])
    bad = StepReport("two", claims=[Claim("b holds", False, "3 > 2")])
    html = render_report({"one": good, "two": bad}, {})
    assert html.index("Claims checked on this run") < html.index("<h2>one")
    assert "a holds" in html and "NO" in html and "3 &gt; 2" in html
    assert "not expected to hold" in render_report({"one": good}, {}, fast=True)
    assert "Claims checked" not in render_report({"one": StepReport("one")}, {})
