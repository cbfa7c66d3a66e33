"""JudgeClient against a loopback stub of the chat-completions endpoint.

:class:`StubJudge` (also used by ``test_judged.py``) is a ``ThreadingHTTPServer`` on port 0
that answers deterministically (by default ``"echo: <last user message>"``) and can be told to
fail the first N requests (500 / 429 + Retry-After), hang past the client timeout, or answer a
fixed status for requests whose text contains a marker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from vpa_lightning.eval.judge import (
    JudgeClient,
    JudgeConfigError,
    JudgeError,
    request_key,
)


class StubJudge:
    """Deterministic OpenAI-compatible stub; counts requests and the most in flight at once."""

    def __init__(self, reply: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.reply = reply or (lambda body: "echo: " + body["messages"][-1]["content"])
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.fail_first = 0  # the first N requests get fail_status
        self.fail_status = 500
        self.retry_after: str | None = None
        self.hang_first = 0  # the first N requests sleep hang_s before answering
        self.hang_s = 0.0
        self.delay_s = 0.0  # every request sleeps this long (to overlap them)
        self.status_for: dict[str, int] = {}  # marker in the request text -> fixed status
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # http.server's handler name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    n = len(stub.requests)
                    stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    time.sleep(stub.delay_s + (stub.hang_s if n < stub.hang_first else 0.0))
                    text = json.dumps(body)
                    status = next((s for marker, s in stub.status_for.items() if marker in text), None)
                    if n < stub.fail_first:
                        status = stub.fail_status
                    if status is not None:
                        return self._send(status, {"error": {"message": f"stub error {status}"}})
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": stub.reply(body)}}]})
                finally:
                    with stub._lock:
                        stub.inflight -= 1

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    if status == 429 and stub.retry_after is not None:
                        self.send_header("Retry-After", stub.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def client(self, cache_dir: Path, **kwargs: Any) -> JudgeClient:
        """A client of this stub with tiny backoff (tests must stay fast)."""
        kwargs = {"model": "judge-x", "api_key": "sk-test", "backoff_base": 0.001, "timeout": 5.0, **kwargs}
        return JudgeClient(base_url=self.url, cache_dir=cache_dir, **kwargs)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubJudge]:
    server = StubJudge()
    yield server
    server.close()


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"q{i}"}] for i in range(n)]


def test_request_shape_headers_and_order(stub: StubJudge, tmp_path: Path) -> None:
    stub.delay_s = 0.01
    client = stub.client(tmp_path, max_tokens=77)
    replies = client.judge_many(chats(12))
    assert replies == [f"echo: q{i}" for i in range(12)]  # input order, though answered concurrently
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["headers"]["Content-Type"] == "application/json"
    assert set(req["body"]) == {"model", "messages", "temperature", "max_tokens"}
    assert (req["body"]["model"], req["body"]["temperature"], req["body"]["max_tokens"]) == ("judge-x", 0.0, 77)
    assert client.counters == {"requests_sent": 12, "cache_hits": 0, "retries": 0}
    assert "sk-test" not in repr(client)


def test_concurrency_limit(stub: StubJudge, tmp_path: Path) -> None:
    stub.delay_s = 0.05  # long enough that requests overlap
    client = stub.client(tmp_path, max_concurrency=3)
    client.judge_many(chats(12))
    assert stub.max_inflight == 3


def test_retries_5xx_then_success(stub: StubJudge, tmp_path: Path) -> None:
    stub.fail_first = 2
    client = stub.client(tmp_path, max_concurrency=1, max_retries=3)
    assert client.judge_many(chats(2)) == ["echo: q0", "echo: q1"]
    assert len(stub.requests) == 4  # 2 failures + 2 successes
    assert client.retries == 2


def test_retries_exhausted_raise(stub: StubJudge, tmp_path: Path) -> None:
    stub.fail_first = 100
    stub.fail_status = 503
    client = stub.client(tmp_path, max_retries=2)
    with pytest.raises(JudgeError, match="after 3 attempts") as info:
        client.judge(chats(1)[0])
    assert info.value.status == 503
    assert len(stub.requests) == 3


def test_429_honours_retry_after(stub: StubJudge, tmp_path: Path) -> None:
    stub.fail_first, stub.fail_status, stub.retry_after = 1, 429, "0.3"
    client = stub.client(tmp_path, max_retries=2)  # backoff_base is 1 ms: only Retry-After waits 0.3 s
    start = time.monotonic()
    assert client.judge(chats(1)[0]) == "echo: q0"
    assert time.monotonic() - start >= 0.3
    assert client.retries == 1


@pytest.mark.parametrize("status", [400, 401, 404])
def test_4xx_not_retried(stub: StubJudge, tmp_path: Path, status: int) -> None:
    stub.fail_first, stub.fail_status = 100, status
    client = stub.client(tmp_path, max_retries=5)
    with pytest.raises(JudgeError, match=f"HTTP {status}: stub error {status}") as info:
        client.judge(chats(1)[0])
    assert info.value.status == status
    assert len(stub.requests) == 1 and client.retries == 0


def test_timeout_is_retried(stub: StubJudge, tmp_path: Path) -> None:
    stub.hang_first, stub.hang_s = 1, 1.0  # first request answers after 1 s, client gives up at 0.2 s
    client = stub.client(tmp_path, timeout=0.2, max_retries=2)
    assert client.judge(chats(1)[0]) == "echo: q0"
    assert client.retries == 1 and len(stub.requests) == 2


def test_timeout_exhausted(stub: StubJudge, tmp_path: Path) -> None:
    stub.hang_first, stub.hang_s = 100, 0.6
    client = stub.client(tmp_path, timeout=0.1, max_retries=1)
    with pytest.raises(JudgeError, match="after 2 attempts: connection error") as info:
        client.judge(chats(1)[0])
    assert info.value.status is None


def test_connection_refused_is_retried_then_raises(tmp_path: Path) -> None:
    server = StubJudge()
    url = server.url
    server.close()  # nothing listens on that port any more
    client = JudgeClient(base_url=url, model="m", api_key="k", cache_dir=tmp_path, backoff_base=0.001, max_retries=2)
    with pytest.raises(JudgeError, match="connection error"):
        client.judge(chats(1)[0])
    assert client.retries == 2


def test_rerun_hits_cache(stub: StubJudge, tmp_path: Path) -> None:
    first = stub.client(tmp_path).judge_many(chats(5))
    assert len(stub.requests) == 5
    client = stub.client(tmp_path)  # new client, same cache dir: a rerun in a new process
    assert client.judge_many(chats(5)) == first
    assert len(stub.requests) == 5  # the server saw nothing new
    assert client.counters == {"requests_sent": 0, "cache_hits": 5, "retries": 0}
    # The key covers max_tokens (and model, messages, temperature): a change is a new request.
    stub.client(tmp_path).judge_many(chats(1), max_tokens=3)
    assert len(stub.requests) == 6


def test_interrupted_run_keeps_finished_judgements(stub: StubJudge, tmp_path: Path) -> None:
    stub.status_for = {'"q3"': 400}  # item 3 is rejected: judge_many stops there
    client = stub.client(tmp_path, max_concurrency=1)
    with pytest.raises(JudgeError, match="request 3 of 6") as info:
        client.judge_many(chats(6))
    err = info.value
    assert err.index == 3 and err.status == 400
    # Sequential (max_concurrency=1): q0-q2 answered and cached, q3 failed, q4-q5 never sent.
    assert err.partial == ["echo: q0", "echo: q1", "echo: q2", None, None, None]
    assert len(stub.requests) == 4 and client.cached_count() == 3
    stub.status_for = {}
    rerun = stub.client(tmp_path, max_concurrency=1)
    assert rerun.judge_many(chats(6)) == [f"echo: q{i}" for i in range(6)]
    assert rerun.counters["cache_hits"] == 3 and rerun.counters["requests_sent"] == 3
    assert [r["body"]["messages"][0]["content"] for r in stub.requests[4:]] == ["q3", "q4", "q5"]


def test_cache_row_layout(stub: StubJudge, tmp_path: Path) -> None:
    import sqlite3

    stub.client(tmp_path).judge(chats(1)[0], max_tokens=9)
    rows = sqlite3.connect(tmp_path / "judge.sqlite").execute("SELECT key, model, response FROM judgements").fetchall()
    assert rows == [(request_key("judge-x", chats(1)[0], 0.0, 9), "judge-x", "echo: q0")]


def test_env_configuration(stub: StubJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VPA_JUDGE_BASE_URL", "VPA_JUDGE_MODEL", "VPA_JUDGE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VPA_JUDGE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(JudgeConfigError, match="VPA_JUDGE_BASE_URL or OPENAI_BASE_URL"):
        JudgeClient()
    monkeypatch.setenv("OPENAI_BASE_URL", stub.url)  # the fallback works
    with pytest.raises(JudgeConfigError, match="VPA_JUDGE_MODEL"):
        JudgeClient()
    monkeypatch.setenv("VPA_JUDGE_MODEL", "env-model")
    with pytest.raises(JudgeConfigError, match="VPA_JUDGE_API_KEY or OPENAI_API_KEY"):
        JudgeClient()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    monkeypatch.setenv("VPA_JUDGE_API_KEY", "sk-env")  # VPA_ wins over OPENAI_
    client = JudgeClient()
    assert client.judge(chats(1)[0]) == "echo: q0"
    assert client.cache_path == tmp_path / "cache" / "judge.sqlite"
    req = stub.requests[-1]
    assert req["headers"]["Authorization"] == "Bearer sk-env" and req["body"]["model"] == "env-model"
    assert JudgeClient(model="arg-model").model == "arg-model"  # arguments win over the environment
