"""The paper's query and size claims, computed from measurements, and the same-seed control table.

The claims ("5.73% of WizardLM's queries", "a dataset 6.75% of its size") compare a TeaMs-RL run with
WizardLM's full run over the 52,002 Alpaca seeds. Both sides come from measurements:
- TeaMs-RL, as measured: the LLM requests its run needed — the generation's `calls/<role>/<purpose>`
  (journaled, cache hits included, over resumed runs) and the policy training's `requests/<role>` — and its
  dataset size; nothing is extrapolated on this side;
- WizardLM, measured per seed: a `wizardlm_baseline`-mode generation on a sample of seeds, every request it
  needed (evolve, answer, judge; a failed evolution is retried from its parent in the next round, so the
  elimination retries are in the count) and its pairs, divided by its seeds;
- WizardLM's full run = that per-seed cost x 52,002 seeds (extrapolated).
The headline ratio is TeaMs-RL measured / WizardLM extrapolated; the tables label each part. The paper-side
constants (52,002 seeds, 4 rounds x 3 calls = 624,024 queries, 250,000 instructions, 5.73%, 6.75%) are read
from `teams_rl/assets/paper_results.yaml` (`PaperResults.scale`), the one place they live.

The same-seed table compares the two generations seed for seed (e.g. `llama7b` vs `llama7b_wizardlm`, or
`make repro-queries`): a control of the per-seed costs, which cannot reproduce 5.73% / 6.75% by itself.

CLI: `python -m teams_rl.report.costs --sweep MULTIRUN_DIR` (the jobs of e.g. `make repro-queries`),
`python -m teams_rl.report.costs TEAMS_GENERATE_DIR WIZARD_GENERATE_DIR`, or `--artifacts ROOT` for the newest
finished pair on the same seeds; `--out DIR` writes the tables as markdown and CSV.
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
from teams_rl.report.paper import PaperResults, PaperScale

PURPOSE_ORDER = ("evolve", "answer", "judge")   # the method's own purposes; others (heldout_*) are evaluation
EXPERT_PURPOSES = ("evolve", "answer")


@dataclass
class Grid:
    """A small table that renders itself (the report wraps it into its own `Table`)."""

    key: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, first_cell: str) -> list:
        for row in self.rows:
            if row[0] == first_cell:
                return row
        raise KeyError(first_cell)

    def to_markdown(self) -> str:
        lines = [f"| {' | '.join(self.columns)} |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_show(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n" + "".join(f"\n- {n}" for n in self.notes) + ("\n" if self.notes else "")

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.columns)
        writer.writerows([["" if v is None else v for v in row] for row in self.rows])
        return buf.getvalue()


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() else f"{value:,.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def pct(ratio: float | None, digits: int = 2) -> str:
    return "-" if ratio is None else f"{100 * ratio:.{digits}f}%"


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


# ------------------------------------------------------------------------------------------------ measured parts

@dataclass(frozen=True)
class Measured:
    """One generation's measured accounting (and, for TeaMs-RL, its policy training's)."""

    seeds: int
    pairs: int
    expert: int                  # expert requests of the method's purposes (evolve + answer)
    judge: int                   # reviewer requests of the generation (WizardLM's elimination rule 1)
    policy: int = 0              # instructor + reviewer requests of the policy training
    other: dict = field(default_factory=dict)   # (role, purpose) -> requests outside the method (heldout_*)

    @property
    def generation(self) -> int:
        return self.expert + self.judge

    @property
    def total(self) -> int:
        return self.expert + self.judge + self.policy

    @classmethod
    def of(cls, generate: dict, policy: dict | None = None, which: str = "TeaMs-RL") -> Measured:
        m = _require(generate, which)
        calls = calls_by_role_purpose(generate)
        expert = sum(v for (r, p), v in calls.items() if r == "expert" and p in EXPERT_PURPOSES)
        judge = sum(v for (r, p), v in calls.items() if r != "expert" and p in PURPOSE_ORDER)
        other = {k: v for k, v in calls.items() if k[1] not in PURPOSE_ORDER}
        held = int(m.get("heldout_seeds") or 0)   # extra non-member seeds: evaluation, not the method's data
        pairs = int(m["dataset/train"]) if held else int(m["dataset/size"])
        return cls(int(m["seeds"]), pairs, expert, judge, policy_requests(policy), other)


def policy_requests(policy_manifest: dict | None) -> int:
    """Instructor + reviewer requests the policy training needed (`requests/<role>`; older artifacts: the
    queries it sent, `llm_queries/<role>`)."""
    metrics = (policy_manifest or {}).get("metrics") or {}
    total = 0
    for role in ("instructor", "reviewer"):
        value = metrics.get(f"requests/{role}", metrics.get(f"llm_queries/{role}"))
        total += int(value or 0)
    return total


@dataclass(frozen=True)
class Claims:
    """The headline ratios: TeaMs-RL measured / WizardLM's measured per-seed cost x the paper's seeds."""

    teams: Measured
    wizard: Measured
    scale: PaperScale

    @property
    def wizard_queries_per_seed(self) -> float:
        return self.wizard.generation / self.wizard.seeds

    @property
    def wizard_pairs_per_seed(self) -> float:
        return self.wizard.pairs / self.wizard.seeds

    @property
    def wizard_queries_extrapolated(self) -> int:
        return round(self.wizard_queries_per_seed * self.scale.seeds)

    @property
    def wizard_pairs_extrapolated(self) -> int:
        return round(self.wizard_pairs_per_seed * self.scale.seeds)

    @property
    def expert_query_ratio(self) -> float | None:
        """The paper's 5.73%: TeaMs-RL's expert queries / WizardLM's queries at 52,002 seeds."""
        return _ratio(self.teams.expert, self.wizard_queries_extrapolated)

    @property
    def all_query_ratio(self) -> float | None:
        return _ratio(self.teams.total, self.wizard_queries_extrapolated)

    @property
    def size_ratio(self) -> float | None:
        """The 6.75%: TeaMs-RL's pairs / WizardLM's pairs at 52,002 seeds."""
        return _ratio(self.teams.pairs, self.wizard_pairs_extrapolated)

    @property
    def per_seed_ratio(self) -> float | None:
        return _ratio(self.teams.expert / self.teams.seeds if self.teams.seeds else None,
                      self.wizard_queries_per_seed)

    @classmethod
    def of(cls, teams_generate: dict, wizard_generate: dict, teams_policy: dict | None = None,
           scale: PaperScale | None = None) -> Claims:
        wizard = Measured.of(wizard_generate, which="WizardLM")
        if not wizard.seeds:
            raise TeamsRLError("query claims: the WizardLM-baseline generation has no seeds to measure a per-seed "
                               "cost on")
        return cls(Measured.of(teams_generate, teams_policy), wizard, scale or PaperResults.load().scale())

    # -- tables ----------------------------------------------------------------------------------------
    def parts_table(self) -> Grid:
        s, t, w = self.scale, self.teams, self.wizard
        n = f"{s.seeds:,}"
        g = Grid("query_claim_parts", "Query and size claims: the measured and the extrapolated parts",
                 ["part", "measured: seeds", "measured: count", "measured: per seed", f"extrapolated to {n} seeds",
                  "paper-side WizardLM constant"])
        per = (lambda v: round(v / t.seeds, 3) if t.seeds else None)  # noqa: E731
        g.rows = [
            ["WizardLM baseline: queries (evolve + answer + judge, elimination retries included)", w.seeds,
             w.generation, round(self.wizard_queries_per_seed, 3), self.wizard_queries_extrapolated,
             f"{s.wizard_queries:,} ({s.seeds:,} x {s.rounds} rounds x {s.calls_per_round} calls, inferred)"],
            ["WizardLM baseline: of which expert (evolve + answer)", w.seeds, w.expert,
             round(w.expert / w.seeds, 3), round(w.expert / w.seeds * s.seeds), ""],
            ["WizardLM baseline: pairs after elimination", w.seeds, w.pairs, round(self.wizard_pairs_per_seed, 3),
             self.wizard_pairs_extrapolated, f"{s.wizard_instructions:,} instructions (WizardLM paper)"],
            ["TeaMs-RL run: expert queries (evolve + answer)", t.seeds, t.expert, per(t.expert),
             "not extrapolated", ""],
            ["TeaMs-RL run: generation reviewer queries (judge)", t.seeds, t.judge, per(t.judge), "not extrapolated",
             ""],
            ["TeaMs-RL run: policy training queries (instructor + reviewer)", "-", t.policy, "-", "not extrapolated",
             ""],
            ["TeaMs-RL run: all queries", t.seeds, t.total, per(t.total), "not extrapolated", ""],
            ["TeaMs-RL run: pairs (the training data)", t.seeds, t.pairs, per(t.pairs), "not extrapolated", ""],
        ]
        if t.other:
            g.rows.append(["TeaMs-RL run: evaluation-only requests (" + ", ".join(
                f"{r}/{p}" for r, p in sorted(t.other)) + "; not counted)", "-", sum(t.other.values()), "-", "-", ""])
        g.notes.append("measured = requests the generation needed (journaled; cache hits included) and its final "
                       "records; the WizardLM per-seed cost x the paper's seed count is the only extrapolated part.")
        return g

    def ratio_table(self) -> Grid:
        s, t = self.scale, self.teams
        n = f"{s.seeds:,}"
        g = Grid("query_claims", "Query and size claims: TeaMs-RL measured / WizardLM extrapolated",
                 ["claim", "TeaMs-RL (measured)", f"WizardLM (measured per seed x {n} seeds)", "ratio", "paper"])
        g.rows = [
            ["expert queries, TeaMs-RL / WizardLM", t.expert, self.wizard_queries_extrapolated,
             pct(self.expert_query_ratio, 4), f"{100 * s.query_ratio:.2f}% (paper)"],
            ["all queries incl. policy training, TeaMs-RL / WizardLM", t.total, self.wizard_queries_extrapolated,
             pct(self.all_query_ratio, 4), "-"],
            ["dataset size, TeaMs-RL / WizardLM", t.pairs, self.wizard_pairs_extrapolated, pct(self.size_ratio, 4),
             f"{100 * s.size_ratio:.2f}% (secondary)"],
            ["per seed (both measured): expert queries per seed / WizardLM queries per seed",
             round(t.expert / t.seeds, 3) if t.seeds else None, round(self.wizard_queries_per_seed, 3),
             pct(self.per_seed_ratio), "-"],
            [f"expert queries / the paper-side WizardLM total {s.wizard_queries:,} (inferred)", t.expert,
             s.wizard_queries, pct(_ratio(t.expert, s.wizard_queries), 4), f"{100 * s.query_ratio:.2f}%"],
            [f"dataset size / WizardLM's {s.wizard_instructions:,} instructions", t.pairs, s.wizard_instructions,
             pct(_ratio(t.pairs, s.wizard_instructions), 4), f"{100 * s.size_ratio:.2f}%"],
        ]
        g.notes.append(f"TeaMs-RL: {t.seeds:,} seeds as run (its totals are not scaled); WizardLM: measured on "
                       f"{self.wizard.seeds:,} seeds, extrapolated to {n}. At equal seeds the ratio is the per-seed "
                       "row; the headline ratio is that per-seed ratio x TeaMs-RL's seeds / WizardLM's seeds.")
        return g


# ------------------------------------------------------------------------------------------------ same seeds

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

    def grid(self) -> Grid:
        g = Grid("query_costs", "Same-seed control: TeaMs-RL vs WizardLM on the same seeds",
                 ["quantity", "TeaMs-RL", "WizardLM baseline", "TeaMs-RL / WizardLM", "paper"])
        g.rows = [[r.quantity, r.teams, r.wizard, pct(r.ratio), r.paper] for r in self.rows]
        g.notes.append(f"Seeds: {self.meta.get('seeds_teams')} (TeaMs-RL), {self.meta.get('seeds_wizard')} "
                       "(WizardLM baseline). Calls = requests the generation needed (cache hits included), summed "
                       "over resumed runs. A per-seed comparison: it cannot give the paper's ratios, which compare "
                       "different seed counts (see the claims tables).")
        return g

    def to_markdown(self) -> str:
        return self.grid().to_markdown()

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


def _order(pair: tuple[str, str]) -> tuple:
    role, purpose = pair
    return (PURPOSE_ORDER.index(purpose) if purpose in PURPOSE_ORDER else len(PURPOSE_ORDER), purpose, role)


def query_cost_table(teams_manifest: dict, wizard_manifest: dict, scale: PaperScale | None = None) -> CostTable:
    """The same-seed comparison of two generate manifests (TeaMs-RL first, WizardLM baseline second)."""
    s = scale or PaperResults.load().scale()
    tm, wm = _require(teams_manifest, "TeaMs-RL"), _require(wizard_manifest, "WizardLM")
    t_calls, w_calls = calls_by_role_purpose(teams_manifest), calls_by_role_purpose(wizard_manifest)
    t_sent, w_sent = calls_by_role_purpose(teams_manifest, "sent"), calls_by_role_purpose(wizard_manifest, "sent")
    rows: list[CostRow] = []
    t_seeds, w_seeds = int(tm["seeds"]), int(wm["seeds"])
    rows.append(CostRow("seeds", t_seeds, w_seeds, _ratio(t_seeds, w_seeds), f"{s.seeds:,} (Alpaca)"))
    paper_calls = {"evolve": "1 per step", "answer": "1 per instruction", "judge": "WizardLM: 1 per evolution"}
    for role, purpose in sorted(set(t_calls) | set(w_calls), key=_order):
        t, w = t_calls.get((role, purpose), 0), w_calls.get((role, purpose), 0)
        rows.append(CostRow(f"calls: {role} / {purpose}", t, w, _ratio(t, w), paper_calls.get(purpose, "")))
    t_total, w_total = sum(t_calls.values()), sum(w_calls.values())
    t_expert = sum(v for (r, _), v in t_calls.items() if r == "expert")
    w_expert = sum(v for (r, _), v in w_calls.items() if r == "expert")
    rows.append(CostRow("calls: expert (all purposes)", t_expert, w_expert, _ratio(t_expert, w_expert)))
    rows.append(CostRow("calls: all roles", t_total, w_total, _ratio(t_total, w_total),
                        f"TeaMs-RL {100 * s.query_ratio:.2f}% of WizardLM (at different seed counts)"))
    rows.append(CostRow("sent to a backend (cache misses)", sum(t_sent.values()), sum(w_sent.values()),
                        _ratio(sum(t_sent.values()), sum(w_sent.values()))))
    t_size, w_size = int(tm["dataset/size"]), int(wm["dataset/size"])
    rows.append(CostRow("dataset size (final instructions)", t_size, w_size, _ratio(t_size, w_size),
                        f"TeaMs-RL {100 * s.size_ratio:.2f}% of WizardLM (at different seed counts)"))
    t_per, w_per = _ratio(t_total, t_size), _ratio(w_total, w_size)
    rows.append(CostRow("calls per final instruction", t_per, w_per, _ratio(t_per, w_per),
                        f"WizardLM {s.wizard_queries / s.wizard_instructions:.2f}"))
    t_seed_calls, w_seed_calls = _ratio(t_total, t_seeds), _ratio(w_total, w_seeds)
    rows.append(CostRow("calls per seed", t_seed_calls, w_seed_calls, _ratio(t_seed_calls, w_seed_calls),
                        f"WizardLM {s.rounds} rounds x {s.calls_per_round} calls = {s.rounds * s.calls_per_round}"))
    t_x = None if t_seed_calls is None else round(t_seed_calls * s.seeds)
    w_x = None if w_seed_calls is None else round(w_seed_calls * s.seeds)
    rows.append(CostRow(f"calls extrapolated to {s.seeds:,} seeds", t_x, w_x, _ratio(t_x, w_x),
                        f"WizardLM {s.wizard_queries:,} (inferred)"))
    t_sx = None if not t_seeds else round(t_size / t_seeds * s.seeds)
    w_sx = None if not w_seeds else round(w_size / w_seeds * s.seeds)
    rows.append(CostRow(f"dataset size extrapolated to {s.seeds:,} seeds", t_sx, w_sx, _ratio(t_sx, w_sx),
                        f"WizardLM {s.wizard_instructions:,}"))
    meta = {"seeds_teams": t_seeds, "seeds_wizard": w_seeds,
            "same_seeds": (teams_manifest.get("config") or {}).get("seeds") == (wizard_manifest.get("config") or {}).get("seeds")}
    return CostTable(rows, meta)


