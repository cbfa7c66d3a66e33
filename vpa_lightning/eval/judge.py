"""LLM-as-judge client for an OpenAI-compatible ``/chat/completions`` endpoint (standard library only).

:class:`JudgeClient` sends ``POST {base_url}/chat/completions`` with the JSON body
``{"model", "messages", "temperature": 0, "max_tokens"}`` and ``Authorization: Bearer KEY``.

* **Configuration**: arguments, else environment: ``VPA_JUDGE_BASE_URL`` (fallback
  ``OPENAI_BASE_URL``), ``VPA_JUDGE_MODEL``, ``VPA_JUDGE_API_KEY`` (fallback ``OPENAI_API_KEY``;
  local servers that ignore the key still need one, e.g. ``EMPTY``), ``VPA_JUDGE_CACHE_DIR``.
  A missing value raises :class:`JudgeConfigError` naming the variables.
* **Concurrency**: at most ``max_concurrency`` requests in flight (a thread pool).
* **Bounds**: each attempt has a total deadline of ``timeout`` seconds (connect, headers and the
  whole body: a reply dribbled slowly is cut at the deadline and retried), and a reply over
  ``max_reply_bytes`` is an error for that request (never cached; its size is checked from
  ``Content-Length`` before reading, and while reading).
* **Redirects**: the ``Authorization`` header is never sent to another origin (scheme, host,
  port). A ``307``/``308`` to the same origin is followed; a redirect to another origin is an
  error unless ``cross_origin_redirects=True``, and then it is followed without the key; a
  ``301``/``302``/``303`` is an error naming its target (a POST is not re-sent as a GET).
* **Retries**: connection errors, timeouts, HTTP 429 and 5xx are retried up to ``max_retries``
  times with exponential backoff (``backoff_base * 2**attempt``, capped at ``backoff_max``) and
  jitter (the delay is drawn uniformly from its upper half); a ``Retry-After`` header (seconds)
  replaces the computed delay (still capped). Other 4xx are not retried: the error carries the
  status and the body's ``error.message``.
* **Cache**: one SQLite file (WAL) ``{cache_dir}/judge.sqlite``, one row per request keyed by
  :func:`request_key` = sha256 of the canonical JSON of ``(model, messages, temperature,
  max_tokens)``; the endpoint URL is deliberately not part of the key (the same model behind
  another URL gives the same judgement). A row is committed as soon as its response arrives, so
  a rerun never pays twice and an interrupted run keeps every finished judgement. Before sending,
  a request is *claimed* in the same file (table ``claims``, one transaction): another thread or
  process that needs the same request waits for that judgement instead of paying for it again.
  A claim expires ``timeout + 30`` s after its last renewal (each attempt and each backoff renews
  it), so a crashed process holds nobody up for longer; a request that fails releases its claim.
* **Error policy of** :meth:`JudgeClient.judge_many`: it either returns every reply, in order,
  or raises :class:`JudgeError`. On the first request that fails for good (retries exhausted,
  non-retryable 4xx, malformed reply) requests not yet started are cancelled (a bad key or URL
  must not be paid for thousands of times), requests in flight finish and are cached, then
  :class:`JudgeError` is raised with ``.index`` (the failed request), ``.status`` and
  ``.partial`` (replies obtained so far, ``None`` where missing). Rerunning after the fix only
  sends the requests that are not cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import sqlite3
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

__all__ = ["JudgeClient", "JudgeConfigError", "JudgeError", "Messages", "request_key"]

#: One chat: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
Messages = list[dict[str, Any]]

#: Setting -> environment variables tried in order (first set wins).
ENV_VARS: dict[str, tuple[str, ...]] = {
    "base_url": ("VPA_JUDGE_BASE_URL", "OPENAI_BASE_URL"),
    "model": ("VPA_JUDGE_MODEL",),
    "api_key": ("VPA_JUDGE_API_KEY", "OPENAI_API_KEY"),
}


class JudgeConfigError(ValueError):
    """A judge setting (URL, model, key) is neither an argument nor in the environment."""


class JudgeError(RuntimeError):
    """A judge request failed for good (after its retries, or a non-retryable error).

    Attributes:
        status: HTTP status of the last attempt (``None`` for connection errors/timeouts).
        index: Position of the failed request in the ``judge_many`` list (``None`` for ``judge``).
        partial: Replies obtained by ``judge_many`` before it stopped (``None`` where missing).
    """

    def __init__(self, message: str, status: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.index = index
        self.partial: list[str | None] = []


class _Cancelled(Exception):
    """Internal: a request skipped because another one of the same ``judge_many`` failed."""


class _Retryable(Exception):
    """Internal: one attempt failed in a way worth retrying."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def request_key(model: str, messages: Messages, temperature: float, max_tokens: int, **options: Any) -> str:
    """Cache key of one request: sha256 of the canonical JSON of its four determining fields, and of the sampling
    ``options`` (``n``, ``top_p``, ``seed``) when a request sets them (a judgement's key is unchanged)."""
    payload = json.dumps(
        {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
         **{k: v for k, v in options.items() if v is not None}},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _from_env(setting: str, value: str | None) -> str:
    if value:
        return value
    for var in ENV_VARS[setting]:
        if os.environ.get(var):
            return os.environ[var]
    names = " or ".join(ENV_VARS[setting])
    raise JudgeConfigError(f"judge {setting} is not set: pass {setting}= or set {names}")


def _error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the (truncated) raw body."""
    text = body.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return text[:500]


def _origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)``: what must match for a request to carry the API key."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


#: Redirects followed at most per attempt; bytes of an error body read for its message.
_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 << 10
#: A claim outlives the request's deadline by this much (seconds) before others may take it over.
_CLAIM_SLACK = 30.0


def _retry_after(headers: Any) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form; an HTTP date is ignored)."""
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class JudgeClient:
    """Cached, retrying, concurrency-limited client of an OpenAI-compatible chat endpoint.

    Args:
        base_url: Endpoint root, e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is
            appended). Default: ``$VPA_JUDGE_BASE_URL``, else ``$OPENAI_BASE_URL``.
        model: Judge model name. Default: ``$VPA_JUDGE_MODEL``.
        api_key: Bearer token. Default: ``$VPA_JUDGE_API_KEY``, else ``$OPENAI_API_KEY``.
        cache_dir: Directory of the SQLite cache ``judge.sqlite``. Default:
            ``$VPA_JUDGE_CACHE_DIR``, else ``~/.cache/vpa/judge``.
        max_concurrency: Most requests in flight at once.
        timeout: Per-request timeout in seconds (connect + read).
        max_retries: Retries after the first attempt (so ``max_retries + 1`` attempts at most).
        backoff_base: First retry delay in seconds (doubles each retry; jittered).
        backoff_max: Upper bound of one retry delay (also caps ``Retry-After``).
        max_tokens: Default ``max_tokens`` of a request.
        temperature: Sampling temperature (0 = deterministic judging, as published protocols use).
        max_reply_bytes: Largest reply body accepted (a larger one fails that request, uncached).
        cross_origin_redirects: Follow a ``307``/``308`` to another origin (without the API key).
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        cache_dir: str | Path | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        max_reply_bytes: int = 8 << 20,
        cross_origin_redirects: bool = False,
    ) -> None:
        self.base_url = _from_env("base_url", base_url).rstrip("/")
        self.model = _from_env("model", model)
        self._api_key = _from_env("api_key", api_key)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_tokens = max_tokens
        self.temperature = temperature
        if max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be >= 1, got {max_reply_bytes}")
        self.max_reply_bytes = max_reply_bytes
        self.cross_origin_redirects = cross_origin_redirects
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise JudgeConfigError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")
        cache_dir = cache_dir or os.environ.get("VPA_JUDGE_CACHE_DIR") or Path.home() / ".cache" / "vpa" / "judge"
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = self.cache_dir / "judge.sqlite"
        # One connection shared by the worker threads; the lock serialises its use (the
        # writes are tiny next to an HTTP round trip).
        self._lock = threading.Lock()
        # autocommit: every write below is one explicit BEGIN IMMEDIATE ... COMMIT
        self._conn = sqlite3.connect(self.cache_path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._conn.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)")
        self.requests_sent = 0
        self.cache_hits = 0
        self.retries = 0

    def __repr__(self) -> str:  # never print the key
        return f"JudgeClient(base_url={self.base_url!r}, model={self.model!r}, cache={str(self.cache_path)!r})"

    @property
    def counters(self) -> dict[str, int]:
        """``{"requests_sent", "cache_hits", "retries"}`` since construction."""
        return {"requests_sent": self.requests_sent, "cache_hits": self.cache_hits, "retries": self.retries}

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    # ---------------------------------------------------------------- cache
    def _cached(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT response FROM judgements WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _transaction(self, *statements: tuple[str, tuple]) -> list[Any]:
        """Run statements in one write transaction (``BEGIN IMMEDIATE``); their first rows."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = [self._conn.execute(sql, args).fetchone() for sql, args in statements]
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return rows

    def _store(self, key: str, body: dict[str, Any], reply: str, owner: str | None = None) -> None:
        self._transaction(
            (
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?)",
                (key, self.model, json.dumps(body, ensure_ascii=False), reply, time.time()),
            ),
            ("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner or "")),
        )

    def _claim(self, key: str, owner: str, extra: float = 0.0) -> bool:
        """Claim (or renew the claim on) ``key`` for ``extra + timeout + 30`` s; ``False`` when it is
        already judged or another live owner holds it."""
        now = time.time()
        expires = now + extra + self.timeout + _CLAIM_SLACK
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                done = self._conn.execute("SELECT 1 FROM judgements WHERE key = ?", (key,)).fetchone()
                held = self._conn.execute("SELECT owner, expires FROM claims WHERE key = ?", (key,)).fetchone()
                ok = done is None and (held is None or held[0] == owner or held[1] < now)
                if ok:
                    self._conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, owner, expires))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return ok

    def _release(self, key: str, owner: str) -> None:
        self._transaction(("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner)))

    def cached_count(self) -> int:
        """Number of judgements stored in the cache file (all models)."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])

    def close(self) -> None:
        """Close the cache connection."""
        with self._lock:
            self._conn.close()

    # ---------------------------------------------------------------- HTTP
    def _post(self, body: dict[str, Any]) -> str:
        """One attempt; the reply text, or :class:`_Retryable` / :class:`JudgeError`."""
        url = f"{self.base_url}/chat/completions"
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"}
        origin = _origin(url)
        deadline = time.monotonic() + self.timeout  # one deadline for the attempt, redirects included
        self._count("requests_sent")
        for _ in range(_MAX_REDIRECTS + 1):
            status, reply_headers, raw = self._exchange(url, data, headers, deadline)
            if status not in (301, 302, 303, 307, 308):
                break
            target = urljoin(url, reply_headers.get("Location") or "")
            if status not in (307, 308) or urlsplit(target).scheme not in ("http", "https"):
                raise JudgeError(
                    f"judge endpoint {url} redirected (HTTP {status}) to {target!r}; not followed "
                    "(set base_url to the endpoint itself)",
                    status=status,
                )
            if _origin(target) != origin:
                if not self.cross_origin_redirects:
                    raise JudgeError(
                        f"judge endpoint {url} redirected (HTTP {status}) to another origin {target!r}; not "
                        "followed: the API key is never sent across origins (set base_url to the endpoint "
                        "itself, or cross_origin_redirects=True to follow without the key)",
                        status=status,
                    )
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            url = target
        else:
            raise JudgeError(f"judge endpoint redirected more than {_MAX_REDIRECTS} times (last: {url})", status=status)
        if status != 200:
            detail = _error_message(raw)
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}: {detail}", status, _retry_after(reply_headers))
            raise JudgeError(f"judge request rejected with HTTP {status}: {detail}", status=status)
        n = int(body.get("n", 1))
        try:
            choices = json.loads(raw)["choices"]
            texts = [str(c["message"]["content"] or "") for c in choices[:n]]
            if n > 1 and len(texts) != n:
                raise ValueError(f"{len(texts)} choices for n={n}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"malformed reply ({err}; expected choices[i].message.content for n={n}): {raw[:300]!r}") from err
        if not texts:
            raise JudgeError(f"malformed reply (no choices): {raw[:300]!r}")
        return texts[0] if n == 1 else json.dumps(texts, ensure_ascii=False)  # n > 1: cached as one JSON list

    def _exchange(self, url: str, data: bytes, headers: dict[str, str], deadline: float) -> tuple[int, Any, bytes]:
        """POST ``data`` to ``url``; ``(status, headers, body)`` read within ``deadline`` (monotonic).

        A timer shuts the socket down at the deadline, which ends any blocked connect, read or
        dribbled body at once; a 200 body over ``max_reply_bytes`` raises :class:`JudgeError`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable(f"connection error: no reply within the total deadline of {self.timeout} s")
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        https = parts.scheme == "https"
        host, port = parts.hostname or "", parts.port or (443 if https else 80)
        proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(parts.scheme)
        conn: http.client.HTTPConnection
        if proxy:  # honour HTTP(S)_PROXY as urllib did: a CONNECT tunnel for https, absolute-form for http
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if https:
                conn = http.client.HTTPSConnection(p.hostname or "", p.port or 80, timeout=remaining, context=ssl.create_default_context())
                conn.set_tunnel(host, port)
            else:
                conn = http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=remaining)
                path = url
        elif https:
            conn = http.client.HTTPSConnection(host, port, timeout=remaining, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=remaining)
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(remaining, cut)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", path, body=data, headers=headers)
            response = conn.getresponse()
            limit = self.max_reply_bytes if response.status == 200 else _MAX_ERROR_BODY
            length = response.getheader("Content-Length", "")
            if response.status == 200 and length.isdigit() and int(length) > limit:
                raise JudgeError(f"judge reply of {int(length)} bytes is over max_reply_bytes={limit} (not read, not cached)")
            chunks, size = [], 0
            while size <= limit:
                chunk = response.read(min(1 << 16, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit and response.status == 200:
                raise JudgeError(f"judge reply is over max_reply_bytes={limit} bytes (not cached)")
            if expired.is_set():
                raise _Retryable(f"connection error: reply not complete within the total deadline of {self.timeout} s")
            return response.status, response.headers, b"".join(chunks)[:limit]
        except (OSError, http.client.HTTPException) as err:  # socket errors, timeouts, TLS, bad HTTP
            if expired.is_set():
                raise _Retryable(f"connection error: reply not complete within the total deadline of {self.timeout} s") from err
            raise _Retryable(f"connection error: {err!r}") from err
        finally:
            timer.cancel()
            conn.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * (2**attempt))
        return cap / 2 + random.uniform(0, cap / 2)  # jitter spreads synchronized retries apart

    def _request(self, messages: Messages, max_tokens: int, cancel: threading.Event | None = None,
                 temperature: float | None = None, **options: Any) -> str:
        temperature = self.temperature if temperature is None else temperature
        options = {k: v for k, v in options.items() if v is not None}
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, **options}
        key = request_key(self.model, messages, temperature, max_tokens, **options)
        owner = f"{os.getpid()}-{uuid.uuid4().hex}"
        while True:  # the cache, else a claim, else wait for whoever holds the claim
            cached = self._cached(key)
            if cached is not None:
                self._count("cache_hits")
                return cached
            if self._claim(key, owner):
                break
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            time.sleep(random.uniform(0.02, 0.1))
        try:
            for attempt in range(self.max_retries + 1):
                if cancel is not None and cancel.is_set():
                    raise _Cancelled()
                self._claim(key, owner)  # renewed: a live request keeps its claim
                try:
                    reply = self._post(body)
                except _Retryable as err:
                    if attempt == self.max_retries:
                        raise JudgeError(
                            f"judge request failed after {attempt + 1} attempts: {err}", status=err.status
                        ) from err
                    self._count("retries")
                    delay = self._delay(attempt, err.retry_after)
                    self._claim(key, owner, extra=delay)
                    time.sleep(delay)
                    continue
                self._store(key, body, reply, owner)  # committed with the claim's release: an interruption later keeps it
                return reply
            raise AssertionError("unreachable")
        finally:
            self._release(key, owner)  # after a failure another process may try; a no-op once stored

    # ---------------------------------------------------------------- API
    def judge(self, messages: Messages, max_tokens: int | None = None) -> str:
        """The judge's reply to one chat (cached; raises :class:`JudgeError` on failure)."""
        return self._request(messages, max_tokens or self.max_tokens)

    def complete(self, messages: Messages, n: int = 1, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, max_tokens: int | None = None) -> list[str]:
        """``n`` sampled replies to one chat in one request (``n``, ``temperature``, ``top_p``, ``seed`` sent as the
        OpenAI API names them; cached under all of them, so a rerun with the same settings pays nothing)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        reply = self._request(messages, max_tokens or self.max_tokens, None, temperature,
                              n=n if n > 1 else None, top_p=top_p, seed=seed)
        return json.loads(reply) if n > 1 else [reply]

    def judge_many(self, messages_list: Sequence[Messages], max_tokens: int | None = None) -> list[str]:
        """Replies to every chat, in input order, at most ``max_concurrency`` at a time.

        Raises:
            JudgeError: the failure with the lowest index (see the module docstring: pending
                requests are cancelled, finished ones stay cached; ``.index`` and ``.partial``
                are set).
        """
        tokens = max_tokens or self.max_tokens
        cancel = threading.Event()  # per call, so concurrent calls on one client stay independent

        def run(messages: Messages) -> str:
            try:
                return self._request(messages, tokens, cancel)
            except Exception:
                cancel.set()  # set by the failing worker itself, before it can pick up a queued request
                raise

        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(run, m) for m in messages_list]
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: stop retrying, keep what finishes
            cancel.set()
            raise
        finally:
            # After a failure (or an interrupt) queued requests are dropped; in-flight ones
            # finish and are cached. Without a failure everything is already done here.
            pool.shutdown(wait=True, cancel_futures=True)
        results: list[str | None] = [None] * len(futures)
        errors: dict[int, BaseException] = {}
        for index, future in enumerate(futures):
            if future.cancelled():
                continue
            err = future.exception()
            if err is None:
                results[index] = future.result()
            elif not isinstance(err, _Cancelled):
                errors[index] = err
        if errors:
            index = min(errors)
            cause = errors[index]
            error = JudgeError(
                f"judge request {index} of {len(futures)} failed ({len(errors)} failed, "
                f"{sum(r is not None for r in results)} done and cached): {cause}",
                status=getattr(cause, "status", None),
                index=index,
            )
            error.partial = results
            raise error from cause
        return [r for r in results if r is not None]
