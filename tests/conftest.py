from __future__ import annotations

import pytest

from guidekit import plugins
from guidekit.testing import make_tiny_dpm


@pytest.fixture(scope="session")
def tiny_dpm(tmp_path_factory):
    """A tiny DDPM checkpoint on digits, trained once per session."""
    return make_tiny_dpm(tmp_path_factory.mktemp("tiny") / "ddpm")


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins after the test changes the environment; restore afterwards."""
    plugins.reset()
    yield monkeypatch
    plugins.reset()