# ------------------------------------------------------------------------------------------------ pairs of runs

def generation_mode(run) -> str | None:
    return run.metrics("generate").get("mode") if run.has("generate") else None


def query_pair(runs: list) -> tuple:
    """A TeaMs-RL and a WizardLM-baseline generation among `runs` (RunResults; same seeds preferred, first run
    first), or None."""
    teams = [r for r in runs if generation_mode(r) == "teams_rl"]
    wizard = [r for r in runs if generation_mode(r) == "wizardlm"]

    def seeds(r):
        return (r.manifests["generate"].get("config") or {}).get("seeds")

    for t in teams:
        for w in wizard:
            if seeds(t) == seeds(w):
                return t, w
    return (teams[0], wizard[0]) if teams and wizard else None


def claims_of(pair: tuple, scale: PaperScale | None = None) -> Claims:
    teams, wizard = pair
    return Claims.of(teams.manifests["generate"], wizard.manifests["generate"], teams.manifests.get("policy"), scale)


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


def _pair_from_sweep(sweep: str | Path):
    from teams_rl.report.collect import RunResults

    sweep = Path(sweep)
    if not sweep.is_dir():
        raise TeamsRLError(f"{sweep}: no such sweep directory")
    dirs = sorted({p.parent for pattern in ("*/run_manifest.json", "*/*/run_manifest.json") for p in sweep.glob(pattern)})
    runs = [RunResults.from_run_dir(d, label=d.relative_to(sweep).as_posix()) for d in dirs]
    pair = query_pair(runs)
    if pair is None:
        raise TeamsRLError(f"{sweep}: no finished TeaMs-RL and WizardLM-baseline generation among its jobs")
    return pair


