"""One run's report: `report.md` with the paper's tables beside ours, the same tables as CSV, PNG figures.

`build_run_report(ours, others, paper)` assembles it; `Report.write(out_dir)` writes it. `others` are runs put
beside this one (`report.compare_with`): a WizardLM-baseline generation gives the query-cost ratios, another
fine-tuned model a row in the benchmark and privacy tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from teams_rl.report import figures as figs
from teams_rl.report import tables as tbl
from teams_rl.report.collect import RunResults
from teams_rl.report.paper import NOT_REPORTED, PaperResults, paper_model_for_target

PAPER_REF = "TeaMs-RL (Gu, Knoll, Jin; arXiv 2403.08694)"
FIGURES_DIR = "figures"


@dataclass
class Report:
    title: str
    sections: list[tuple[str, list]] = field(default_factory=list)   # (heading, [str | Table | figure name])
    tables: dict[str, tbl.Table] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)           # name -> written PNG
    header: list[str] = field(default_factory=list)

    def add_table(self, table: tbl.Table) -> tbl.Table:
        self.tables[table.key] = table
        return table

    def markdown(self) -> str:
        out = [f"# {self.title}", ""] + self.header + [""]
        for heading, parts in self.sections:
            out += [f"## {heading}", ""]
            for part in parts:
                if isinstance(part, tbl.Table):
                    out += [f"**{part.title}**", "", part.to_markdown()]
                elif isinstance(part, FigureRef):
                    if part.name in self.figures:
                        out += [f"![{part.caption}]({FIGURES_DIR}/{self.figures[part.name].name})", "",
                                f"*{part.caption}*", ""]
                else:
                    out += [str(part), ""]
        return "\n".join(out).rstrip() + "\n"

    def write(self, out_dir: str | Path) -> Path:
        """report.md + one CSV per table; the figures are already in `out_dir/figures`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for table in self.tables.values():
            (out_dir / f"{table.key}.csv").write_text(table.to_csv())
        path = out_dir / "report.md"
        path.write_text(self.markdown())
        return path


@dataclass(frozen=True)
class FigureRef:
    name: str
    caption: str


def figure_dir(out_dir: Path) -> Path:
    path = Path(out_dir) / FIGURES_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------- claims

def claims_table(runs: list[RunResults], paper: PaperResults, primary_attack: str = "loss") -> tbl.Table:
    """Each headline claim of the paper beside what these runs measured."""
    from teams_rl.report import costs

    table = tbl.Table("claims", "The paper's claims and our measurements",
                      ["claim", "paper", "paper source", "ours", "measured on"])
    ours = runs[0] if runs else RunResults("none")
    pair = tbl.find_query_pair(runs)
    q, s = paper.get("queries.teams_rl_fraction_of_wizardlm"), paper.get("queries.dataset_size_fraction_of_wizardlm")
    if pair is not None:
        claims = costs.claims_of(pair, paper.scale())
        ours_q = costs.pct(claims.expert_query_ratio, 4)
        ours_s = costs.pct(claims.size_ratio, 4)
        where = (f"{pair[0].label} ({claims.teams.seeds:,} seeds, measured) / {pair[1].label} (measured on "
                 f"{claims.wizard.seeds:,} seeds, x {claims.scale.seeds:,})")
    else:
        ours_q = ours_s = "needs a WizardLM-baseline generation (make repro-queries)"
        where = "-"
    table.rows.append(["expert queries, TeaMs-RL / WizardLM", tbl.ratio_pct(q.value), q.source, ours_q, where])
    table.rows.append(["dataset size, TeaMs-RL / WizardLM", tbl.ratio_pct(s.value), s.source, ours_s, where])
    model = paper_model_for_target(None, ours.target_model()) or "teams_rl_llama1_7b"
    settings = ours.eval_settings()
    offline = any(str(b.get("task", "")).startswith("offline_") for b in settings.get("benchmarks", []))
    where = (f"{ours.target_model()} on {'offline task samples' if offline else 'lm-eval tasks'}"
             if ours.has("evaluate") else "-")
    for key, label in tbl.BENCHMARKS:
        entry = paper.openllm(model, key)
        value = ours.metric("evaluate", f"finetuned/{key}")
        table.rows.append([f"{label} of the fine-tuned model (%)", NOT_REPORTED if entry.value is None else
                           f"{entry.value:.2f}", entry.source, tbl.pct(value) if value is not None else "not run",
                           where])
    auc = ours.metric("privacy", f"{primary_attack}/auc")
    for key, label in (("teams_rl", "membership-inference AUC, TeaMs-RL model"),
                       ("baseline", "membership-inference AUC, baseline model")):
        entry = paper.get(f"privacy.{key}")
        ours_cell, where = "not run", "-"
        attack = tbl.ATTACK_LABELS.get(primary_attack, primary_attack)
        if key == "teams_rl" and auc is not None:
            ours_cell, where = f"{auc:.3f} ({attack} attack)", ours.label
        elif key == "baseline":
            base_runs = [r for r in runs[1:] if r.metric("privacy", f"{primary_attack}/auc") is not None]
            if base_runs:
                ours_cell = f"{base_runs[0].metric('privacy', f'{primary_attack}/auc'):.3f} ({attack} attack)"
                where = base_runs[0].label
        table.rows.append([label, NOT_REPORTED if entry.value is None else f"{entry.value:.2f}", entry.source,
                           ours_cell, where])
    return table


# ------------------------------------------------------------------------------------------------- build

