"""Runs the stages listed in `cfg.stages`, in order, through the stage cache.

Each stage declares itself as `STAGE = Stage(...)` in `teams_rl.stages.<name>` (see `teams_rl.stages.Stage`).
Before the first stage runs, every planned stage's fingerprint is computed and its `validate(cfg)` called, so
a config error costs seconds, never the hours of an earlier stage.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from teams_rl import config as C
from teams_rl.artifacts import ArtifactStore, config_slice, fingerprint, write_json_atomic
from teams_rl.errors import BudgetExceeded, TeamsRLError
from teams_rl.llm.accounting import COUNTER_FIELDS
from teams_rl.llm.client import LLMClient
from teams_rl.llm.factory import LLMPool
from teams_rl.llm.failures import FailureBudget, LLMFailures
from teams_rl.stages import Stage, load_stage, plan
from teams_rl.tracking import StageTracker, resolved_config

log = logging.getLogger(__name__)

__all__ = ["StageContext", "fingerprints", "plan", "run_pipeline", "validate_plan"]

TRACKED_PACKAGES = ("teams_rl", "torch", "transformers", "datasets", "deepspeed", "lm_eval", "hydra-core",
                    "omegaconf", "wandb", "stable-baselines3", "sb3-contrib", "openai", "sentence-transformers")


def fingerprints(cfg: DictConfig, names: list[str]) -> dict[str, str]:
    from teams_rl.fast_dtype import depends_on_machine, machine_precision

    fps: dict[str, str] = {}
    precision = None  # what this machine resolves `auto` to: looked up once, only if a stage needs it
    for name in names:  # `plan` order: inputs come first
        stage = load_stage(name)
        ins = {dep: fps[dep] for dep in stage.inputs_for(cfg)}
        slice_ = config_slice(cfg, stage.fingerprint_keys(cfg))
        if depends_on_machine(slice_):  # `dtype: auto` / bf16 training
            precision = precision or machine_precision(OmegaConf.select(cfg, "paths.cache", default=None))
            slice_["_machine_precision"] = precision
        if stage.fingerprint_extra is not None:
            slice_["_extra"] = stage.fingerprint_extra(cfg)
        fps[name] = fingerprint(name, stage.version, slice_, ins)
    return fps


def validate_plan(cfg: DictConfig, order: list[str], llms: LLMPool | None = None) -> None:
    """Every planned stage's own checks, before any of them runs: its `validate(cfg)`, its failure budget and
    the LLM clients of the roles it calls (building one checks its key variable, model path or cache)."""
    C.check_required(cfg)  # paths an experiment cannot run without (e.g. the checkpoint it evaluates)
    for name in order:
        stage = load_stage(name)
        if stage.validate is not None:
            stage.validate(cfg)
        failure_fraction(cfg, name)
        for role in stage.roles_for(cfg):
            if llms is not None:
                llms.client(role)


def failure_fraction(cfg: DictConfig, name: str) -> float:
    """`<stage>.max_failed_fraction` (default 0: any request that fails after its retries stops the stage)."""
    if OmegaConf.select(cfg, name, default=None) is None:
        return 0.0
    return C.fraction(cfg, f"{name}.max_failed_fraction", optional=True) or 0.0


@dataclass
class StageContext:
    """What a stage gets besides its config: where to write, what it reads, LLM roles, logging."""

    stage: str
    cfg: DictConfig
    out_dir: Path
    run_dir: Path
    fingerprint: str
    inputs: dict[str, Path]
    input_manifests: dict[str, dict]
    llms: LLMPool
    tracker: StageTracker
    failures: FailureBudget | None = None
    extra: dict = field(default_factory=dict)

    def llm(self, role: str) -> LLMClient:
        return self.llms.client(role)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)


def dry_run_settings(cfg: DictConfig) -> dict | None:
    """`dry_run=true` or `dry_run.pilot=N` (a pilot implies a dry run): {"pilot": N or 0}; None for a real run."""
    node = cfg.get("dry_run")
    if node is True:
        return {"pilot": 0}
    if node in (None, False):
        return None
    enabled = C.boolean(cfg, "dry_run.enabled", default=False)
    pilot = C.integer(cfg, "dry_run.pilot", minimum=0, optional=True) or 0
    return {"pilot": pilot} if enabled or pilot else None


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _accounting_delta(before: dict, after: dict) -> dict:
    """Per-role counters spent between two snapshots (what one stage sent)."""
    fields = COUNTER_FIELDS
    delta = {}
    for role, now in after.items():
        prev = before.get(role, {})
        row = {f: now[f] - prev.get(f, 0) for f in fields}
        purposes = {}
        for purpose, counters in now["by_purpose"].items():
            old = prev.get("by_purpose", {}).get(purpose, {})
            diff = {f: counters[f] - old.get(f, 0) for f in fields}
            if any(diff.values()):
                purposes[purpose] = diff
        kinds = {k: n - prev.get("failure_kinds", {}).get(k, 0) for k, n in now.get("failure_kinds", {}).items()}
        kinds = {k: n for k, n in kinds.items() if n}
        if any(row.values()):
            delta[role] = {"model": now["model"], **row, "failure_kinds": kinds, "by_purpose": purposes}
    return delta


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, dict]:
    """Run every planned stage (reusing finished ones) and return {stage: metrics}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    order = plan(cfg)
    fps = fingerprints(cfg, order)
    store = ArtifactStore(cfg.paths.artifacts)
    llms = LLMPool(cfg, cfg.paths.get("llm_cache"))
    dry = dry_run_settings(cfg)
    try:
        validate_plan(cfg, order, None if dry else llms)  # a dry run lists role problems instead of stopping
        if dry is not None:
            from teams_rl.dry_run import dry_run

            result = {"dry_run": dry_run(cfg, order, fps, store, llms, run_dir, dry)}
            llms.close()
            return result
    except BaseException:
        llms.close()
        raise

    with open(run_dir / "config.resolved.yaml", "w") as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
    run_manifest = {
        "experiment": cfg.get("experiment_name"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "started_at": _now(),
        "stages": {},
        "llm": {},
    }
    results: dict[str, dict] = {}
    try:
        for name in order:
            results[name] = _run_stage(name, cfg, fps, store, llms, run_dir, run_manifest)
            run_manifest["llm"] = llms.accounting()
            write_json_atomic(run_dir / "run_manifest.json", run_manifest)
    except BudgetExceeded:
        run_manifest["stopped"] = "budget"
        raise
    except LLMFailures:
        run_manifest["stopped"] = "llm_failures"
        raise
    finally:
        run_manifest["llm"] = llms.accounting()
        run_manifest["finished_at"] = _now()
        write_json_atomic(run_dir / "run_manifest.json", run_manifest)
        write_json_atomic(run_dir / "metrics.json", results)
        llms.close()
    return results


def _run_stage(name, cfg, fps, store, llms, run_dir, run_manifest) -> dict:
    stage: Stage = load_stage(name)
    fp = fps[name]
    ins = {dep: store.folder(dep, fps[dep]) for dep in stage.inputs_for(cfg)}
    input_manifests = {}
    for dep in ins:
        manifest = store.load_manifest(dep, fps[dep])
        if manifest is None:  # cannot happen after `plan`, unless someone deleted it mid-run
            raise TeamsRLError(f"stage '{name}' needs '{dep}' but its artifact {ins[dep]} is not complete")
        input_manifests[dep] = manifest
    entry = {"fingerprint": fp, "folder": str(store.folder(name, fp))}
    run_manifest["stages"][name] = entry
    store.folder(name, fp).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.lock_path(name, fp))):
        manifest = store.load_manifest(name, fp)
        if manifest is not None and not stage.always_run:
            log.info("stage %s: reusing %s", name, store.folder(name, fp))
            entry.update(status="cached", duration_s=0.0)
            if stage.on_cached is not None:  # e.g. the report publishes itself into this run dir
                stage.on_cached(cfg, store.folder(name, fp), run_dir)
            return manifest.get("metrics", {})

        out_dir = store.prepare(name, fp, stage.resumable)
        tracker = StageTracker(cfg, name, run_dir)
        failures = FailureBudget(name, failure_fraction(cfg, name))
        ctx = StageContext(name, cfg, out_dir, run_dir, fp, ins, input_manifests, llms, tracker, failures)
        log.info("stage %s: running into %s", name, out_dir)
        before = llms.accounting()
        started, t0 = _now(), time.perf_counter()
        llms.attach_failures(failures)
        try:
            metrics = stage.run(cfg, ctx) or {}
            tracker.summary({f"{name}/{k}": v for k, v in metrics.items()})
        finally:
            llms.attach_failures(None)
            tracker.finish()
        if failures.exceeded():  # a stage that swallowed a failure must not commit it as a result
            raise failures.error(kept=f"{name} finished but its artifact is not committed")
        duration = time.perf_counter() - t0
        spent = _accounting_delta(before, llms.accounting())
        # the dtype each model ran in (`dtype: auto` depends on the machine): the LLM roles this stage used and
        # whatever the stage reports itself (privacy: its scoring models)
        dtypes = {**llms.dtypes(spent), **ctx.extra.get("dtype", {})}
        store.commit(name, fp, {
            "stage": name,
            "version": stage.version,
            "fingerprint": fp,
            "inputs": {dep: fps[dep] for dep in ins},
            "config": config_slice(cfg, stage.fingerprint_keys(cfg)),
            "metrics": metrics,
            "llm": spent,
            **({"dtype": dtypes} if dtypes else {}),
            "started_at": started,
            "finished_at": _now(),
            "duration_s": duration,
            "git_commit": run_manifest["git_commit"],
            "versions": run_manifest["versions"],
        })
        entry.update(status="ran", duration_s=round(duration, 3))
        return metrics