def _artifact_pair(teams_dir: Path, wizard_dir: Path):
    from teams_rl.report.collect import RunResults

    return RunResults.from_artifact(teams_dir, "TeaMs-RL"), RunResults.from_artifact(wizard_dir, "WizardLM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teams_rl.report.costs", description=__doc__.splitlines()[0])
    parser.add_argument("teams", nargs="?", help="TeaMs-RL generate artifact folder")
    parser.add_argument("wizard", nargs="?", help="WizardLM-baseline generate artifact folder")
    parser.add_argument("--sweep", help="a multirun dir whose jobs hold both generations")
    parser.add_argument("--artifacts", help="pick the newest pair from this artifacts root instead")
    parser.add_argument("--out", default=".", help="where to write the tables (.md/.csv; default: here)")
    args = parser.parse_args(argv)
    try:
        if args.sweep:
            pair = _pair_from_sweep(args.sweep)
        elif args.artifacts:
            pair = _artifact_pair(*newest_pair(args.artifacts))
        elif args.teams and args.wizard:
            pair = _artifact_pair(Path(args.teams), Path(args.wizard))
        else:
            raise TeamsRLError("give TEAMS_DIR WIZARD_DIR, --sweep DIR or --artifacts ROOT")
        scale = PaperResults.load().scale()
        claims = claims_of(pair, scale)
        table = query_cost_table(pair[0].manifests["generate"], pair[1].manifests["generate"], scale)
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"TeaMs-RL: {pair[0].folders['generate']}\nWizardLM baseline: {pair[1].folders['generate']}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for grid in (claims.ratio_table(), claims.parts_table()):
        print(f"## {grid.title}\n\n{grid.to_markdown()}")
        (out / f"{grid.key}.md").write_text(f"# {grid.title}\n\n{grid.to_markdown()}")
        (out / f"{grid.key}.csv").write_text(grid.to_csv())
    print(f"## {table.grid().title}\n\n{table.to_markdown()}")
    md, csv_path = table.save(out)
    print(f"saved {out}/query_claims.md, query_claim_parts.md, {md.name} (+ .csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
