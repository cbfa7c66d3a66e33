"""JudgeClient against hostile servers on loopback (issue 13, judge client): no credentials across
origins, replies capped in size, a total deadline per attempt, and one paid request per cache key
even with several processes sharing the cache."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from vpa_lightning.eval.judge import JudgeClient, JudgeError, request_key

from tests.conftest import hard_timeout
from .test_judge import StubJudge, chats

ROOT = Path(__file__).resolve().parents[2]


class RawServer:
    """A loopback server whose POST handler is ``respond(handler)``; records each request's headers."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers)})
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _reply(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    made: list[RawServer] = []
    yield made
    for s in made:
        s.close()


def _redirector(status: int, target: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return respond


def _answer(text: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(h: BaseHTTPRequestHandler) -> None:
        body = _reply(text)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return respond


def _client(url: str, cache: Path, **kw: Any) -> JudgeClient:
    return JudgeClient(base_url=url, model="m", api_key="sk-secret", cache_dir=cache, backoff_base=0.001, **{"timeout": 5.0, **kw})


# ------------------------------------------------------------------ 7. redirects
@pytest.mark.parametrize("status", [302, 307])
def test_redirect_to_another_origin_sends_no_key_and_caches_nothing(servers, tmp_path, status):
    evil = RawServer(_answer("evil judgement"))
    servers.append(evil)
    front = RawServer(_redirector(status, evil.url + "/chat/completions"))
    servers.append(front)
    client = _client(front.url, tmp_path)
    with pytest.raises(JudgeError, match="another origin|redirected"):
        client.judge(chats(1)[0])
    assert front.requests and front.requests[0]["headers"]["Authorization"] == "Bearer sk-secret"
    assert evil.requests == []  # not followed: the other origin never sees the key
    assert client.cached_count() == 0


def test_cross_origin_redirect_on_request_is_followed_without_the_key(servers, tmp_path):
    other = RawServer(_answer("moved"))
    servers.append(other)
    front = RawServer(_redirector(307, other.url + "/chat/completions"))
    servers.append(front)
    client = _client(front.url, tmp_path, cross_origin_redirects=True)
    assert client.judge(chats(1)[0]) == "moved"
    assert len(other.requests) == 1
    assert "Authorization" not in other.requests[0]["headers"]


def test_same_origin_307_is_followed_with_the_key(servers, tmp_path):
    def respond(h: BaseHTTPRequestHandler) -> None:
        if h.path.endswith("/old/chat/completions"):
            return _redirector(307, "/v1/chat/completions")(h)
        return _answer("here")(h)

    server = RawServer(respond)
    servers.append(server)
    client = _client(server.url.replace("/v1", "/old"), tmp_path)
    assert client.judge(chats(1)[0]) == "here"
    assert [r["headers"].get("Authorization") for r in server.requests] == ["Bearer sk-secret"] * 2


# ------------------------------------------------------------------ 8. reply size cap
@pytest.mark.parametrize("with_length", [True, False])
def test_reply_over_the_size_cap_fails_and_is_not_cached(servers, tmp_path, with_length):
    big = _reply("x" * 300_000)

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if with_length:
            h.send_header("Content-Length", str(len(big)))
        else:  # no length: the body runs to the end of the connection
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        for i in range(0, len(big), 8192):
            h.wfile.write(big[i : i + 8192])

    server = RawServer(respond)
    servers.append(server)
    client = _client(server.url, tmp_path, max_reply_bytes=100_000, max_retries=3)
    with hard_timeout(30), pytest.raises(JudgeError, match="max_reply_bytes"):
        client.judge(chats(1)[0])
    assert client.cached_count() == 0 and len(server.requests) == 1  # an error for that request, not retried
    # under the cap the same reply is fine
    assert _client(server.url, tmp_path / "b", max_reply_bytes=1_000_000).judge(chats(1)[0]) == "x" * 300_000


# ------------------------------------------------------------------ 9. total deadline
def test_slowly_dribbled_reply_is_cut_at_the_deadline(servers, tmp_path):
    body = _reply("slow")

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for b in body:  # one byte every 0.1 s: each read is quick, the whole reply takes seconds
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.1)

    server = RawServer(respond)
    servers.append(server)
    client = _client(server.url, tmp_path, timeout=1.0, max_retries=1)
    start = time.monotonic()
    with hard_timeout(30), pytest.raises(JudgeError, match="deadline of 1.0 s"):
        client.judge(chats(1)[0])
    elapsed = time.monotonic() - start
    assert len(body) * 0.1 > 4  # undisturbed, one attempt alone would take this long
    assert elapsed < 2 * 1.0 + 1.5, elapsed  # two attempts, each cut at its 1 s deadline
    assert len(server.requests) == 2 and client.cached_count() == 0


def test_slow_headers_are_cut_at_the_deadline(servers, tmp_path):
    body = _reply("late")

    def respond(h: BaseHTTPRequestHandler) -> None:
        head = [b"HTTP/1.1 200 OK\r\n", *(f"X-Pad-{i}: y\r\n".encode() for i in range(50))]
        for line in [*head, f"Content-Length: {len(body)}\r\n\r\n".encode(), body]:
            h.wfile.write(line)
            h.wfile.flush()
            time.sleep(0.05)  # 2.6 s in all, no single wait near the 0.5 s timeout

    server = RawServer(respond)
    servers.append(server)
    client = _client(server.url, tmp_path, timeout=0.5, max_retries=0)
    start = time.monotonic()
    with hard_timeout(30), pytest.raises(JudgeError, match="deadline"):
        client.judge(chats(1)[0])
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------ 10. one paid request per key across processes
_WORKER = textwrap.dedent(
    """
    import json, random, sys
    from vpa_lightning.eval.judge import JudgeClient
    url, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(int(sys.argv[4]))]
    random.Random(seed).shuffle(chats)
    client = JudgeClient(base_url=url, model="judge-x", api_key="k", cache_dir=cache, max_concurrency=4, timeout=20)
    replies = client.judge_many(chats)
    assert replies == ["echo: " + c[-1]["content"] for c in chats]
    print(json.dumps(client.counters))
    """
)


def test_processes_sharing_a_cache_pay_each_request_once(tmp_path):
    stub = StubJudge()
    stub.delay_s = 0.03  # requests overlap across the processes
    try:
        n, procs = 60, 4
        running = [
            subprocess.Popen([sys.executable, "-c", _WORKER, stub.url, str(tmp_path), str(seed), str(n)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in range(procs)
        ]
        outputs = [p.communicate(timeout=120) for p in running]
        assert all(p.returncode == 0 for p in running), [err[-2000:] for _, err in outputs]
        counters = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        paid = [r["body"]["messages"][-1]["content"] for r in stub.requests]
        assert len(paid) == len(set(paid)) == n, f"{len(paid) - len(set(paid))} requests paid twice"
        assert sum(c["requests_sent"] for c in counters) == n
        assert sum(c["cache_hits"] for c in counters) == n * (procs - 1)
    finally:
        stub.close()


def test_stale_claim_of_a_crashed_process_expires(tmp_path):
    stub = StubJudge()
    try:
        client = stub.client(tmp_path)
        chat = chats(1)[0]
        key = request_key("judge-x", chat, 0.0, client.max_tokens)
        db = sqlite3.connect(tmp_path / "judge.sqlite")
        db.execute("INSERT INTO claims VALUES (?, ?, ?)", (key, "12345-crashed", time.time() + 0.6))
        db.commit()
        start = time.monotonic()
        with hard_timeout(30):
            assert client.judge(chat) == "echo: q0"
        assert time.monotonic() - start >= 0.5  # waited for the claim to expire, then paid once
        assert len(stub.requests) == 1
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # released with the judgement
        db.close()
    finally:
        stub.close()


def test_failed_request_releases_its_claim(tmp_path):
    stub = StubJudge()
    try:
        stub.status_for = {"q0": 401}
        client = stub.client(tmp_path)
        with pytest.raises(JudgeError):
            client.judge(chats(1)[0])
        db = sqlite3.connect(tmp_path / "judge.sqlite")
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # another process may try at once
        db.close()
    finally:
        stub.close()
