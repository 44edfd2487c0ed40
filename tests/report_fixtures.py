"""Finished stage artifacts for report tests, written in the formats the stages write (no model is run).

`build_run(root, label, ...)` makes `root/artifacts/<stage>/<fp>/` folders (manifest.json last) and a run dir
`root/<label>/` with run_manifest.json, metrics.json and config.resolved.yaml, like `run_pipeline` leaves them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

OPS = ["breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input"]
BENCH = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2")


def _fp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_artifact(store: Path, stage: str, metrics: dict, config: dict, inputs: dict[str, str],
                   files: dict[str, object], llm: dict | None = None, salt: str = "") -> tuple[str, Path]:
    fp = _fp(stage, config, inputs, salt)
    folder = store / stage / fp
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, list):
            path.write_text("".join(json.dumps(row) + "\n" for row in content))
        else:
            path.write_text(json.dumps(content, indent=2))
    (folder / "manifest.json").write_text(json.dumps({
        "stage": stage, "version": 1, "fingerprint": fp, "inputs": inputs, "config": config, "metrics": metrics,
        "llm": llm or {}, "finished_at": "2026-11-21T00:00:00+00:00", "duration_s": 1.0,
    }, indent=2))
    return fp, folder


def policy_artifact(store: Path, rewards: list[float], operators=OPS, algorithm="trpo", salt="",
                    versus: tuple | None = None) -> tuple[str, Path]:
    probs = np.linspace(1.0, 2.0, len(operators))
    probs = probs / probs.sum()
    history = []
    for i, r in enumerate(rewards, start=1):
        row = {"update": i, "timesteps": 4 * i, "mean_reward": r, "entropy": 1.5 - 0.1 * i}
        row.update({f"op_prob/{o}": float(p) for o, p in zip(operators, probs, strict=True)})
        row.update({f"action_frac/{o}": float(p) for o, p in zip(operators, probs, strict=True)})
        history.append(row)
    metrics = {"algorithm": algorithm, "operator_set": "teams_rl" if len(operators) == 6 else "custom",
               "updates": len(rewards), "timesteps": 4 * len(rewards), "first_mean_reward": rewards[0],
               "final_mean_reward": rewards[-1], "mean_reward": float(np.mean(rewards)), "final_entropy": 1.2,
               "llm_queries/instructor": 4 * len(rewards), "llm_queries/reviewer": 4 * len(rewards),
               **{f"op_prob/{o}": float(p) for o, p in zip(operators, probs, strict=True)}}
    if versus is not None:
        metrics.update({"final_window/mean_reward": versus[0], "final_window/reward_se": versus[1],
                        "final_window/transitions": 32, "final_window/updates": 2})
    llm = {"instructor": {"model": "hf/smollm2", "queries": 8, "cache_hits": 0, "failures": 0, "prompt_tokens": 800,
                          "completion_tokens": 120, "usd": 0.0, "by_purpose": {}}}
    return write_artifact(store, "policy", metrics, {"rl": {"algorithm": algorithm}, "operators": {"ops": operators}},
                          {}, {"metrics.jsonl": history}, llm, salt)


def generate_artifact(store: Path, policy_fp: str, mode: str, calls: dict[str, int], size: int, seeds: int = 4,
                      salt="", extra: dict | None = None) -> tuple[str, Path]:
    train = size - size // 4
    metrics = {"mode": mode, "seeds": seeds, "episode_length": 2 if mode == "teams_rl" else 4,
               "evolutions": calls.get("calls/expert/evolve", 0), "dataset/size": size, "dataset/train": train,
               "dataset/heldout": size - train, "dropped": 0, **calls,
               **{k.replace("calls/", "sent/"): v for k, v in calls.items()},
               "calls/total": sum(calls.values()), "distinct_1": 0.61, "distinct_2": 0.87, "instruction_words_mean": 14.5,
               **(extra or {})}
    stats = {"records": size, "operator_mix": {"add_constraints": size - 2, "breadth": 2}, "distinct_1": 0.61,
             "distinct_2": 0.87, "seed_distinct_1": 0.55, "seed_distinct_2": 0.8,
             "instruction_words": {"mean": 14.5}, "seed_instruction_words": {"mean": 9.25}}
    seeds_cfg = {"kind": "tiny", "limit": seeds, "start": 0, "stop": None}
    return write_artifact(store, "generate", metrics, {"seeds": seeds_cfg, "generate": {"mode": mode}},
                          {"policy": policy_fp}, {"stats.json": stats}, salt=salt)


def finetune_artifact(store: Path, generate_fp: str, salt="") -> tuple[str, Path]:
    metrics = {"steps": 3, "epochs": 3.0, "train_loss": 5.1, "first_loss": 6.2, "final_loss": 4.4, "examples": 6,
               "base_model": "tiny_llama", "deepspeed_stage": 0, "ranks": 1, "tokens_per_s": 950.0, "device": "cpu"}
    return write_artifact(store, "finetune", metrics, {"target": {"model": "tiny_llama"}},
                          {"generate": generate_fp}, {"train_metrics.json": metrics}, salt=salt)


def eval_metrics(scores: dict[str, float], stderr: float | None = None) -> dict[str, float]:
    flat = {}
    for key, value in scores.items():
        flat[key] = value
        metric = f"{key}/acc_norm" if key in ("arc_challenge", "hellaswag") else f"{key}/acc"
        flat[metric] = value
        flat[f"{key}/n"] = 4.0
        if stderr is not None:  # lm-eval's `<metric>_stderr`
            flat[f"{metric}_stderr"] = stderr
    flat["average"] = float(np.mean([scores[k] for k in BENCH]))
    return flat


EVAL_SETTINGS = {"harness": "lm-evaluation-harness", "lm_eval_version": "0.4.13", "limit": 4, "benchmarks": [
    {"key": "arc_challenge", "task": "offline_arc_challenge", "num_fewshot": 0, "metric": "acc_norm"},
    {"key": "hellaswag", "task": "offline_hellaswag", "num_fewshot": 0, "metric": "acc_norm"},
    {"key": "mmlu", "task": "offline_mmlu", "num_fewshot": 0, "metric": "acc"},
    {"key": "truthfulqa_mc2", "task": "offline_truthfulqa_mc2", "num_fewshot": 0, "metric": "acc"}]}


def evaluate_artifacts(store: Path, finetune_fp: str, base: dict, tuned: dict, salt="",
                       stderr: float | None = None) -> dict[str, tuple[str, Path]]:
    base_flat, tuned_flat = eval_metrics(base, stderr), eval_metrics(tuned, stderr)
    base_fp = write_artifact(store, "evaluate_base", base_flat, {"evaluate.limit": 4}, {},
                             {"metrics.json": base_flat, "eval_settings.json": EVAL_SETTINGS})
    metrics = {**{f"finetuned/{k}": v for k, v in tuned_flat.items()}, **{f"base/{k}": v for k, v in base_flat.items()}}
    metrics.update({f"delta/{k}": tuned_flat[k] - base_flat[k] for k in tuned_flat if not k.endswith("/n")})
    ev = write_artifact(store, "evaluate", metrics, {"evaluate": {"limit": 4}},
                        {"finetune": finetune_fp, "evaluate_base": base_fp[0]},
                        {"metrics.json": metrics, "eval_settings.json": EVAL_SETTINGS}, salt=salt)
    return {"evaluate_base": base_fp, "evaluate": ev}


def privacy_artifact(store: Path, finetune_fp: str, generate_fp: str, shift: float, seed: int = 0,
                     salt="") -> tuple[str, Path]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = 30
    labels = np.array([1] * n + [0] * n)
    loss = np.concatenate([rng.normal(shift, 1, n), rng.normal(0, 1, n)])
    zlib = np.concatenate([rng.normal(shift / 2, 1, n), rng.normal(0, 1, n)])
    rows = [{"member": int(m), "instruction": f"q{i}", "n_tokens": 10, "nll": 2.0, "loss": float(a), "zlib": float(b)}
            for i, (m, a, b) in enumerate(zip(labels, loss, zlib, strict=True))]
    metrics = {"n_members": n, "n_nonmembers": n}
    for name, values in (("loss", loss), ("zlib", zlib)):
        auc = float(roc_auc_score(labels, values))
        metrics.update({f"{name}/auc": auc, f"{name}/auc_ci_low": auc - 0.1, f"{name}/auc_ci_high": min(1.0, auc + 0.1),
                        f"{name}/tpr@0.1%fpr": 0.0, f"{name}/tpr@1%fpr": 0.1})
    return write_artifact(store, "privacy", metrics, {"privacy": {"seed": seed}},
                          {"finetune": finetune_fp, "generate": generate_fp},
                          {"scores.jsonl": rows, "metrics.json": metrics}, salt=salt)


def build_run(root: Path, label: str, *, rewards=(0.2, 0.4, 0.6), tuned=None, mia_shift=0.3, seed=0,
              operators=OPS, mode="teams_rl", salt="", overrides: list[str] | None = None,
              generate: dict | None = None, stderr: float | None = None, size: int | None = None,
              versus: tuple[float, float, float, float] | None = None) -> Path:
    """A finished run of the whole pipeline: artifacts under root/artifacts, run dir root/<label>. `versus` =
    (final-window reward, its SE, random-baseline reward, its SE) adds a `policy_baseline` stage."""
    store = root / "artifacts"
    tuned = tuned or {"arc_challenge": 0.5, "hellaswag": 0.25, "mmlu": 0.3, "truthfulqa_mc2": 0.45}
    base = {"arc_challenge": 0.25, "hellaswag": 0.25, "mmlu": 0.2, "truthfulqa_mc2": 0.5}
    salt = salt or label
    folders = {}
    folders["policy"] = policy_artifact(store, list(rewards), operators, salt=salt, versus=versus)
    if versus is not None:
        folders["policy_baseline"] = write_artifact(
            store, "policy_baseline", {"algorithm": "random", "baseline/mean_reward": versus[2],
                                       "baseline/reward_se": versus[3], "baseline/transitions": 64},
            {"rl": {"algorithm": "random"}}, {}, {}, None, salt)
    calls = ({"calls/expert/evolve": 8, "calls/expert/answer": 8} if mode == "teams_rl" else
             {"calls/expert/evolve": 16, "calls/expert/answer": 16, "calls/reviewer/judge": 16})
    size = size if size is not None else (8 if mode == "teams_rl" else 12)
    folders["generate"] = generate_artifact(store, folders["policy"][0], mode, calls, size, salt=salt, extra=generate)
    folders["finetune"] = finetune_artifact(store, folders["generate"][0], salt=salt)
    folders.update(evaluate_artifacts(store, folders["finetune"][0], base, tuned, salt=salt, stderr=stderr))
    folders["privacy"] = privacy_artifact(store, folders["finetune"][0], folders["generate"][0], mia_shift, seed,
                                          salt=salt)
    run_dir = root / label
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    stages = {s: {"fingerprint": fp, "folder": str(folder), "status": "ran"} for s, (fp, folder) in folders.items()}
    (run_dir / "run_manifest.json").write_text(json.dumps({"experiment": label, "stages": stages, "llm": {},
                                                           "finished_at": "2026-11-21T00:00:01+00:00"}))
    (run_dir / "metrics.json").write_text(json.dumps(
        {s: json.loads((folder / "manifest.json").read_text())["metrics"] for s, (_, folder) in folders.items()}))
    (run_dir / "config.resolved.yaml").write_text(f"experiment_name: {label}\nseed: {seed}\ntarget:\n  model: tiny_llama\n")
    if overrides is not None:
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir
