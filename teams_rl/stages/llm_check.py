"""Before a paid run: does every configured LLM role answer, how fast, and what would it cost?"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from teams_rl.llm.types import ChatRequest
from teams_rl.stages import Stage

log = logging.getLogger(__name__)

PROBES = (
    "Reply with the single word: ready.",
    "Name one primary colour.",
    "What is 2 + 3? Answer with a number.",
    "Rewrite this instruction to be more specific: Describe a tree.",
    "Give a synonym for 'quick'.",
    "Say hello in French.",
    "Is water wet? Answer yes or no.",
    "Name a planet of the solar system.",
)


def run(cfg: DictConfig, ctx) -> dict:
    settings = cfg.llm_check
    n = int(settings.requests_per_role)
    metrics: dict = {}
    rows = []
    for role in settings.roles:
        client = ctx.llm(role)
        requests = [
            ChatRequest.chat(PROBES[i % len(PROBES)], max_tokens=int(settings.max_tokens), seed=int(cfg.seed) + i,
                             purpose="check")
            for i in range(n)
        ]
        t0 = time.perf_counter()
        answers = client.complete(requests)
        wall = time.perf_counter() - t0
        ok = [a for a in answers if a.ok]
        summary = client.account.summary()
        row = {
            "role": role,
            "model": client.model_id,
            "reachable": len(ok) == len(answers),
            "answered": len(ok),
            "failed": len(answers) - len(ok),
            "wall_s": round(wall, 3),
            "latency_p50_s": summary["latency_p50_s"],
            "latency_p90_s": summary["latency_p90_s"],
            "latency_p99_s": summary["latency_p99_s"],
            "prompt_tokens": summary["prompt_tokens"],
            "completion_tokens": summary["completion_tokens"],
            "usd": summary["usd"],
            "sample": ok[0].text[:80] if ok else (answers[0].error if answers else ""),
        }
        rows.append(row)
        for key in ("reachable", "answered", "failed", "latency_p50_s", "latency_p90_s", "prompt_tokens",
                    "completion_tokens", "usd"):
            metrics[f"{role}/{key}"] = row[key]
    _print_table(rows)
    ctx.tracker.log_table("llm_check/roles", list(rows[0].keys()), [list(r.values()) for r in rows])
    with open(ctx.out_dir / "llm_check.md", "w") as fh:
        fh.write(_markdown(rows))
    metrics["all_reachable"] = all(r["reachable"] for r in rows)
    ctx.log(metrics)
    return metrics


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _markdown(rows: list[dict]) -> str:
    cols = ["role", "model", "reachable", "answered", "failed", "latency_p50_s", "latency_p90_s",
            "latency_p99_s", "prompt_tokens", "completion_tokens", "usd", "sample"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/").replace("\n", " ") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _print_table(rows: list[dict]) -> None:
    print("\nLLM roles check")
    print(_markdown(rows))


STAGE = Stage(name="llm_check", version=1, run=run, config_keys=["llm_check", "instructor", "reviewer", "expert", "seed"])
