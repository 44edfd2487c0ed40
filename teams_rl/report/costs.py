"""The paper's headline table: LLM queries and dataset size of TeaMs-RL vs the WizardLM baseline.

Inputs are the manifests (`manifest.json`) of two finished `generate` artifacts on the same seeds: one
TeaMs-RL run and one `+experiment=wizardlm_baseline` run. From each it reads
- `metrics["calls/<role>/<purpose>"]`: the LLM requests the generation needed, counted in its journal over
  every (resumed) run; a request answered from the cache still counts, so this is what a from-scratch run
  against a paid API costs;
- `metrics["sent/<role>/<purpose>"]`: the requests actually sent to a backend (cache misses), over all runs;
- `metrics["seeds"]` and `metrics["dataset/size"]` (final records, train + held-out).
The ratios are extrapolated to the paper's scale: the 52,002 Alpaca seeds, WizardLM's 52K x 4 rounds x 3
calls = 624K queries for 250K instructions, and TeaMs-RL's reported 5.73% (queries) and 6.75% (size).

CLI: `python -m teams_rl.report.costs TEAMS_GENERATE_DIR WIZARD_GENERATE_DIR [--out DIR]`, or
`python -m teams_rl.report.costs --artifacts artifacts` to pick the newest finished pair on the same seeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from teams_rl.errors import TeamsRLError

PAPER_SEEDS = 52_002
PAPER_WIZARD_ROUNDS = 4
PAPER_WIZARD_CALLS_PER_ROUND = 3
PAPER_WIZARD_QUERIES = 52_000 * PAPER_WIZARD_ROUNDS * PAPER_WIZARD_CALLS_PER_ROUND  # 624,000 ("~600K")
PAPER_WIZARD_INSTRUCTIONS = 250_000
PAPER_QUERY_RATIO = 0.0573
PAPER_SIZE_RATIO = 0.0675
PURPOSE_ORDER = ("evolve", "answer", "judge")


@dataclass
class CostRow:
    quantity: str
    teams: float | None
    wizard: float | None
    ratio: float | None = None       # teams / wizard
    paper: str = ""                  # what the paper reports for this row


@dataclass
class CostTable:
    rows: list[CostRow]
    meta: dict = field(default_factory=dict)

    def row(self, quantity: str) -> CostRow:
        for r in self.rows:
            if r.quantity == quantity:
                return r
        raise KeyError(quantity)

    def to_markdown(self) -> str:
        lines = ["| quantity | TeaMs-RL | WizardLM baseline | TeaMs-RL / WizardLM | paper |", "|---|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r.quantity} | {_fmt(r.teams)} | {_fmt(r.wizard)} | {_pct(r.ratio)} | {r.paper} |")
        head = []
        if self.meta:
            head.append(f"Seeds: {self.meta.get('seeds_teams')} (TeaMs-RL), {self.meta.get('seeds_wizard')} "
                        f"(WizardLM baseline). Calls = requests the generation needed (cache hits included), "
                        f"summed over resumed runs; extrapolation = per-seed cost x {PAPER_SEEDS:,} Alpaca seeds.")
        return "\n".join(head + [""] + lines) + "\n" if head else "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["quantity", "teams_rl", "wizardlm_baseline", "ratio_teams_over_wizard", "paper"])
        for r in self.rows:
            writer.writerow([r.quantity, "" if r.teams is None else r.teams, "" if r.wizard is None else r.wizard,
                             "" if r.ratio is None else r.ratio, r.paper])
        return buf.getvalue()

    def save(self, out_dir: str | Path, stem: str = "query_costs") -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        md.write_text("# Expert queries and dataset size: TeaMs-RL vs WizardLM\n\n" + self.to_markdown())
        csv_path.write_text(self.to_csv())
        return md, csv_path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.2f}%"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def calls_by_role_purpose(manifest: dict, prefix: str = "calls") -> dict[tuple[str, str], int]:
    """{(role, purpose): count} from a generate manifest's `<prefix>/<role>/<purpose>` metrics."""
    out = {}
    for key, value in (manifest.get("metrics") or {}).items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix:
            out[(parts[1], parts[2])] = int(value)
    return out


def _require(manifest: dict, which: str) -> dict:
    metrics = manifest.get("metrics") or {}
    for key in ("seeds", "dataset/size"):
        if key not in metrics:
            raise TeamsRLError(f"query-cost table: the {which} manifest has no metric '{key}' (is it a finished "
                               "generate artifact?)")
    return metrics


