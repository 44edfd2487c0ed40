"""The failure policy for LLM results: a request that still fails after its retries is never a result.

Each stage that calls an LLM runs with a `FailureBudget` (`<stage>.max_failed_fraction`, default 0): a failed
request (after the backend's own retries) is sent again while the failed requests stay within that fraction of
the stage's requests; beyond it the stage stops with `LLMFailures` (exit code 4), one line naming the role,
where it was sent, the failure kinds and counts and what was kept, and commits no manifest. A rerun sends
only what is missing: successes are cached and journaled, failures are neither.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from teams_rl.errors import TeamsRLError


class LLMFailures(TeamsRLError):
    """LLM requests kept failing past the stage's failure budget. Finished results are kept (cached, journaled);
    a rerun sends only the failed and unsent requests."""

    exit_code = 4


@dataclass
class FailureBudget:
    """Counts one stage's LLM requests and failures per role; `exceeded` once failures pass the budget.

    `planned` (when the stage knows how many requests it will send) keeps an early failure from counting as
    a large fraction of a small denominator."""

    stage: str
    max_fraction: float = 0.0
    planned: int = 0
    sent: Counter = field(default_factory=Counter)                 # role -> requests sent (failures included)
    failed: Counter = field(default_factory=Counter)               # role -> failed requests
    kinds: dict[str, Counter] = field(default_factory=dict)        # role -> Counter(error_kind)
    where: dict[str, str] = field(default_factory=dict)            # role -> "model at url"
    last_error: dict[str, str] = field(default_factory=dict)       # role -> one example message

    def record(self, role: str, where: str, completion) -> None:
        self.sent[role] += 1
        self.where.setdefault(role, where)
        if not completion.ok:
            self.failed[role] += 1
            self.kinds.setdefault(role, Counter())[completion.error_kind or "error"] += 1
            self.last_error[role] = completion.error or ""

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    def exceeded(self) -> bool:
        return self.total_failed > self.max_fraction * max(self.total_sent, self.planned)

    def describe(self) -> str:
        """'12 of 232 expert requests failed (connection 12; gpt-4 at http://...)', one clause per role."""
        parts = []
        for role, n in sorted(self.failed.items()):
            if not n:
                continue
            kinds = ", ".join(f"{k} {c}" for k, c in self.kinds[role].most_common())
            parts.append(f"{n} of {self.sent[role]} {role} requests failed ({kinds}; {self.where.get(role, '?')})")
        return "; ".join(parts) or "no request failed"

    def error(self, kept: str) -> LLMFailures:
        """The one-line stop: what failed, what is kept, what a rerun does."""
        budget = f"max_failed_fraction={self.max_fraction:g}"
        example = next(iter(self.last_error.values()), "")
        hint = f" (e.g. {example[:160]})" if example else ""
        return LLMFailures(f"{self.stage}: {self.describe()}, over {budget}{hint}; {kept}; "
                           f"rerun to retry the {self.total_failed} failed request(s)")
