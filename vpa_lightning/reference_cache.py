"""On-disk cache of reference-model log-probs, keyed by sample key + response index.

The reference model is frozen, so the log-prob of a response under it never
changes: it is computed once (first epoch, first run) and read back in later
epochs and later runs. Values live in one SQLite file per reference
*fingerprint* (model path/name, max length, log-prob method), in
``{cache_dir}/reference-{fingerprint}.sqlite``; a row is
``(key, response_index, response_sha, sum_logps, n_tokens)`` and a lookup only
hits when the stored response hash matches the current response text, so a
rebuilt shard with a changed response is recomputed rather than misread.

SQLite serialises concurrent writers (several ranks / runs on one machine): every write is one
``BEGIN IMMEDIATE`` transaction, which takes the write lock before it reads, so two ranks writing
at once wait for each other (up to 60 s) instead of deadlocking on a lock upgrade, which SQLite
reports at once as "database is locked"; on network file systems without reliable locking give
each node its own ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ReferenceCache"]


class ReferenceCache:
    """Reference log-probs (summed, plus token counts) per ``(key, response_index)``.

    Args:
        cache_dir: Directory for the SQLite files (created if missing).
        fingerprint: Anything JSON-serialisable that identifies the reference
            model and tokenisation; a different fingerprint uses a different file.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: Any) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = self.dir / f"reference-{digest}.sqlite"
        self.fingerprint = fingerprint
        self._conn: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0
        self._write(
            ("CREATE TABLE IF NOT EXISTS logps (key TEXT NOT NULL, idx INTEGER NOT NULL, sha TEXT NOT NULL, "
             "sum_logps REAL NOT NULL, n_tokens INTEGER NOT NULL, PRIMARY KEY (key, idx))", ()),
            ("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)", ()),
            ("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (json.dumps(fingerprint, sort_keys=True, default=str),)),
        )

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            # autocommit: every write below is one explicit BEGIN IMMEDIATE ... COMMIT
            self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            for attempt in range(600):  # switching to WAL takes the database alone for a moment: wait for it
                try:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 599:
                        raise
                    time.sleep(0.1)
        return self._conn

    def _write(self, *statements: tuple[str, Any], many: bool = False) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                (conn.executemany if many else conn.execute)(sql, args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def __getstate__(self) -> dict[str, Any]:  # picklable (connections are not)
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    def lookup(self, keys: Sequence[str], indices: Sequence[int], shas: Sequence[str]) -> tuple[Tensor, Tensor] | None:
        """``(sum_logps [N] float32, n_tokens [N] long)`` if every row is cached, else ``None``."""
        conn = self._connect()
        sums, counts = [], []
        for key, idx, sha in zip(keys, indices, shas):
            row = conn.execute(
                "SELECT sum_logps, n_tokens FROM logps WHERE key = ? AND idx = ? AND sha = ?", (key, int(idx), sha)
            ).fetchone()
            if row is None:
                self.misses += 1
                return None
            sums.append(row[0])
            counts.append(row[1])
        self.hits += 1
        return torch.tensor(sums, dtype=torch.float32), torch.tensor(counts, dtype=torch.long)

    def store(
        self, keys: Sequence[str], indices: Sequence[int], shas: Sequence[str], sum_logps: Tensor, n_tokens: Tensor
    ) -> None:
        """Insert or replace the rows of one batch."""
        rows = [
            (key, int(idx), sha, float(s), int(n))
            for key, idx, sha, s, n in zip(keys, indices, shas, sum_logps.detach().float().cpu().tolist(), n_tokens.cpu().tolist())
        ]
        self._write(("INSERT OR REPLACE INTO logps VALUES (?, ?, ?, ?, ?)", rows), many=True)

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM logps").fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
