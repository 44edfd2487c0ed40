"""Experiment tracking: one wandb run per stage (offline by default) plus JSON metrics in the run dir."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SECRET_KEY = re.compile(r"(api_?key|token|secret|password)$", re.IGNORECASE)
REDACTED = "***"


def redact(node):
    """Replace values of secret-looking keys. `api_key_env` (the *name* of a variable) is kept."""
    if isinstance(node, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v is not None else redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True))


# Config groups whose choice is worth filtering runs by in the wandb UI.
TAGGED_GROUPS = ("operators", "rl", "reward", "target", "expert", "instructor", "seeds", "evaluate")


def _hydra_job() -> tuple[int | None, list[str]]:
    """(job number in a multirun or None, tags like `operators=teams_rl`) when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = [f"{g}={choices[g]}" for g in TAGGED_GROUPS if choices.get(g)]
    job = hydra_cfg.job.get("num") if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else None
    return job, tags


class StageTracker:
    """Logs one stage's metrics to `<run_dir>/metrics/<stage>.jsonl` and, unless disabled, to wandb."""

    def __init__(self, cfg: DictConfig, stage: str, run_dir: Path):
        self.stage = stage
        self.run_dir = Path(run_dir)
        self.history_path = self.run_dir / "metrics" / f"{stage}.jsonl"
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        self._run = None
        logger = cfg.get("logger") or {}
        if logger.get("backend", "none") == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE") or logger.get("mode", "offline")
            job, choices = _hydra_job()
            name = f"{cfg.get('experiment_name')}-{stage}" + (f"-job{job}" if job is not None else "")
            self._run = wandb.init(
                project=logger.get("project", "teams_rl"),
                entity=logger.get("entity"),
                group=logger.get("group") or cfg.get("experiment_name"),
                job_type=stage,
                name=name,
                tags=list(logger.get("tags") or []) + choices,
                config=resolved_config(cfg),
                dir=str(self.run_dir),
                mode=mode,
                reinit="finish_previous",
            )

    @property
    def wandb_run(self):
        return self._run

    def log(self, metrics: dict, step: int | None = None) -> None:
        row = {"step": step, **metrics} if step is not None else dict(metrics)
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: str | Path) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path))})

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            for k, v in metrics.items():
                self._run.summary[k] = v

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
