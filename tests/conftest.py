import os

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
