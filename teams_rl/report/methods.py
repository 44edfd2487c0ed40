"""The sweep table of data-generation methods at one expert-query budget (`+experiment=budget_matched[_small]`
swept over `method=...`): per method, what the budget bought (seeds, expert queries, pairs) and what the data
gave (benchmark scores with their standard errors, the membership-inference AUC with its 95% CI and n).

A group with one job shows lm-eval's standard error of each score; a group of several `seed` jobs shows the
mean ± the standard deviation over them instead (the note under the table says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from teams_rl.report import tables as tbl
from teams_rl.report.collect import benchmark_stderr, number


@dataclass
class MethodRow:
    label: str
    jobs: int
    seeds: float | None = None
    expert_queries: float | None = None
    budget: float | None = None
    capped: bool | None = None
    pairs: float | None = None
    heldout: float | None = None
    reviewer_queries: float | None = None
    scores: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)   # key -> (value, error)
    auc: tuple[float | None, float | None, float | None] = (None, None, None)             # value, CI low, high
    n_members: float | None = None
    n_nonmembers: float | None = None


def applies(jobs) -> bool:
    """True for a sweep whose generations ran under an expert budget cap."""
    return any(j.value("generate", "budget/max_expert_queries") is not None for j in jobs)


def method_label(label: str, jobs) -> str:
    """`method=teams_rl` -> `teams_rl` (other swept keys stay in the label)."""
    parts = [p[len("method="):] if p.startswith("method=") else p for p in label.split(", ")]
    if parts == ["all jobs"]:
        name = next((j.params.get("method") for j in jobs if j.params.get("method")), None)
        return name or label
    return ", ".join(parts)


def _finetuned(ev: dict) -> dict:
    """The fine-tuned model's scores of an evaluate manifest, prefix stripped (as `benchmark_series` gives)."""
    return {k[len("finetuned/"):]: v for k, v in ev.items() if k.startswith("finetuned/")}


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), (float(np.std(present, ddof=1)) if len(present) > 1 else None)


def rows(groups: dict[str, list], primary_attack: str = "loss") -> list[MethodRow]:
    out = []
    for label, js in groups.items():
        done = [j for j in js if j.finished] or js
        row = MethodRow(method_label(label, js), len(done))

        def mean(stage, key, jobs=done):
            return _mean_std([j.value(stage, key) for j in jobs])[0]

        row.seeds, row.budget = mean("generate", "seeds"), mean("generate", "budget/max_expert_queries")
        row.expert_queries = _mean_std([_expert_calls(j.metrics.get("generate") or {}) for j in done])[0]
        row.reviewer_queries = _mean_std([_calls(j.metrics.get("generate") or {}, "reviewer") for j in done])[0]
        row.pairs, row.heldout = mean("generate", "dataset/size"), mean("generate", "dataset/heldout")
        capped = [(j.metrics.get("generate") or {}).get("budget_capped") for j in done]
        row.capped = any(bool(c) for c in capped) if any(c is not None for c in capped) else None
        for key in [k for k, _ in tbl.BENCHMARKS] + ["average"]:
            value, spread = _mean_std([j.value("evaluate", f"finetuned/{key}") for j in done])
            if len(done) == 1:
                ev = done[0].metrics.get("evaluate") or {}
                spread = (tbl.average_stderr(_finetuned(ev)) if key == "average"
                          else benchmark_stderr(_finetuned(ev), key))
            row.scores[key] = (value, spread)
        a = primary_attack
        auc, spread = _mean_std([j.value("privacy", f"{a}/auc") for j in done])
        if len(done) == 1:
            row.auc = (auc, done[0].value("privacy", f"{a}/auc_ci_low"), done[0].value("privacy", f"{a}/auc_ci_high"))
        else:
            row.auc = (auc, None if spread is None else auc - spread, None if spread is None else auc + spread)
        row.n_members, row.n_nonmembers = mean("privacy", "n_members"), mean("privacy", "n_nonmembers")
        out.append(row)
    return out


