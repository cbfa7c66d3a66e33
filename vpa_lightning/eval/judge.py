"""LLM-as-judge client for an OpenAI-compatible ``/chat/completions`` endpoint (standard library only).

:class:`JudgeClient` sends ``POST {base_url}/chat/completions`` with the JSON body
``{"model", "messages", "temperature": 0, "max_tokens"}`` and ``Authorization: Bearer KEY``.

* **Configuration**: arguments, else environment: ``VPA_JUDGE_BASE_URL`` (fallback
  ``OPENAI_BASE_URL``), ``VPA_JUDGE_MODEL``, ``VPA_JUDGE_API_KEY`` (fallback ``OPENAI_API_KEY``;
  local servers that ignore the key still need one, e.g. ``EMPTY``), ``VPA_JUDGE_CACHE_DIR``.
  A missing value raises :class:`JudgeConfigError` naming the variables.
* **Concurrency**: at most ``max_concurrency`` requests in flight (a thread pool).
* **Retries**: connection errors, timeouts, HTTP 429 and 5xx are retried up to ``max_retries``
  times with exponential backoff (``backoff_base * 2**attempt``, capped at ``backoff_max``) and
  jitter (the delay is drawn uniformly from its upper half); a ``Retry-After`` header (seconds)
  replaces the computed delay (still capped). Other 4xx are not retried: the error carries the
  status and the body's ``error.message``.
* **Cache**: one SQLite file (WAL) ``{cache_dir}/judge.sqlite``, one row per request keyed by
  :func:`request_key` = sha256 of the canonical JSON of ``(model, messages, temperature,
  max_tokens)``; the endpoint URL is deliberately not part of the key (the same model behind
  another URL gives the same judgement). A row is committed as soon as its response arrives, so
  a rerun never pays twice and an interrupted run keeps every finished judgement.
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
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

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


def request_key(model: str, messages: Messages, temperature: float, max_tokens: int) -> str:
    """Cache key of one request: sha256 of the canonical JSON of its four determining fields."""
    payload = json.dumps(
        {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens},
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
        cache_dir = cache_dir or os.environ.get("VPA_JUDGE_CACHE_DIR") or Path.home() / ".cache" / "vpa" / "judge"
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_path = self.cache_dir / "judge.sqlite"
        # One connection shared by the worker threads; the lock serialises its use (the
        # writes are tiny next to an HTTP round trip).
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.cache_path, timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._conn.commit()
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

    def _store(self, key: str, body: dict[str, Any], reply: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?)",
                (key, self.model, json.dumps(body, ensure_ascii=False), reply, time.time()),
            )
            self._conn.commit()

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
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"},
            method="POST",
        )
        self._count("requests_sent")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:  # before URLError: it is a subclass
            detail = _error_message(err.read() or b"")
            if err.code == 429 or err.code >= 500:
                raise _Retryable(f"HTTP {err.code}: {detail}", err.code, _retry_after(err.headers)) from err
            raise JudgeError(f"judge request rejected with HTTP {err.code}: {detail}", status=err.code) from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Retryable(f"connection error: {err!r}") from err
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"malformed judge reply (no choices[0].message.content): {raw[:300]!r}") from err

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * (2**attempt))
        return cap / 2 + random.uniform(0, cap / 2)  # jitter spreads synchronized retries apart

    def _request(self, messages: Messages, max_tokens: int, cancel: threading.Event | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": max_tokens}
        key = request_key(self.model, messages, self.temperature, max_tokens)
        cached = self._cached(key)
        if cached is not None:
            self._count("cache_hits")
            return cached
        for attempt in range(self.max_retries + 1):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            try:
                reply = self._post(body)
            except _Retryable as err:
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"judge request failed after {attempt + 1} attempts: {err}", status=err.status
                    ) from err
                self._count("retries")
                time.sleep(self._delay(attempt, err.retry_after))
                continue
            self._store(key, body, reply)  # committed now: an interruption later keeps it
            return reply
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- API
    def judge(self, messages: Messages, max_tokens: int | None = None) -> str:
        """The judge's reply to one chat (cached; raises :class:`JudgeError` on failure)."""
        return self._request(messages, max_tokens or self.max_tokens)

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