def build_run_report(ours: RunResults, others: list[RunResults], paper: PaperResults, out_dir: str | Path, *,
                     title: str | None = None, primary_attack: str = "loss", figures: bool = True,
                     dpi: int = figs.DPI) -> Report:
    """Tables and (if `figures`) PNGs for one run and the runs put beside it; figures are written now."""
    out_dir = Path(out_dir)
    runs = [ours, *others]
    report = Report(title or f"TeaMs-RL reproduction: {ours.label}")
    report.header = [
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by the `report` stage of teams_rl, "
        f"a reproduction of {PAPER_REF}. The paper's numbers come from `teams_rl/assets/paper_results.yaml`, "
        "each with its source; 'not reported' = the available text of the paper gives no number.",
        "",
        "Runs: " + "; ".join(_describe(r) for r in runs),
    ]
    fig_dir = figure_dir(out_dir) if figures else None

    def figure(name: str, fn, *args, **kwargs) -> None:
        if fig_dir is None:
            return
        path = fn(*args, fig_dir / f"{name}.png", **kwargs)
        if path is not None:
            report.figures[name] = path

    report.sections.append(("Summary: the paper's claims", [report.add_table(claims_table(runs, paper,
                                                                                          primary_attack))]))
    # queries
    parts: list = [*[report.add_table(t) for t in tbl.query_claims_tables(runs, paper)],
                   report.add_table(tbl.query_cost_table(runs, paper)), report.add_table(tbl.paper_queries_table(paper)),
                   report.add_table(tbl.llm_accounting_table(runs))]
    report.sections.append(("Expert queries and dataset size", parts))
    # policy
    if any(r.has("policy") for r in runs):
        figure("policy_learning_curve", figs.policy_curves, runs, dpi=dpi)
        figure("operator_mix", figs.operator_mix, runs, dpi=dpi)
        report.sections.append(("Policy", [
            report.add_table(tbl.policy_table(runs)),
            FigureRef("policy_learning_curve", "Mean reward per policy update (thick: moving average) and the "
                                               "policy's operator probabilities"),
            FigureRef("operator_mix", "Operator mix: the trained policy's probabilities and the operators of the "
                                      "kept instructions"),
        ]))
    else:
        report.sections.append(("Policy", ["No policy stage in this run."]))
    # data
    if any(r.has("generate") for r in runs):
        figure("dataset_diversity", figs.dataset_diversity, runs, dpi=dpi)
        if "operator_mix" not in report.figures:
            figure("operator_mix", figs.operator_mix, runs, dpi=dpi)
        report.sections.append(("Generated dataset", [
            report.add_table(tbl.dataset_table(runs)),
            report.add_table(tbl.quality_table(runs)),
            FigureRef("dataset_diversity", "Diversity of the generated instructions vs their seeds"),
        ]))
    else:
        report.sections.append(("Generated dataset", ["No generate stage in this run."]))
    # finetune
    if any(r.has("finetune") for r in runs):
        report.sections.append(("Fine-tuning", [report.add_table(tbl.finetune_table(runs))]))
    # benchmarks
    figure("benchmark_bars", figs.benchmark_bars, runs, paper, dpi=dpi)
    bench_parts: list = [report.add_table(tbl.openllm_table(runs, paper))]
    if not any(r.has("evaluate") or r.has("evaluate_base") for r in runs):
        bench_parts.insert(0, "No evaluate stage in this run: only the paper's numbers are shown.")
    bench_parts.append(FigureRef("benchmark_bars", "Benchmark scores: base and fine-tuned models, and the paper's "
                                                   "numbers where it reports one"))
    report.sections.append(("Benchmarks (Open LLM Leaderboard v1)", bench_parts))
    # privacy
    figure("roc_curves", figs.roc_curves, runs, paper, primary=primary_attack, dpi=dpi)
    priv_parts: list = [report.add_table(tbl.privacy_table(runs, paper))]
    if not any(r.has("privacy") for r in runs):
        priv_parts.insert(0, "No privacy stage in this run: only the paper's numbers are shown.")
    priv_parts.append(FigureRef("roc_curves", "ROC curves of the membership-inference attacks (diagonal = chance)"))
    report.sections.append(("Privacy (membership inference)", priv_parts))
    report.sections.append(("Files", [
        "Every table above is also a CSV next to this file (`<table>.csv`); figures are in `figures/`. "
        "Re-render with `python -m teams_rl.report <run dir>`.",
    ]))
    return report


def _describe(run: RunResults) -> str:
    stages = ", ".join(f"{s} `{f.name}`" + (f" ({run.statuses[s]})" if s in run.statuses else "")
                       for s, f in run.folders.items())
    return f"**{run.label}**" + (f" ({stages})" if stages else " (no finished result stages)")


def headline_metrics(runs: list[RunResults], report: Report, primary_attack: str = "loss") -> dict:
    """A few flat numbers for the stage's metrics: what the report found, for sweeps and dashboards."""
    from teams_rl.report import costs

    out: dict = {"tables": len(report.tables), "figures": len(report.figures)}
    pair = tbl.find_query_pair(runs)
    if pair is not None:
        claims = costs.claims_of(pair)
        out["expert_query_ratio"] = claims.expert_query_ratio      # measured / WizardLM extrapolated
        out["dataset_size_ratio"] = claims.size_ratio
        out["expert_query_ratio_per_seed"] = claims.per_seed_ratio
    auc = runs[0].metric("privacy", f"{primary_attack}/auc") if runs else None
    if auc is not None:
        out[f"{primary_attack}_auc"] = auc
    return out
