"""Every YAML in configs/ starts with the exact command that runs it, and that command parses it.

The command on the first line (``# vpa seva generate --config configs/x.yaml``, or the
``python -m vpa_lightning.cli ...`` spelling; after the last ``&&`` when set-up comes first) is run
through :func:`vpa_lightning.cli.main` with ``--print_config`` appended, so the test checks the
config against the real parser of that subcommand without loading any model.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PREFIXES = (["vpa"], ["python", "-m", "vpa_lightning.cli"])


def _command(config: Path) -> list[str]:
    first = config.read_text().splitlines()[0]
    assert first.startswith("# "), f"{config.name}: first line must be '# <command>'"
    argv = shlex.split(first[2:].split("&&")[-1])
    for prefix in PREFIXES:
        if argv[: len(prefix)] == prefix:
            return argv[len(prefix) :]
    raise AssertionError(f"{config.name}: first line does not run vpa: {first!r}")


def test_every_config_is_covered():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_first_line_command_parses_config(config, capsys, monkeypatch):
    from vpa_lightning.cli import main

    args = _command(config)
    assert f"configs/{config.name}" in args, f"{config.name}: its command must name configs/{config.name}"
    monkeypatch.chdir(ROOT)  # commands are run from the repo root
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out.strip()
