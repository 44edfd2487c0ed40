"""Before a paid run: does every configured LLM role answer, how fast, and what would it cost?

Runs every time (never served from the stage cache: it checks the world, not a config). Each role gets a
short outage limit (`llm_check.max_outage_s`, `max_retries`, `timeout_s` replace the backend's for the
check), so a dead host is reported within seconds; the stage exits non-zero (4) when a role is unreachable
or answers nothing, after writing the table."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from omegaconf import DictConfig

from teams_rl.errors import TeamsRLError
from teams_rl.llm.failures import LLMFailures
from teams_rl.llm.types import ChatRequest
from teams_rl.stages import Stage

# Backend attributes the check shortens (where a backend has them), so that a dead host answers quickly.
CHECK_LIMITS = ("max_outage_s", "max_retries", "timeout_s")

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


@contextmanager
def _short_limits(backend, settings):
    """The check's own outage/retry/timeout limits on `backend` for the duration of the block."""
    saved = {}
    for name in CHECK_LIMITS:
        value = settings.get(name)
        if value is not None and hasattr(backend, name):
            saved[name] = getattr(backend, name)
            setattr(backend, name, type(saved[name])(value))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(backend, name, value)


def _roles(cfg: DictConfig) -> list[str]:
    return [str(r) for r in cfg.llm_check.roles]


def _validate(cfg: DictConfig) -> None:
    from teams_rl import config as C
    from teams_rl.config_groups import ROLES

    C.integer(cfg, "llm_check.requests_per_role", minimum=1)
    C.integer(cfg, "llm_check.max_tokens", minimum=1)
    C.number(cfg, "llm_check.max_outage_s", minimum=0.0, optional=True)
    unknown = sorted(set(C.string_list(cfg, "llm_check.roles", optional=False)) - set(ROLES))
    if unknown:
        raise TeamsRLError(f"llm_check.roles: unknown role(s) {', '.join(unknown)} (roles: {', '.join(ROLES)})")


def run(cfg: DictConfig, ctx) -> dict:
    settings = cfg.llm_check
    n = int(settings.requests_per_role)
    metrics: dict = {}
    rows = []
    ctx.llms.attach_failures(None)  # failures are what this stage reports, not a reason to stop half-way
    for role in _roles(cfg):
        client = ctx.llm(role)
        requests = [
            ChatRequest.chat(PROBES[i % len(PROBES)], max_tokens=int(settings.max_tokens), seed=int(cfg.seed) + i,
                             purpose="check")
            for i in range(n)
        ]
        t0 = time.perf_counter()
        with _short_limits(client.backend, settings):
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
            "where": client.where,
            "failure_kinds": ", ".join(sorted({a.error_kind or "error" for a in answers if not a.ok})),
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
    bad = [r for r in rows if not r["reachable"]]
    if bad:
        (ctx.run_dir / "llm_check.md").write_text(_markdown(rows))
        raise LLMFailures("llm_check: " + "; ".join(
            f"{r['role']} ({r['where']}) answered {r['answered']} of {r['answered'] + r['failed']} "
            f"({r['failure_kinds']}: {str(r['sample'])[:120]})" for r in bad)
            + f"; table in {ctx.run_dir / 'llm_check.md'}")
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


STAGE = Stage(name="llm_check", version=1, run=run, config_keys=["llm_check", "instructor", "reviewer", "expert", "seed"],
              always_run=True, roles=_roles, validate=_validate)
