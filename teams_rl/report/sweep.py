"""Aggregate a Hydra multirun into one report: ablation tables over the swept values, mean ± std over `seed`.

A sweep dir holds one run dir per job (`multirun/<experiment>/<time>/<job>/`) with `config.resolved.yaml`,
`run_manifest.json`, `metrics.json` and Hydra's `.hydra/overrides.yaml`. The swept keys are the overrides whose
value differs between jobs (or, without `.hydra/`, the config values that differ). Jobs that differ only in
`seed` form one group; each table row is a group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from teams_rl.errors import TeamsRLError
from teams_rl.report import figures as figs
from teams_rl.report import methods
from teams_rl.report import tables as tbl
from teams_rl.report.collect import RESULT_STAGES, RunResults, number, read_json
from teams_rl.report.document import FigureRef, Report, figure_dir
from teams_rl.report.paper import PAPER_MODEL_LABELS, PaperResults

SEED_KEYS = ("seed",)
IGNORED_CONFIG_PREFIXES = ("paths.", "hydra", "logger.")


def ablation_metrics(primary_attack: str) -> list[tuple[str, str, str]]:
    """(stage, metric key, column label) of the ablation table, in order; absent ones are left out."""
    return [
        ("policy", "final_mean_reward", "policy final reward"),
        ("policy", "mean_reward", "policy mean reward"),
        ("generate", "dataset/size", "dataset size"),
        ("generate", "calls/total", "generation LLM calls"),
        ("generate", "distinct_2", "distinct-2"),
        ("generate", "embedding_diversity", "embedding diversity"),
        ("finetune", "final_loss", "SFT final loss"),
        *[("evaluate", f"finetuned/{k}", f"{label} (%)") for k, label in tbl.BENCHMARKS],
        ("evaluate", "finetuned/average", "average (%)"),
        ("evaluate", "delta/average", "average - base (pp)"),
        ("privacy", f"{primary_attack}/auc", f"MIA AUC ({tbl.ATTACK_LABELS.get(primary_attack, primary_attack)})"),
    ]


PERCENT_KEYS = {f"finetuned/{k}" for k, _ in tbl.BENCHMARKS} | {"finetuned/average", "delta/average"}
COUNT_KEYS = {"dataset/size", "calls/total"}


@dataclass
class Job:
    name: str                         # the job's subdir (Hydra's job number)
    run_dir: Path
    overrides: dict[str, str]
    metrics: dict[str, dict]          # metrics.json: stage -> metrics (cached stages included)
    manifest: dict                    # run_manifest.json
    params: dict[str, str] = field(default_factory=dict)   # the swept keys' values

    @property
    def finished(self) -> bool:
        return "finished_at" in self.manifest and "stopped" not in self.manifest

    def value(self, stage: str, key: str) -> float | None:
        return number((self.metrics.get(stage) or {}).get(key))

    def status(self, stage: str) -> str | None:
        return ((self.manifest.get("stages") or {}).get(stage) or {}).get("status")


def _parse_override(text: str) -> tuple[str, str] | None:
    key, sep, value = text.partition("=")
    if not sep:
        return None
    return key.lstrip("+~"), value


def _flatten(node, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = json.dumps(node, sort_keys=True) if isinstance(node, list) else str(node)
    return out


def find_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job run dir under `sweep_dir` (one or two levels deep), in job-number order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise TeamsRLError(f"{sweep_dir}: no such sweep directory")
    dirs = sorted({p.parent for p in sweep_dir.glob("*/run_manifest.json")} |
                  {p.parent for p in sweep_dir.glob("*/*/run_manifest.json")},
                  key=lambda p: (len(p.relative_to(sweep_dir).parts), _natural(p.relative_to(sweep_dir).as_posix())))
    jobs = []
    for run_dir in dirs:
        overrides = {}
        path = run_dir / ".hydra" / "overrides.yaml"
        if path.is_file():
            for item in yaml.safe_load(path.read_text()) or []:
                parsed = _parse_override(str(item))
                if parsed:
                    overrides[parsed[0]] = parsed[1]
        jobs.append(Job(run_dir.relative_to(sweep_dir).as_posix(), run_dir, overrides,
                        read_json(run_dir / "metrics.json", {}) or {}, read_json(run_dir / "run_manifest.json", {})))
    if not jobs:
        raise TeamsRLError(f"{sweep_dir}: no job run dirs (*/run_manifest.json) - is it a multirun directory?")
    return jobs


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in text.replace("/", " / ").split())


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (config keys when the jobs have no Hydra overrides)."""
    if all(j.overrides for j in jobs):
        keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
        return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    flat = []
    for j in jobs:
        config = {}
        if (j.run_dir / "config.resolved.yaml").is_file():
            config = yaml.safe_load((j.run_dir / "config.resolved.yaml").read_text()) or {}
        flat.append(_flatten(config))
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if not k.startswith(IGNORED_CONFIG_PREFIXES) and k != "experiment_name"
            and len({f.get(k) for f in flat}) > 1]