def _calls(generate: dict, role: str) -> float | None:
    """The role's requests in a generation (0 when it sent none; None without a generation)."""
    if not generate:
        return None
    return float(sum(v for k, v in generate.items() if k.startswith(f"calls/{role}/") and number(v) is not None))


def _expert_calls(generate: dict) -> float | None:
    return _calls(generate, "expert")


def _pct(value: float | None, err: float | None) -> str:
    if value is None:
        return tbl.NOT_RUN
    return f"{100 * value:.2f}" + ("" if err is None else f" ± {100 * err:.2f}")


def _count(value: float | None) -> str:
    if value is None:
        return tbl.NOT_RUN
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def table(method_rows: list[MethodRow], primary_attack: str = "loss") -> tbl.Table:
    attack = tbl.ATTACK_LABELS.get(primary_attack, primary_attack)
    t = tbl.Table("methods", "Methods at an equal expert budget",
                  ["method", "jobs", "seeds used", "expert queries (budget)", "capped", "pairs (held out)",
                   "reviewer queries", *[f"{label} (%)" for _, label in tbl.BENCHMARKS], "average (%)",
                   f"MIA AUC ({attack}) [95% CI]", "MIA n (members + non-members)"])
    several = any(r.jobs > 1 for r in method_rows)
    for r in method_rows:
        auc, lo, hi = r.auc
        auc_cell = tbl.NOT_RUN if auc is None else f"{auc:.3f}" + (
            "" if lo is None or hi is None else f" [{lo:.3f}, {hi:.3f}]")
        t.rows.append([
            r.label, r.jobs, _count(r.seeds),
            f"{_count(r.expert_queries)} ({_count(r.budget)})",
            tbl.NOT_RUN if r.capped is None else ("yes" if r.capped else "no"),
            f"{_count(r.pairs)} ({_count(r.heldout)})", _count(r.reviewer_queries),
            *[_pct(*r.scores.get(k, (None, None))) for k, _ in tbl.BENCHMARKS],
            _pct(*r.scores.get("average", (None, None))), auc_cell,
            tbl.NOT_RUN if r.n_members is None else f"{_count(r.n_members)} + {_count(r.n_nonmembers)}",
        ])
        # the same flags as a single run's privacy table: too few members for a CI, a zero-width bootstrap CI
        flagged = {"n_members": r.n_members, "n_nonmembers": r.n_nonmembers}
        if not several and auc is not None:
            flagged.update({f"{primary_attack}/auc": auc, f"{primary_attack}/auc_ci_low": lo,
                            f"{primary_attack}/auc_ci_high": hi})
        t.notes += tbl.interval_warnings(r.label, flagged)
    t.notes += [
        "expert queries = the expert requests each method's generation needed (evolve + answer, cache hits "
        "included), under the same `expert.budget.max_queries`; capped = the budget ended the data (the next "
        "seed's requests did not fit). Reviewer queries (WizardLM's elimination judge) are outside the expert "
        "budget. pairs = instruction/answer records kept (the held-out ones are the attack's non-members).",
        ("± = standard deviation over the seeds of a group; AUC interval = mean ± that deviation."
         if several else
         "± = lm-eval's standard error of each score (MMLU, a mean over subjects: from the subjects' standard "
         "errors; average: of the mean of the four, as independent); AUC interval = the privacy stage's 95% "
         "bootstrap CI."),
    ]
    return t


def figure_series(method_rows: list[MethodRow]) -> dict:
    """What `teams_rl.plotting.method_comparison` draws, as plain lists."""
    return {
        "labels": [r.label for r in method_rows],
        "expert_queries": [r.expert_queries for r in method_rows],
        "budget": next((r.budget for r in method_rows if r.budget is not None), None),
        "pairs": [r.pairs for r in method_rows],
        "average": [r.scores.get("average", (None, None)) for r in method_rows],
        "auc": [r.auc for r in method_rows],
    }
