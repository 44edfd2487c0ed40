"""Per-role, per-purpose query accounting and the budget guard."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from teams_rl.errors import BudgetExceeded


@dataclass
class Counters:
    """The counters kept per role and purpose; `COUNTER_FIELDS` lists them for every reader."""

    queries: int = 0  # requests actually sent to the backend (cache misses), failures included
    cache_hits: int = 0
    failures: int = 0
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
    latencies: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, purpose: str, *, sent: int = 0, hits: int = 0, failures: int = 0,
               prompt_tokens: int = 0, completion_tokens: int = 0, latencies: list[float] = ()) -> None:
        usd = (prompt_tokens * self.prompt_usd_per_1k + completion_tokens * self.completion_usd_per_1k) / 1000
        with self._lock:
            counters = self.by_purpose.setdefault(purpose, Counters())
            counters.add(Counters(sent, hits, failures, prompt_tokens, completion_tokens, usd))
            self.latencies.extend(latencies)

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
            "by_purpose": {k: asdict(v) for k, v in sorted(self.by_purpose.items())},
        }


@dataclass
class Budget:
    """Stops a role after exactly `max_queries` sent requests or once `max_usd` is spent."""

    role: str
    max_queries: int | None = None
    max_usd: float | None = None

    def allowed(self, account: RoleAccount, wanted: int) -> int:
        """How many of `wanted` requests may still be sent; raises when nothing may."""
        total = account.total
        if self.max_usd is not None and total.usd >= self.max_usd:
            raise BudgetExceeded(
                f"budget reached for role '{self.role}': ${total.usd:.4f} of max_usd={self.max_usd} spent; "
                "finished work is kept, rerun with a larger budget to resume"
            )
        if self.max_queries is None:
            return wanted
        left = self.max_queries - total.queries
        if left <= 0:
            raise BudgetExceeded(
                f"budget reached for role '{self.role}': {total.queries} of max_queries={self.max_queries} "
                "queries sent; finished work is kept, rerun with a larger budget to resume"
            )
        return min(wanted, left)