def _order(pair: tuple[str, str]) -> tuple:
    role, purpose = pair
    return (PURPOSE_ORDER.index(purpose) if purpose in PURPOSE_ORDER else len(PURPOSE_ORDER), purpose, role)


def query_cost_table(teams_manifest: dict, wizard_manifest: dict, *, paper_seeds: int = PAPER_SEEDS,
                     paper_wizard_queries: int = PAPER_WIZARD_QUERIES,
                     paper_wizard_instructions: int = PAPER_WIZARD_INSTRUCTIONS,
                     paper_query_ratio: float = PAPER_QUERY_RATIO,
                     paper_size_ratio: float = PAPER_SIZE_RATIO) -> CostTable:
    """The query/size comparison of two generate manifests (TeaMs-RL first, WizardLM baseline second)."""
    tm, wm = _require(teams_manifest, "TeaMs-RL"), _require(wizard_manifest, "WizardLM")
    t_calls, w_calls = calls_by_role_purpose(teams_manifest), calls_by_role_purpose(wizard_manifest)
    t_sent, w_sent = calls_by_role_purpose(teams_manifest, "sent"), calls_by_role_purpose(wizard_manifest, "sent")
    rows: list[CostRow] = []
    t_seeds, w_seeds = int(tm["seeds"]), int(wm["seeds"])
    rows.append(CostRow("seeds", t_seeds, w_seeds, _ratio(t_seeds, w_seeds), f"{paper_seeds:,} (Alpaca)"))
    paper_calls = {"evolve": "1 per step", "answer": "1 per instruction", "judge": "WizardLM: 1 per evolution"}
    for role, purpose in sorted(set(t_calls) | set(w_calls), key=_order):
        t, w = t_calls.get((role, purpose), 0), w_calls.get((role, purpose), 0)
        rows.append(CostRow(f"calls: {role} / {purpose}", t, w, _ratio(t, w), paper_calls.get(purpose, "")))
    t_total, w_total = sum(t_calls.values()), sum(w_calls.values())
    t_expert = sum(v for (r, _), v in t_calls.items() if r == "expert")
    w_expert = sum(v for (r, _), v in w_calls.items() if r == "expert")
    rows.append(CostRow("calls: expert (all purposes)", t_expert, w_expert, _ratio(t_expert, w_expert)))
    rows.append(CostRow("calls: all roles", t_total, w_total, _ratio(t_total, w_total),
                        f"TeaMs-RL {100 * paper_query_ratio:.2f}% of WizardLM"))
    rows.append(CostRow("sent to a backend (cache misses)", sum(t_sent.values()), sum(w_sent.values()),
                        _ratio(sum(t_sent.values()), sum(w_sent.values()))))
    t_size, w_size = int(tm["dataset/size"]), int(wm["dataset/size"])
    rows.append(CostRow("dataset size (final instructions)", t_size, w_size, _ratio(t_size, w_size),
                        f"TeaMs-RL {100 * paper_size_ratio:.2f}% of WizardLM"))
    t_per, w_per = _ratio(t_total, t_size), _ratio(w_total, w_size)
    rows.append(CostRow("calls per final instruction", t_per, w_per, _ratio(t_per, w_per),
                        f"WizardLM {paper_wizard_queries / paper_wizard_instructions:.2f}"))
    t_seed_calls, w_seed_calls = _ratio(t_total, t_seeds), _ratio(w_total, w_seeds)
    rows.append(CostRow("calls per seed", t_seed_calls, w_seed_calls, _ratio(t_seed_calls, w_seed_calls),
                        f"WizardLM {PAPER_WIZARD_ROUNDS} rounds x {PAPER_WIZARD_CALLS_PER_ROUND} calls = "
                        f"{PAPER_WIZARD_ROUNDS * PAPER_WIZARD_CALLS_PER_ROUND}"))
    t_x = None if t_seed_calls is None else round(t_seed_calls * paper_seeds)
    w_x = None if w_seed_calls is None else round(w_seed_calls * paper_seeds)
    rows.append(CostRow(f"calls extrapolated to {paper_seeds:,} seeds", t_x, w_x, _ratio(t_x, w_x),
                        f"WizardLM {paper_wizard_queries:,}; TeaMs-RL {paper_query_ratio * paper_wizard_queries:,.0f}"))
    t_sx = None if not t_seeds else round(t_size / t_seeds * paper_seeds)
    w_sx = None if not w_seeds else round(w_size / w_seeds * paper_seeds)
    rows.append(CostRow(f"dataset size extrapolated to {paper_seeds:,} seeds", t_sx, w_sx, _ratio(t_sx, w_sx),
                        f"WizardLM {paper_wizard_instructions:,}; TeaMs-RL "
                        f"{paper_size_ratio * paper_wizard_instructions:,.0f}"))
    rows.append(CostRow("TeaMs-RL calls vs the paper's WizardLM total", t_x, paper_wizard_queries,
                        _ratio(t_x, paper_wizard_queries), f"{100 * paper_query_ratio:.2f}%"))
    rows.append(CostRow("TeaMs-RL size vs the paper's WizardLM size", t_sx, paper_wizard_instructions,
                        _ratio(t_sx, paper_wizard_instructions), f"{100 * paper_size_ratio:.2f}%"))
    # the paper's TeaMs-RL spent 5.73% of WizardLM's queries: how many seeds, and how large a dataset, that
    # budget buys at the per-seed cost and yield measured here (paper: ~17.9K pairs were reported)
    budget = paper_query_ratio * paper_wizard_queries
    t_budget_seeds = None if not t_seed_calls else round(budget / t_seed_calls)
    rows.append(CostRow("seeds the paper's TeaMs-RL query budget buys here", t_budget_seeds, None, None,
                        f"{budget:,.0f} queries / calls per seed"))
    rows.append(CostRow("dataset size from that budget", None if t_budget_seeds is None or not t_seeds
                        else round(t_budget_seeds * t_size / t_seeds), None, None,
                        f"paper: {paper_size_ratio * paper_wizard_instructions:,.0f} (6.75% of 250K)"))
    meta = {"seeds_teams": t_seeds, "seeds_wizard": w_seeds,
            "same_seeds": (teams_manifest.get("config") or {}).get("seeds") == (wizard_manifest.get("config") or {}).get("seeds")}
    return CostTable(rows, meta)