def assign_params(jobs: list[Job], keys: list[str]) -> None:
    for j in jobs:
        if j.overrides:
            j.params = {k: j.overrides.get(k, "-") for k in keys}
        else:
            config = yaml.safe_load((j.run_dir / "config.resolved.yaml").read_text()) if (
                j.run_dir / "config.resolved.yaml").is_file() else {}
            flat = _flatten(config or {})
            j.params = {k: flat.get(k, "-") for k in keys}


def group_jobs(jobs: list[Job], keys: list[str]) -> dict[str, list[Job]]:
    """Jobs grouped by their swept values other than `seed`; the label is `key=value, ...` (or `all jobs`)."""
    group_keys = [k for k in keys if k not in SEED_KEYS]
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        label = ", ".join(f"{k}={j.params[k]}" for k in group_keys) or "all jobs"
        groups.setdefault(label, []).append(j)
    return groups


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    arr = np.asarray(present, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None), len(arr)


def fmt_mean_std(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 3,
                 count: bool = False) -> str:
    """`mean ± std` (just `mean` with one seed); counts without decimals when the mean is whole."""
    if mean is None:
        return tbl.NOT_RUN
    value = mean * scale
    if count and float(value).is_integer():
        text = f"{value:,.0f}"
        return text if std is None else f"{text} ± {std * scale:.1f}"
    text = f"{value:.{digits}f}"
    if float(text) == 0:
        text = text.lstrip("-")   # no "-0.00" for a tiny negative difference
    return text + ("" if std is None else f" ± {std * scale:.{digits}f}")


# ------------------------------------------------------------------------------------------------ tables

def jobs_table(jobs: list[Job], keys: list[str]) -> tbl.Table:
    stages = [s for s in (*RESULT_STAGES, "report") if any(j.status(s) for j in jobs)]
    table = tbl.Table("sweep_jobs", "Jobs", ["job", *keys, *stages, "finished"])
    for j in jobs:
        table.rows.append([j.name, *[j.params.get(k, "-") for k in keys], *[j.status(s) or "-" for s in stages],
                           "yes" if j.finished else "no"])
    table.notes.append("ran = computed by this job; cached = reused from the stage cache (an earlier job or run "
                       "computed the same artifact).")
    return table


def cache_table(jobs: list[Job]) -> tbl.Table:
    """How often each stage was computed vs reused across the sweep's jobs."""
    table = tbl.Table("sweep_cache", "Stage cache over the sweep",
                      ["stage", "jobs", "ran", "cached", "distinct artifacts"])
    names = list(dict.fromkeys(s for j in jobs for s in (j.manifest.get("stages") or {})))
    order = [*RESULT_STAGES, "report"]
    names.sort(key=lambda s: order.index(s) if s in order else -1)
    for stage in names:
        entries = [(j.manifest.get("stages") or {}).get(stage) for j in jobs]
        entries = [e for e in entries if e]
        table.rows.append([stage, len(entries), sum(e.get("status") == "ran" for e in entries),
                           sum(e.get("status") == "cached" for e in entries),
                           len({e.get("fingerprint") for e in entries})])
    return table


def ablation_table(groups: dict[str, list[Job]], primary_attack: str) -> tuple[tbl.Table, tbl.Table]:
    """(markdown table with `mean ± std` cells, CSV-friendly table with separate mean/std/n columns)."""
    metrics = [m for m in ablation_metrics(primary_attack)
               if any(j.value(m[0], m[1]) is not None for js in groups.values() for j in js)]
    pretty = tbl.Table("ablation", "Ablation: mean ± std over seeds", ["group", "seeds", *[m[2] for m in metrics]])
    raw = tbl.Table("ablation_raw", "Ablation (numbers)", ["group", "seeds"] + [
        f"{stage}/{key}/{stat}" for stage, key, _ in metrics for stat in ("mean", "std")])
    for label, js in groups.items():
        cells, numbers = [], []
        for stage, key, _ in metrics:
            mean, std, _ = mean_std([j.value(stage, key) for j in js])
            scale = 100.0 if key in PERCENT_KEYS else 1.0
            cells.append(fmt_mean_std(mean, std, scale, 2 if scale != 1.0 else 3, count=key in COUNT_KEYS))
            numbers += [mean, std]
        pretty.rows.append([label, len(js), *cells])
        raw.rows.append([label, len(js), *numbers])
    pretty.notes.append("± = sample standard deviation over the seeds of a group (absent with one seed).")
    return pretty, raw


def versus_baseline(job: Job) -> dict | None:
    """A job's trained policy against its random baseline (`RunResults.policy_vs_baseline`), from its metrics."""
    stages = ("policy", "policy_baseline")
    return RunResults(job.name, manifests={s: {"metrics": job.metrics.get(s) or {}} for s in stages}).policy_vs_baseline()


def policy_seeds_table(groups: dict[str, list[Job]]) -> tbl.Table | None:
    """Per group, each seed's final reward minus its random baseline (z), and the mean over seeds ± its SE: the
    one comparison whose error includes how training varies from seed to seed. None when no job compared."""
    table = tbl.Table("policy_vs_baseline", "Trained policy minus random operators, over seeds",
                      ["group", "seeds", "per seed: difference (z)", "mean difference ± SE over seeds",
                       "seeds with z > 2"])
    for label, js in groups.items():
        found = [(j, v) for j in js if (v := versus_baseline(j)) is not None]
        if not found:
            continue
        diffs = [v["difference"] for _, v in found]
        mean, std, n = mean_std(diffs)
        if n == 1:
            spread = f"{mean:+.3f} (one seed: no SE over seeds)"
        elif std:
            se = std / np.sqrt(n)
            spread = f"{mean:+.3f} ± {se:.3f} (t = {mean / se:.2f}, {n - 1} df)"
        else:
            spread = f"{mean:+.3f} ± 0.000"
        per_seed = "; ".join(f"{j.params.get('seed', j.name)}: {v['difference']:+.3f} "
                             f"({'-' if v['z'] is None else format(v['z'], '.2f')})" for j, v in found)
        passed = sum(v["z"] is not None and v["z"] > 2 for _, v in found)
        table.rows.append([label, n, per_seed, spread, f"{passed} of {n}"])
    if not table.rows:
        return None
    table.notes.append("z = a seed's difference / its SE (clustered by episode, or by env where episodes carry over). The SE "
                       "over seeds is the sample sd of the per-seed differences / sqrt(n): unlike a run's own SE it "
                       "includes how training varies from seed to seed; with few seeds it is itself rough.")
    return table


