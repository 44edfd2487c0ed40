"""Benchmark the fine-tuned model with lm-evaluation-harness and report its difference to the base model.

The model is the finetune stage's `model/` folder, or `evaluate.model` (a path or built-in name) when set.
The base model's numbers come from the `evaluate_base` stage (cached once per base model and settings).
Writes lm-eval's own `lm_eval_results.json`, `eval_settings.json` (harness version and settings), a flat
`metrics.json` (`finetuned/*`, `base/*`, `delta/*`) and `comparison.md`; logs `eval/*` to wandb with one
table per benchmark.
"""

from __future__ import annotations

import json
import logging
import math

from omegaconf import DictConfig

from teams_rl.errors import TeamsRLError
from teams_rl.stages import Stage

log = logging.getLogger(__name__)


def _inputs(cfg: DictConfig) -> list[str]:
    from teams_rl.eval.harness import check_model_ref

    check_model_ref(cfg.evaluate.get("model"), "evaluate.model")
    check_model_ref(cfg.evaluate.get("base_model"), "evaluate.base_model")
    deps = [] if cfg.evaluate.get("model") else ["finetune"]
    if cfg.evaluate.get("base_model"):
        deps.append("evaluate_base")
    return deps


def _validate(cfg: DictConfig) -> None:
    from teams_rl import config as C
    from teams_rl.eval.harness import requested_benchmarks
    from teams_rl.models import check_model

    _inputs(cfg)
    if cfg.evaluate.get("model"):
        check_model(str(cfg.evaluate.model), cfg.paths.get("cache"), "evaluate.model")
    C.integer(cfg, "evaluate.num_fewshot", minimum=0, optional=True)
    C.number(cfg, "evaluate.limit", minimum=0.0, optional=True)
    C.integer(cfg, "evaluate.batch_size", minimum=1)
    C.integer(cfg, "evaluate.bootstrap_iters", minimum=0, optional=True)
    C.choice(cfg, "evaluate.dtype", ("float32", "bfloat16", "float16", "auto"), default="float32")
    C.choice(cfg, "evaluate.device", ("auto", "cpu", "cuda"), default="auto")
    C.boolean(cfg, "evaluate.shared_prefix", default=True)
    if not requested_benchmarks(cfg.evaluate):
        raise TeamsRLError("evaluate.tasks is empty: there is nothing to evaluate")


def _model_path(cfg: DictConfig, ctx) -> str:
    from teams_rl.models import model_to_score

    path = model_to_score(cfg.evaluate.get("model"), cfg.paths.get("cache"), ctx.inputs.get("finetune"))
    if cfg.evaluate.get("model"):
        return path
    trained_from = _finetune_base(ctx.input_manifests.get("finetune", {}))
    base = cfg.evaluate.get("base_model")
    if trained_from and base and str(trained_from) != str(base):
        log.warning("evaluate: the fine-tuned model started from %s but evaluate.base_model is %s; "
                    "the delta compares against %s", trained_from, base, base)
    return path


def _finetune_base(manifest: dict) -> str | None:
    config = manifest.get("config", {})
    if "target.model" in config:
        return config["target.model"]
    target = config.get("target")
    return target.get("model") if isinstance(target, dict) else None


def compare(finetuned: dict[str, float], base: dict[str, float] | None) -> dict[str, float]:
    """`finetuned/*`, `base/*` and `delta/*` (= fine-tuned minus base, for metrics both have)."""
    out = {f"finetuned/{k}": v for k, v in finetuned.items()}
    if base is None:
        return out
    out.update({f"base/{k}": v for k, v in base.items()})
    for key, value in finetuned.items():
        other = base.get(key)
        if key.endswith(NO_DELTA) or not _number(value) or not _number(other):
            continue
        out[f"delta/{key}"] = value - other
    return out


NO_DELTA = ("_stderr", "/n", "/n_subtasks")   # sizes and standard errors are not scores


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _markdown(keys: list[str], finetuned: dict, base: dict | None) -> str:
    lines = ["| benchmark | base | fine-tuned | delta |", "|---|---|---|---|"]
    for key in keys + ["average"]:
        if key not in finetuned:
            continue
        ft = finetuned[key]
        b = base.get(key) if base else None
        cells = [key, "-" if b is None else f"{b:.4f}", f"{ft:.4f}", "-" if b is None else f"{ft - b:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.eval import harness
    from teams_rl.models import pick_device

    path = _model_path(cfg, ctx)
    device = pick_device(str(cfg.evaluate.get("device", "auto")))
    finetuned, info = harness.evaluate_model(path, cfg.evaluate, ctx.out_dir, device=device)
    base = ctx.input_manifests["evaluate_base"]["metrics"] if "evaluate_base" in ctx.inputs else None
    metrics = compare(finetuned, base)
    with open(ctx.out_dir / "metrics.json", "w") as fh:
        json.dump(metrics, fh, indent=2, sort_keys=True)

    keys = [b["key"] for b in info["benchmarks"]]
    table = _markdown(keys, finetuned, base)
    (ctx.out_dir / "comparison.md").write_text(table)
    print(f"\nevaluate ({info['lm_eval_version']}, {path})\n{table}")

    ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()})
    for key, rows in harness.benchmark_rows(finetuned, keys).items():
        ctx.tracker.log_table(f"eval/{key}", ["metric", "base", "finetuned", "delta"], [
            [name, base.get(f"{key}/{name}" if name != key else key) if base else None, value,
             metrics.get(f"delta/{key}/{name}" if name != key else f"delta/{key}")]
            for name, value in rows
        ])
    return metrics


# How the scores are computed, not what they are (equal up to float rounding): a toggle reuses the artifact.
RUN_ONLY_KEYS = ["evaluate.shared_prefix"]

STAGE = Stage(name="evaluate", version=1, run=run, config_keys=["evaluate"], run_only_keys=RUN_ONLY_KEYS,
              inputs=_inputs, validate=_validate)
