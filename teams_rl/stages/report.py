"""Stage `report`: the run's results beside the paper's, as `report.md`, CSV tables and PNG figures.

Inputs are the result stages this run computes (those in `stages` and everything they read), so the report
is cached on their fingerprints and redone when any of them changes. Runs named in `report.compare_with`
(run dirs or artifact folders, e.g. a `+experiment=wizardlm_baseline` run for the query-cost ratios) are put
beside this one. The finished report is also copied to `<run dir>/report/`. Logs every table as
`report/<table>` and every figure as `report/<figure>` to wandb, and the stages' LLM accounting as
`cost/<stage>/<role>/<counter>`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.llm.accounting import COUNTER_FIELDS
from teams_rl.report.collect import RESULT_STAGES
from teams_rl.stages import Stage, plan

log = logging.getLogger(__name__)

PUBLISHED = "report"


def _inputs(cfg: DictConfig) -> list[str]:
    """The result stages of this run: the requested ones and everything they read, in pipeline order."""
    requested = [str(name) for name in cfg.get("stages") or [] if str(name) != "report"]
    return [name for name in plan(cfg, requested) if name in RESULT_STAGES]


def _settings(cfg: DictConfig) -> dict:
    rep = dict(C.plain(cfg.get("report")) or {})
    compare = rep.get("compare_with") or []
    if isinstance(compare, str):
        compare = [compare]
    rep["compare_with"] = [str(p) for p in compare]
    return rep


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.report.collect import RunResults
    from teams_rl.report.document import build_run_report, headline_metrics
    from teams_rl.report.paper import PaperResults
    from teams_rl.tracking import resolved_config

    rep = _settings(cfg)
    paper = PaperResults.load(rep.get("paper_results"))
    primary = str(rep.get("primary_attack") or "loss")
    label = str(cfg.get("experiment_name") or "this run")
    ours = RunResults.from_context(label, ctx.inputs, ctx.input_manifests, resolved_config(cfg))
    others = []
    for path in rep["compare_with"]:
        other = RunResults.load(path)
        if other.label == label:
            other.label = f"{other.label} ({Path(path).name})"
        others.append(other)
    if not ours.folders and not others:
        log.warning("report: no result stages in `stages` and nothing in report.compare_with; the report shows "
                    "only the paper's numbers")
    report = build_run_report(ours, others, paper, ctx.out_dir, title=rep.get("title"), primary_attack=primary,
                              figures=bool(rep.get("figures", True)), dpi=int(rep.get("dpi") or 110))
    path = report.write(ctx.out_dir)
    _log(ctx, report, [ours, *others])
    published = publish(ctx.out_dir, ctx.run_dir)
    print(f"\nreport: {published / 'report.md'} ({len(report.tables)} tables, {len(report.figures)} figures)")
    log.info("report: wrote %s", path)
    return headline_metrics([ours, *others], report, primary)


def _log(ctx, report, runs) -> None:
    for table in report.tables.values():
        ctx.tracker.log_table(f"report/{table.key}", list(table.columns),
                              [[("" if v is None else str(v)) for v in row] for row in table.rows])
    for name, png in report.figures.items():
        ctx.tracker.log_image(f"report/{name}", png)
    costs = {}
    for stage, roles in runs[0].llm_accounting().items():   # this run's stages, as spent when each was made
        for role, counters in roles.items():
            for counter in COUNTER_FIELDS:
                if counter in counters:
                    costs[f"cost/{stage}/{role}/{counter}"] = counters[counter]
    if costs:
        ctx.tracker.log(costs)


def publish(folder: str | Path, run_dir: str | Path) -> Path:
    """Copy a finished report (report.md, CSVs, figures/) into `<run_dir>/report/` so it sits next to the run."""
    folder, target = Path(folder), Path(run_dir) / PUBLISHED
    if not (folder / "report.md").is_file():
        raise TeamsRLError(f"report: {folder} has no report.md to publish")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("manifest.json", ".*"))
    return target


def _on_cached(cfg: DictConfig, folder: Path, run_dir: Path) -> None:
    """Called by the pipeline when the report is reused from the cache: publish it into this run dir too."""
    publish(folder, run_dir)


STAGE = Stage(name="report", version=2, run=run, config_keys=["report", "experiment_name"], inputs=_inputs,
              on_cached=_on_cached)
