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