def openllm_sweep_table(groups: dict[str, list[Job]], paper: PaperResults) -> tbl.Table:
    table = tbl.Table("openllm_v1", "Open LLM Leaderboard v1 benchmarks (%), mean ± std over seeds",
                      ["model", *[label for _, label in tbl.BENCHMARKS], "average"])
    keys = [k for k, _ in tbl.BENCHMARKS] + ["average"]
    base_done = False
    for label, js in groups.items():
        if not base_done:
            base = [mean_std([j.value("evaluate", f"base/{k}") for j in js]) for k in keys]
            if any(b[0] is not None for b in base):
                table.rows.append(["base model", *[fmt_mean_std(m, s, 100, 2) for m, s, _ in base]])
                base_done = True
        cells = [mean_std([j.value("evaluate", f"finetuned/{k}") for j in js]) for k in keys]
        if any(c[0] is not None for c in cells):
            table.rows.append([f"fine-tuned: {label}", *[fmt_mean_std(m, s, 100, 2) for m, s, _ in cells]])
    if not table.rows:
        table.notes.append("No evaluate stage in this sweep: only the paper's numbers are shown.")
    for model in paper.openllm_models():
        values = [paper.openllm(model, k) for k, _ in tbl.BENCHMARKS]
        avg = (f"{sum(v.value for v in values) / len(values):.2f}" if all(v.reported for v in values)
               else "not reported")
        table.rows.append([PAPER_MODEL_LABELS.get(model, model),
                           *[paper.cell(f"openllm_v1.{model}.{k}") for k, _ in tbl.BENCHMARKS], avg])
    return table


def privacy_sweep_table(groups: dict[str, list[Job]], paper: PaperResults) -> tbl.Table:
    attacks = []
    for js in groups.values():
        for j in js:
            attacks += [a for a in tbl.attacks_of(j.metrics.get("privacy") or {}) if a not in attacks]
    table = tbl.Table("privacy", "Membership-inference AUC per attack, mean ± std over seeds",
                      ["model", *[tbl.ATTACK_LABELS.get(a, a) for a in attacks], "paper (attack not named)"])
    if not attacks:
        table.notes.append("No privacy stage in this sweep: only the paper's numbers are shown.")
    for label, js in groups.items():
        cells = [mean_std([j.value("privacy", f"{a}/auc") for j in js]) for a in attacks]
        if any(c[0] is not None for c in cells):
            table.rows.append([label, *[fmt_mean_std(m, s) for m, s, _ in cells], tbl.NOT_RUN])
    for key, name in (("teams_rl", "TeaMs-RL model (paper)"), ("baseline", "baseline model (paper)")):
        entry = paper.get(f"privacy.{key}")
        value = "not reported" if entry.value is None else f"{entry.value:.2f}"
        table.rows.append([name, *[tbl.NOT_RUN for _ in attacks], value])
    table.notes += [f"paper `{k}`: {s}" for k, s in paper.sources("privacy")]
    return table


# ------------------------------------------------------------------------------------------------- build

