"""An expert-query budget that ends a generation's data instead of stopping the run (`generate.on_budget: cap`).

The budget is `expert.budget.max_queries`, counted as the expert requests the generation *needs* (journaled,
in flight or answered from the cache), so the data that fits does not depend on what a cache already holds,
and a resumed run goes on counting where the journal stands.

Seeds are taken in order. A seed starts only when the budget still holds its largest possible cost
(`per_seed`) on top of what finished seeds spent and what running seeds may still spend; otherwise it waits
for running seeds to finish. When nothing runs and the next seed's largest cost no longer fits, it starts
alone and every expert request is charged one by one: the first request over the budget is refused, and
that refusal ends the data. Which seeds are evolved therefore depends only on each seed's own requests, never
on which reply came back first.
"""

from __future__ import annotations

from collections import Counter

EXPERT_KINDS = ("evolve", "answer")


def per_seed_max(mode: str, steps: int) -> int:
    """The most expert requests one seed can need: an evolution and an answer per step (one answer with no
    evolution)."""
    return 1 if mode == "none" else 2 * steps


class BudgetCap:
    def __init__(self, max_queries: int, per_seed: int):
        self.max_queries = int(max_queries)
        self.per_seed = int(per_seed)
        self.used: Counter = Counter()      # seed id -> expert requests needed so far
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.started: list[str] = []
        self.refused: str | None = None

    def count_journal(self, journal) -> None:
        """Charge what the journal already holds (a resumed run)."""
        for kind in EXPERT_KINDS:
            for rec in journal.records(kind):
                self.used[rec["key"].rsplit("/", 1)[0]] += 1

    @property
    def spent(self) -> int:
        return sum(self.used.values())

    def fits_next(self) -> bool:
        """True when one more seed's largest cost fits beside what finished seeds spent and running ones may."""
        done = sum(self.used[s] for s in self.finished)
        running = sum(max(self.per_seed, self.used[s]) for s in self.running)
        return done + running + self.per_seed <= self.max_queries

    def exhausted(self) -> bool:
        """True when the started seeds spent the whole budget (a resumed run's journal of later seeds aside)."""
        return sum(self.used[s] for s in self.finished | self.running) >= self.max_queries

    def start(self, seed_id: str) -> None:
        self.running.add(seed_id)
        self.started.append(seed_id)

    def finish(self, seed_id: str) -> None:
        self.running.discard(seed_id)
        self.finished.add(seed_id)

    def charge(self, seed_id: str) -> bool:
        """Book one expert request of `seed_id`; False (and `refused` set) when it is over the budget."""
        if self.spent + 1 > self.max_queries:
            self.refused = (f"expert query budget reached: {self.spent} of expert.budget.max_queries="
                            f"{self.max_queries} needed; the data ends here (generate.on_budget=cap)")
            return False
        self.used[seed_id] += 1
        return True


# ------------------------------------------------------------------------------------------------ config

def capped(cfg) -> bool:
    """True when `generate.on_budget` is `cap`."""
    from teams_rl import config as C

    return C.get(cfg.get("generate") or {}, "on_budget", "stop") == "cap"


def config_keys(cfg) -> list[str]:
    """Under a cap the expert budget decides what the data is, so it is part of the generate fingerprint
    (budgets are run-only everywhere else)."""
    return ["expert.budget.max_queries"] if capped(cfg) else []


def check(cfg) -> None:
    """A cap needs an expert query budget, and non-members held out of the capped data."""
    from omegaconf import OmegaConf

    from teams_rl import config as C
    from teams_rl.errors import TeamsRLError

    if not capped(cfg):
        return
    if OmegaConf.select(cfg, "expert.budget.max_queries", default=None) is None:
        raise TeamsRLError("generate.on_budget=cap needs expert.budget.max_queries (the expert queries the data "
                           "may cost)")
    C.integer(cfg, "expert.budget.max_queries", minimum=1)
    if OmegaConf.select(cfg, "generate.heldout_seeds", default=None) is not None:
        raise TeamsRLError("generate.on_budget=cap counts every expert request against the budget: hold the "
                           "non-members out of the capped data (privacy.holdout_fraction or "
                           "generate.holdout_fraction), not with generate.heldout_seeds")


def cap_plans(cfg, plans: list) -> list:
    """The dry run's expert plans under a cap: the generation stops sending at `expert.budget.max_queries`, so
    the uncapped counts are scaled down to that total (in their proportions, the rounding to the largest fractions)
    and say so. Without a cap, or when the bound fits, the plans are returned as they are."""
    from dataclasses import replace

    if not capped(cfg):
        return plans
    cap = int(cfg.expert.budget.max_queries)
    expert = [p for p in plans if p.role == "expert"]
    total = sum(p.requests for p in expert)
    if total <= cap:
        return plans
    # Largest remainder: each plan gets its proportional share rounded down, and the requests left over go
    # to the largest fractions, so no plan gets more than its own uncapped count.
    shares = [p.requests * cap / total for p in expert]
    counts = [int(share) for share in shares]
    by_fraction = sorted(range(len(expert)), key=lambda i: counts[i] - shares[i])
    for i in by_fraction[:cap - sum(counts)]:
        counts[i] += 1
    capped_counts = dict(zip(map(id, expert), counts, strict=True))
    note = f"capped: {cap:,} of {total:,} expert requests (expert.budget.max_queries, generate.on_budget=cap)"
    out = []
    for p in plans:
        if p.role != "expert":
            out.append(p)
            continue
        out.append(replace(p, requests=capped_counts[id(p)], note=f"{p.note}; {note}" if p.note else note))
    return out