# ------------------------------------------------------------------------------------------------- CLI

def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise TeamsRLError(f"{folder}: no manifest.json (not a finished artifact)")
    with open(path) as fh:
        return json.load(fh)


def newest_pair(artifacts: str | Path) -> tuple[Path, Path]:
    """The newest finished TeaMs-RL and WizardLM-baseline generate artifacts that used the same seeds."""
    finished = []
    for manifest_path in Path(artifacts).glob("generate/*/manifest.json"):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        mode = (manifest.get("metrics") or {}).get("mode")
        seeds = json.dumps((manifest.get("config") or {}).get("seeds"), sort_keys=True)
        finished.append((manifest.get("finished_at") or "", mode, seeds, manifest_path.parent))
    finished.sort(reverse=True)
    for _, mode, seeds, folder in finished:
        if mode != "teams_rl":
            continue
        for _, other_mode, other_seeds, other in finished:
            if other_mode == "wizardlm" and other_seeds == seeds:
                return folder, other
    raise TeamsRLError(f"{artifacts}: no finished TeaMs-RL and WizardLM-baseline generate artifacts on the same "
                       "seeds (run `python -m teams_rl stages=[generate]` and the same with "
                       "`+experiment=wizardlm_baseline`)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teams_rl.report.costs", description=__doc__.splitlines()[0])
    parser.add_argument("teams", nargs="?", help="TeaMs-RL generate artifact folder")
    parser.add_argument("wizard", nargs="?", help="WizardLM-baseline generate artifact folder")
    parser.add_argument("--artifacts", help="pick the newest pair from this artifacts root instead")
    parser.add_argument("--out", default=".", help="where to write query_costs.md/.csv (default: here)")
    args = parser.parse_args(argv)
    try:
        if args.artifacts:
            teams_dir, wizard_dir = newest_pair(args.artifacts)
        elif args.teams and args.wizard:
            teams_dir, wizard_dir = Path(args.teams), Path(args.wizard)
        else:
            raise TeamsRLError("give TEAMS_DIR WIZARD_DIR or --artifacts ROOT")
        table = query_cost_table(load_manifest(teams_dir), load_manifest(wizard_dir))
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"TeaMs-RL: {teams_dir}\nWizardLM baseline: {wizard_dir}\n")
    print(table.to_markdown())
    md, csv_path = table.save(args.out)
    print(f"saved {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
