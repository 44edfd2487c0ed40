"""Runs the stages listed in `cfg.stages`, in order, through the stage cache.

A stage is a module `teams_rl.stages.<name>` with:
  VERSION: int                 bump when the stage's output for the same config changes
  CONFIG_KEYS: list[str]       dotted config keys the output depends on (or `config_keys(cfg)`)
  INPUTS: list[str]            stages whose artifacts it reads (or `inputs(cfg)`)
  RESUMABLE: bool              keep an unfinished folder so the stage can resume from it (default False)
  fingerprint_extra(cfg)       optional: more values the output depends on (e.g. the content hash of a
                               user-given input file, so editing it in place is not served a stale result)
  run(cfg, ctx) -> dict        does the work into `ctx.out_dir`, returns flat metrics
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import ModuleType

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from teams_rl import stages as stages_pkg
from teams_rl.artifacts import ArtifactStore, config_slice, fingerprint, write_json_atomic
from teams_rl.errors import BudgetExceeded, TeamsRLError
from teams_rl.llm.client import LLMClient
from teams_rl.llm.factory import LLMPool
from teams_rl.tracking import StageTracker, resolved_config

log = logging.getLogger(__name__)

TRACKED_PACKAGES = ("teams_rl", "torch", "transformers", "datasets", "deepspeed", "lm_eval", "hydra-core",
                    "omegaconf", "wandb", "stable-baselines3", "sb3-contrib", "openai", "sentence-transformers")


def available_stages() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(stages_pkg.__path__) if not m.name.startswith("_"))


def load_stage(name: str) -> ModuleType:
    if name not in available_stages():
        raise TeamsRLError(f"unknown stage '{name}' (available: {', '.join(available_stages())})")
    return importlib.import_module(f"teams_rl.stages.{name}")


def stage_inputs(module: ModuleType, cfg: DictConfig) -> list[str]:
    fn = getattr(module, "inputs", None)
    return list(fn(cfg)) if callable(fn) else list(getattr(module, "INPUTS", []))


def stage_config_keys(module: ModuleType, cfg: DictConfig) -> list[str]:
    fn = getattr(module, "config_keys", None)
    return list(fn(cfg)) if callable(fn) else list(getattr(module, "CONFIG_KEYS", []))


def plan(cfg: DictConfig) -> list[str]:
    """The requested stages in order, with the inputs they need (and that were not requested) put first."""
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise TeamsRLError(f"stage dependency cycle: {' -> '.join(trail + (name,))}")
        if name in order:
            return
        for dep in stage_inputs(load_stage(name), cfg):
            visit(dep, trail + (name,))
        order.append(name)

    for name in cfg.stages:
        visit(str(name), ())
    return order


def fingerprints(cfg: DictConfig, names: list[str]) -> dict[str, str]:
    fps: dict[str, str] = {}
    for name in names:  # `plan` order: inputs come first
        module = load_stage(name)
        ins = {dep: fps[dep] for dep in stage_inputs(module, cfg)}
        slice_ = config_slice(cfg, stage_config_keys(module, cfg))
        extra = getattr(module, "fingerprint_extra", None)
        if callable(extra):
            slice_["_extra"] = extra(cfg)
        fps[name] = fingerprint(name, getattr(module, "VERSION", 1), slice_, ins)
    return fps


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
    extra: dict = field(default_factory=dict)

    def llm(self, role: str) -> LLMClient:
        return self.llms.client(role)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)


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
    fields = ("queries", "cache_hits", "failures", "prompt_tokens", "completion_tokens", "usd")
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
        if any(row.values()):
            delta[role] = {"model": now["model"], **row, "by_purpose": purposes}
    return delta


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, dict]:
    """Run every planned stage (reusing finished ones) and return {stage: metrics}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    order = plan(cfg)
    fps = fingerprints(cfg, order)
    store = ArtifactStore(cfg.paths.artifacts)
    llms = LLMPool(cfg, cfg.paths.get("llm_cache"))

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
    finally:
        run_manifest["llm"] = llms.accounting()
        run_manifest["finished_at"] = _now()
        write_json_atomic(run_dir / "run_manifest.json", run_manifest)
        write_json_atomic(run_dir / "metrics.json", results)
        llms.close()
    return results


def _run_stage(name, cfg, fps, store, llms, run_dir, run_manifest) -> dict:
    module = load_stage(name)
    fp = fps[name]
    ins = {dep: store.folder(dep, fps[dep]) for dep in stage_inputs(module, cfg)}
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
        if manifest is not None:
            log.info("stage %s: reusing %s", name, store.folder(name, fp))
            entry.update(status="cached", duration_s=0.0)
            hook = getattr(module, "on_cached", None)  # e.g. the report publishes itself into this run dir
            if callable(hook):
                hook(cfg, store.folder(name, fp), run_dir)
            return manifest.get("metrics", {})

        out_dir = store.prepare(name, fp, getattr(module, "RESUMABLE", False))
        tracker = StageTracker(cfg, name, run_dir)
        ctx = StageContext(name, cfg, out_dir, run_dir, fp, ins, input_manifests, llms, tracker)
        log.info("stage %s: running into %s", name, out_dir)
        before = llms.accounting()
        started, t0 = _now(), time.perf_counter()
        try:
            metrics = module.run(cfg, ctx) or {}
            tracker.summary({f"{name}/{k}": v for k, v in metrics.items()})
        finally:
            tracker.finish()
        duration = time.perf_counter() - t0
        store.commit(name, fp, {
            "stage": name,
            "version": getattr(module, "VERSION", 1),
            "fingerprint": fp,
            "inputs": {dep: fps[dep] for dep in ins},
            "config": config_slice(cfg, stage_config_keys(module, cfg)),
            "metrics": metrics,
            "llm": _accounting_delta(before, llms.accounting()),
            "started_at": started,
            "finished_at": _now(),
            "duration_s": duration,
            "git_commit": run_manifest["git_commit"],
            "versions": run_manifest["versions"],
        })
        entry.update(status="ran", duration_s=round(duration, 3))
        return metrics
