"""A round's policy behind an OpenAI-compatible server for the time of its sampling (``serve_command``).

``vpa rounds --backend openai --serve_command "vllm serve {model} --port 8000 --served-model-name policy"
--served_name policy --base_url http://127.0.0.1:8000/v1``: before a round samples, the loop starts the user's
command with ``{model}`` replaced by the round's policy folder (``OUT/round{r-1}/model/merged``; the initial model
in round 0), waits until ``GET {base_url}/models`` answers, samples through it, and stops the server's whole
process group (SIGTERM, then SIGKILL after ``grace`` seconds) so the GPU is free for the fit. The command is the
user's own configuration, split like a shell line (no shell runs it); its output goes to ``serve.log`` in the
round's folder. A server that exits before answering, or does not answer within ``timeout`` seconds, stops the
round with its exit status and log path.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["served"]


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=5) as reply:  # noqa: S310 (the user's URL)
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def served(command: str, base_url: str, model: str, log: Path, *, timeout: float = 900.0,
           grace: float = 30.0) -> Iterator[None]:
    """Run ``command`` (``{model}`` filled in) while the block runs, once ``base_url`` answers."""
    try:
        argv = shlex.split(command.format(model=model))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--serve_command {command!r}: {exc} (placeholders: {{model}}; write {{{{ and }}}} for literal braces)") from exc
    if not argv:
        raise ValueError("--serve_command is empty")
    if _ready(base_url):
        raise RuntimeError(f"--base_url {base_url} already answers before --serve_command started: another server "
                           "holds the port, and the round would sample from it")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"--serve_command could not start {argv[0]!r}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while not _ready(base_url):
            if proc.poll() is not None:
                raise RuntimeError(f"--serve_command exited with status {proc.returncode} before {base_url} answered "
                                   f"(its output: {log})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"--serve_command: {base_url}/models did not answer within {timeout:g} s "
                                   f"(--serve_timeout; its output: {log})")
            time.sleep(0.5)
        yield
    finally:
        _stop(proc, grace)
