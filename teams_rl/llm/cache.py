"""A persistent request cache in SQLite, safe for threads and for several processes sharing one file."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from teams_rl.llm.types import Completion


class RequestCache:
    """Maps a request's cache key to its successful completion. Failed completions are never stored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            _set_wal(conn)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, model TEXT, value TEXT NOT NULL)"
            )
            self._local.conn = conn
        return conn

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        conn = self._conn()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in conn.execute(f"SELECT key, value FROM completions WHERE key IN ({marks})", chunk):
                data = json.loads(value)
                found[key] = Completion(**data, cached=True)
        return found

    def put_many(self, items: list[tuple[str, str, Completion]]) -> None:
        rows = []
        for key, model, completion in items:
            if not completion.ok:
                continue
            data = {
                "text": completion.text,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "latency_s": completion.latency_s,
                "finish_reason": completion.finish_reason,
            }
            rows.append((key, model, json.dumps(data)))
        if rows:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO completions (key, model, value) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _set_wal(conn: sqlite3.Connection, attempts: int = 50) -> None:
    """Switch to WAL; the switch needs a moment of exclusive access and sqlite answers "database is locked" at once
    (no busy handler) while another process opens the same fresh file, so it is retried for up to ~10 s."""
    import time

    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.2)
