"""An append-only JSONL journal of generation events, keyed so that a killed run resumes exactly.

Each line is one JSON object with a `kind` (e.g. "evolve", "answer", "judge") and a `key` (e.g.
"<seed id>/<step>"). Appends are flushed and fsynced per batch; on reopen, a torn last line (the process was
killed mid-write) is cut off, and a key seen twice keeps its first record, so replaying never duplicates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from teams_rl.errors import TeamsRLError


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[tuple[str, str], dict] = {}
        self.torn_lines = 0
        self.duplicate_lines = 0
        self._load()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            data = fh.read()
        good_end = 0
        lines = data.split(b"\n")
        offset = 0
        for i, raw in enumerate(lines):
            end = offset + len(raw) + 1
            complete = i < len(lines) - 1  # the last chunk has no newline after it
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if complete:
                        raise TeamsRLError(f"{self.path}:{i + 1}: corrupt journal line (not JSON); delete the "
                                           "unfinished artifact folder to start over") from None
                    record = None
                if record is None or not complete:
                    self.torn_lines += 1
                    break
                key = (record.get("kind"), record.get("key"))
                if None in key:
                    raise TeamsRLError(f"{self.path}:{i + 1}: journal record without kind/key")
                if key in self._records:
                    self.duplicate_lines += 1
                else:
                    self._records[key] = record
            good_end = end if complete else good_end
            offset = end
        if good_end < len(data):  # drop the torn tail so the next append starts on a fresh line
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def __contains__(self, kind_key: tuple[str, str]) -> bool:
        return kind_key in self._records

    def get(self, kind: str, key: str) -> dict | None:
        return self._records.get((kind, key))

    def records(self, kind: str) -> list[dict]:
        """Records of one kind in the order they were first written."""
        return [r for (k, _), r in self._records.items() if k == kind]

    def __len__(self) -> int:
        return len(self._records)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self._records if k == kind)

    def append(self, records: Iterable[dict]) -> int:
        """Write records (each with `kind` and `key`) that are not yet journaled; returns how many were new."""
        lines = []
        for record in records:
            key = (record["kind"], record["key"])
            if key in self._records:
                continue
            self._records[key] = record
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
        if lines:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return len(lines)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
