"""Benchmark the *base* model (before fine-tuning) once per model and evaluation settings.

Its fingerprint covers only `evaluate.*` (minus `evaluate.model`), with no input stages, so every
dataset, operator set or RL variant that fine-tunes the same target reuses one cached result; the
`evaluate` stage lists it as an input and reports fine-tuned minus base.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from teams_rl.errors import TeamsRLError
from teams_rl.stages import Stage


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.eval import harness
    from teams_rl.models import pick_device, resolve_model

    name = cfg.evaluate.get("base_model")
    if not name:
        raise TeamsRLError("evaluate.base_model is not set, so there is no base model to evaluate")
    path = resolve_model(str(name), cfg.paths.get("cache"))
    device = pick_device(str(cfg.evaluate.get("device", "auto")))
    flat, _ = harness.evaluate_model(path, cfg.evaluate, ctx.out_dir, device=device)
    with open(ctx.out_dir / "metrics.json", "w") as fh:
        json.dump(flat, fh, indent=2, sort_keys=True)
    ctx.tracker.log({f"eval/base/{k}": v for k, v in flat.items()})
    return flat


# `evaluate.model` names the fine-tuned checkpoint the `evaluate` stage scores, not the base model.
def _validate(cfg: DictConfig) -> None:
    from teams_rl.models import check_model
    from teams_rl.stages.evaluate import STAGE as EVALUATE

    EVALUATE.validate(cfg)  # the same evaluation settings
    if cfg.evaluate.get("base_model"):
        check_model(str(cfg.evaluate.base_model), cfg.paths.get("cache"), "evaluate.base_model")


STAGE = Stage(name="evaluate_base", version=1, run=run, config_keys=["evaluate"],
              run_only_keys=["evaluate.model", "evaluate.shared_prefix"], validate=_validate)
