"""``vpa_lightning.seva`` is a package whose modules import one way: cli -> rounds -> generate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vpa_lightning.seva as seva

PACKAGE = Path(seva.__file__).parent


def _imports(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("vpa_lightning.seva")}


def test_imports_go_one_way():
    assert not {m for m in _imports("generate") if m.endswith((".cli", ".rounds"))}
    assert not {m for m in _imports("rounds") if m.endswith(".cli")}
    assert "vpa_lightning.seva.rounds" in _imports("cli") and "vpa_lightning.seva.generate" in _imports("cli")
    assert not (PACKAGE.parent / "seva_cli.py").exists() and not (PACKAGE.parent / "seva.py").exists()


def test_python_dash_m_is_vpa_seva_generate():
    proc = subprocess.run([sys.executable, "-m", "vpa_lightning.seva", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--prompts_file" in proc.stdout and "generate" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "vpa_lightning.seva", "--no_such_option", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_option" in proc.stderr