def build_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, paper: PaperResults | None = None,
                       primary_attack: str = "loss", figures: bool = True, dpi: int = figs.DPI) -> Report:
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir / "report"
    paper = paper or PaperResults.load()
    jobs = find_jobs(sweep_dir)
    keys = swept_keys(jobs)
    assign_params(jobs, keys)
    groups = group_jobs(jobs, keys)
    report = Report(f"TeaMs-RL sweep report: {sweep_dir}")
    report.header = [
        f"{len(jobs)} jobs ({sum(j.finished for j in jobs)} finished); swept: "
        + (", ".join(f"`{k}`" for k in keys) or "nothing (identical jobs)")
        + f"; {len(groups)} group(s), mean ± std over `seed` within a group. Paper: TeaMs-RL, arXiv 2403.08694; "
        "its numbers come from `teams_rl/assets/paper_results.yaml` with their sources.",
    ]
    method_rows = methods.rows(groups, primary_attack) if methods.applies(jobs) else []
    if method_rows:
        report.sections.append(("Methods at an equal expert budget", [
            report.add_table(methods.table(method_rows, primary_attack)),
            FigureRef("methods", "Per method at the same expert budget: queries spent and pairs kept, benchmark "
                                 "average (± standard error), membership-inference AUC (95% CI)")]))
    pretty, raw = ablation_table(groups, primary_attack)
    report.add_table(raw)
    report.sections.append(("Ablation", [report.add_table(pretty), FigureRef("ablation", "Ablation metrics per "
                                                                                         "group (error bar: ± std "
                                                                                         "over seeds)")]))
    # first job of each group stands for the group in the per-run tables and figures
    reps = []
    for label, js in groups.items():
        done = [j for j in js if j.finished] or js
        run = RunResults.from_run_dir(done[0].run_dir, label=label)
        reps.append(run)
    pair = tbl.find_query_pair(reps)
    query_parts: list = ([*[report.add_table(t) for t in tbl.query_claims_tables(reps, paper)],
                          report.add_table(tbl.query_cost_table(reps, paper))] if pair is not None else
                         ["No TeaMs-RL + WizardLM-baseline generation pair in this sweep (sweep "
                          "`+experiment=queries_small,queries_small_wizardlm` for the ratios)."])
    query_parts.append(report.add_table(tbl.paper_queries_table(paper)))
    report.sections.append(("Expert queries and dataset size", query_parts))
    if any(r.has("policy") for r in reps):
        seeds = policy_seeds_table(groups)
        report.sections.append(("Policy", [*([report.add_table(seeds)] if seeds is not None else []),
                                           report.add_table(tbl.policy_table(reps)),
                                           FigureRef("policy_learning_curve", "Policy learning curves (first seed "
                                                                              "of each group)"),
                                           FigureRef("operator_mix", "Operator mix per group (first seed)")]))
    if any(r.has("generate") for r in reps):
        report.sections.append(("Generated datasets", [report.add_table(tbl.dataset_table(reps)),
                                                       FigureRef("dataset_diversity", "Diversity per group (first "
                                                                                      "seed)")]))
    report.sections.append(("Benchmarks", [report.add_table(openllm_sweep_table(groups, paper))]))
    report.sections.append(("Privacy", [report.add_table(privacy_sweep_table(groups, paper)),
                                        FigureRef("roc_curves", f"ROC of the {primary_attack} attack per group "
                                                                "(first seed)")]))
    report.sections.append(("Jobs and the stage cache", [report.add_table(jobs_table(jobs, keys)),
                                                         report.add_table(cache_table(jobs))]))
    report.sections.append(("Files", [f"Tables as CSV next to this file; figures in `figures/`. Re-render with "
                                      f"`python -m teams_rl.report {sweep_dir}`."]))
    if figures:
        fig_dir = figure_dir(out_dir)
        if method_rows:
            from teams_rl.plotting import method_comparison

            report.figures["methods"] = method_comparison(**methods.figure_series(method_rows),
                                                          path=fig_dir / "methods.png", dpi=dpi)
        panels = []
        for stage, key, label in ablation_metrics(primary_attack):
            stats = [mean_std([j.value(stage, key) for j in js]) for js in groups.values()]
            scale = 100.0 if key in PERCENT_KEYS else 1.0
            if any(s[0] is not None for s in stats):
                panels.append((label, [None if s[0] is None else s[0] * scale for s in stats],
                               [None if s[1] is None else s[1] * scale for s in stats]))
        for name, path in (
            ("ablation", figs.ablation_bars(list(groups), panels, fig_dir / "ablation.png",
                                            f"Sweep over {', '.join(keys) or 'nothing'}", dpi=dpi)),
            ("policy_learning_curve", figs.policy_curves(reps, fig_dir / "policy_learning_curve.png", dpi=dpi)),
            ("operator_mix", figs.operator_mix(reps, fig_dir / "operator_mix.png", dpi=dpi)),
            ("dataset_diversity", figs.dataset_diversity(reps, fig_dir / "dataset_diversity.png", dpi=dpi)),
            ("roc_curves", figs.roc_curves(reps, paper, fig_dir / "roc_curves.png", primary=primary_attack,
                                           all_attacks_first=False, dpi=dpi)),
        ):
            if path is not None:
                report.figures[name] = path
    return report


def aggregate_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None, **kwargs) -> Path:
    """Build and write the sweep's report; returns the path of its report.md."""
    out_dir = Path(out_dir) if out_dir else Path(sweep_dir) / "report"
    report = build_sweep_report(sweep_dir, out_dir, **kwargs)
    return report.write(out_dir)


def is_sweep_dir(path: str | Path) -> bool:
    path = Path(path)
    return not (path / "run_manifest.json").is_file() and (
        any(path.glob("*/run_manifest.json")) or any(path.glob("*/*/run_manifest.json")))

