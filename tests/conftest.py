import contextlib
import os

import pytest

# Tests run on a 2-core machine; keep thread pools small and deterministic.
os.environ.setdefault("RAYON_NUM_THREADS", "2")


def console_script(name: str) -> str:
    """Path of an installed console script (``vpa``, ``vpa-shard``): the one beside this Python
    first (a venv's bin), else on ``PATH``; the package must be installed (``pip install -e .``)."""
    import shutil
    import sys
    from pathlib import Path

    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"console script {name!r} not installed: pip install -e '.[train,test]'"
    return found


@contextlib.contextmanager
def hard_timeout(seconds: int):
    """Fail with ``TimeoutError`` instead of hanging the suite when the block runs longer than
    ``seconds`` (SIGALRM: main thread, Unix)."""
    import signal

    def _raise(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def no_pack_fallback(monkeypatch):
    """Packed-equals-plain tests fail when packing fell back to the plain path (it does so with a warning, once per
    process, and would then compare the plain path with itself)."""
    from vpa_lightning.models import logps

    original = logps._warn_once

    def strict(message: str) -> None:
        if message.startswith("packed groups not possible"):
            raise AssertionError(f"packing fell back to the plain path: {message}")
        original(message)

    monkeypatch.setattr(logps, "_warn_once", strict)
