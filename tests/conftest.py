from __future__ import annotations

import pytest

from guidekit import plugins


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins after the test changes the environment; restore afterwards."""
    plugins.reset()
    yield monkeypatch
    plugins.reset()
