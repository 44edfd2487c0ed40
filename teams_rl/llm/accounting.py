"""Per-role, per-purpose query accounting and the budget guard."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields

import numpy as np


@dataclass
class Counters:
    """The counters kept per role and purpose; `COUNTER_FIELDS` lists them for every reader."""

    queries: int = 0  # requests actually sent to the backend (cache misses), failures included
    cache_hits: int = 0
    failures: int = 0  # sent requests that came back failed after all retries (never results)
    truncated: int = 0  # answers cut off at max_tokens (finish_reason "length"), kept
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    def add(self, other: Counters) -> None:
        for name in COUNTER_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


COUNTER_FIELDS = tuple(f.name for f in fields(Counters))


@dataclass
class RoleAccount:
    """Counters of one LLM role, split by purpose (evolve, answer, judge, ...), plus latencies."""

    role: str
    model: str
    prompt_usd_per_1k: float = 0.0
    completion_usd_per_1k: float = 0.0
    by_purpose: dict[str, Counters] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)  # failed requests by Completion.error_kind
    latencies: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, purpose: str, *, sent: int = 0, hits: int = 0, failures: int = 0, truncated: int = 0,
               prompt_tokens: int = 0, completion_tokens: int = 0, latencies: list[float] = (),
               failure_kind: str | None = None) -> None:
        usd = (prompt_tokens * self.prompt_usd_per_1k + completion_tokens * self.completion_usd_per_1k) / 1000
        with self._lock:
            counters = self.by_purpose.setdefault(purpose, Counters())
            counters.add(Counters(sent, hits, failures, truncated, prompt_tokens, completion_tokens, usd))
            self.latencies.extend(latencies)
            if failure_kind:
                self.failure_kinds[failure_kind] = self.failure_kinds.get(failure_kind, 0) + 1

    @property
    def total(self) -> Counters:
        total = Counters()
        for counters in self.by_purpose.values():
            total.add(counters)
        return total

    def summary(self) -> dict:
        lat = np.asarray(self.latencies, dtype=float)
        pct = {f"latency_p{p}_s": float(np.percentile(lat, p)) if lat.size else None for p in (50, 90, 99)}
        return {
            "role": self.role,
            "model": self.model,
            **asdict(self.total),
            **pct,
            "failure_kinds": dict(sorted(self.failure_kinds.items())),
            "by_purpose": {k: asdict(v) for k, v in sorted(self.by_purpose.items())},
        }


@dataclass
class Budget:
    """Stops a role after exactly `max_queries` sent requests or once `max_usd` is spent."""

    role: str
    max_queries: int | None = None
    max_usd: float | None = None

    def refusal(self, account: RoleAccount, reserved: int = 0) -> str | None:
        """Why one more request may not be sent (None: it may), with `reserved` requests already on their way."""
        total = account.total
        if self.max_usd is not None and total.usd >= self.max_usd:
            return (f"budget reached for role '{self.role}': ${total.usd:.4f} of max_usd={self.max_usd} spent; "
                    "finished work is kept, rerun with a larger budget to resume")
        if self.max_queries is not None and total.queries + reserved >= self.max_queries:
            return (f"budget reached for role '{self.role}': {total.queries + reserved} of "
                    f"max_queries={self.max_queries} queries sent; finished work is kept, rerun with a larger "
                    "budget to resume")
        return None

    def room(self, account: RoleAccount) -> int | None:
        """Queries left under max_queries (None: no query limit)."""
        if self.max_queries is None:
            return None
        return max(0, int(self.max_queries) - account.total.queries)
