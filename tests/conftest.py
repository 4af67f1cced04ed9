from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from guidekit import plugins


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins after the test changes the environment; restore afterwards."""
    plugins.reset()
    yield monkeypatch
    plugins.reset()


@pytest.fixture
def lock_holder():
    """``with lock_holder(d):`` another process holds ``d``'s writer lock until the block
    ends, when it is killed (so the test also sees the OS drop a dead holder's lock)."""

    @contextlib.contextmanager
    def hold(d):
        code = ("import time; from guidekit.checkpoint import writer_lock\n"
                f"with writer_lock({str(d)!r}):\n    print('held', flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            yield
        finally:
            holder.kill()
            holder.wait()

    return hold


# The classifier plugin's tiny networks, trained once per session: eval, quality and fewstep
# tests share them.
TINY_CLASSIFIER = dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(),
                       num_heads=1)


def _tiny_fit():
    from guidekit.training import TrainConfig

    return TrainConfig(steps=2, batch_size=16, log_every=1, save_every=2)


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory):
    """``tiny_judge_dir(image_size=None)`` → a judge checkpoint on ``digits`` (trained two
    steps, once per size and session)."""
    from guidekit_classifier.training import default_config, train_judge

    from guidekit.lookup import load_dataset

    made: dict = {}

    def make(image_size: int | None = None):
        if image_size not in made:
            out = tmp_path_factory.mktemp("judge") / "judge"
            data = load_dataset("digits", "train", image_size)
            train_judge(data, out, model=default_config(data, **TINY_CLASSIFIER),
                        config=_tiny_fit(), progress=False,
                        test=load_dataset("digits", "test", image_size))
            made[image_size] = out
        return made[image_size]

    return make


@pytest.fixture(scope="session")
def classifier_models(guidekit_dpm, tiny_judge_dir, tmp_path_factory):
    """The tiny DPM (T = 100), a tiny noisy classifier on its schedule and a tiny judge:
    ``{"ddpm", "classifier", "judge"}`` paths."""
    from guidekit_classifier.training import default_config, train_classifier

    from guidekit.lookup import load_dataset

    out = tmp_path_factory.mktemp("classifier") / "classifier"
    data = load_dataset("digits", "train")
    train_classifier(data, out, dpm=guidekit_dpm, model=default_config(data, **TINY_CLASSIFIER),
                     config=_tiny_fit(), progress=False, test=load_dataset("digits", "test"))
    return {"ddpm": guidekit_dpm, "classifier": out, "judge": tiny_judge_dir()}
