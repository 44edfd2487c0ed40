"""`dry_run=true`: what a configuration would send and cost, before it spends anything.

For every planned stage (cached ones marked: they send nothing) it prints the requests per role and purpose,
the prompt tokens (from the prompts it would send: chars/4), the completion tokens at most (`max_tokens`) and
the USD at most from each role's `price`, then writes the same figures to `<run dir>/dry_run.json` and exits
0 without sending a request or writing an artifact. Role problems that a real run would stop on (a missing
API key variable, weights that are not there) are listed instead of stopping the dry run.

`dry_run.pilot=N` sends up to N of each plan's sample requests for real (through the normal client: cached,
accounted) and uses their measured prompt and completion tokens for an expected cost next to the bound.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from teams_rl import config as C
from teams_rl.artifacts import ArtifactStore, write_json_atomic
from teams_rl.errors import TeamsRLError
from teams_rl.llm.plans import RequestPlan
from teams_rl.stages import load_stage

log = logging.getLogger(__name__)


def _price(cfg: DictConfig, role: str) -> tuple[float, float]:
    price = C.get(cfg, f"{role}.price", {})
    return float(C.get(price, "prompt_usd_per_1k", 0.0)), float(C.get(price, "completion_usd_per_1k", 0.0))


def _pilot(llms, plan: RequestPlan, n: int) -> tuple[float, float, int] | None:
    """(mean prompt tokens, mean completion tokens, answers) measured on up to `n` of the plan's samples."""
    samples = plan.samples[:n]
    if not samples:
        return None
    answers = [a for a in llms.client(plan.role).complete(samples) if a.ok]
    if not answers:
        return None
    return (sum(a.prompt_tokens for a in answers) / len(answers) + plan.extra_prompt_tokens,
            sum(a.completion_tokens for a in answers) / len(answers), len(answers))


def _row(cfg: DictConfig, stage: str, status: str, plan: RequestPlan, pilot) -> dict:
    p_usd, c_usd = _price(cfg, plan.role)
    default_max = C.get(cfg, f"{plan.role}.sampling.max_tokens")
    prompt = plan.mean_prompt_tokens * plan.requests
    completion_max = plan.max_completion_tokens(default_max) * plan.requests
    row = {"stage": stage, "status": status, "role": plan.role, "model": C.get(cfg, f"{plan.role}.backend.model"),
           "purpose": plan.purpose, "requests": plan.requests, "prompt_tokens": round(prompt),
           "completion_tokens_max": round(completion_max),
           "usd_max": (prompt * p_usd + completion_max * c_usd) / 1000, "note": plan.note}
    if pilot is not None:
        mean_prompt, mean_completion, n = pilot
        row.update(pilot_answers=n, prompt_tokens_pilot=round(mean_prompt * plan.requests),
                   completion_tokens_pilot=round(mean_completion * plan.requests),
                   usd_pilot=(mean_prompt * p_usd + mean_completion * c_usd) * plan.requests / 1000)
    return row


def dry_run(cfg: DictConfig, order: list[str], fps: dict[str, str], store: ArtifactStore, llms, run_dir,
            settings: dict) -> dict:
    problems, rows = [], []
    for name in order:
        stage = load_stage(name)
        cached = store.load_manifest(name, fps[name]) is not None and not stage.always_run
        status = "cached" if cached else "would run"
        for role in stage.roles_for(cfg):
            try:
                llms.client(role)
            except TeamsRLError as err:
                problems.append(f"{name}: {role}: {err}")
        if cached or stage.estimate is None:
            rows.append({"stage": name, "status": status, "role": "-", "purpose": "-", "requests": 0,
                         "prompt_tokens": 0, "completion_tokens_max": 0, "usd_max": 0.0,
                         "note": "" if cached or not stage.roles_for(cfg) else "no estimate"})
            continue
        for plan in stage.estimate(cfg):
            pilot = None
            if settings["pilot"] and not any(p.startswith(f"{name}: {plan.role}:") for p in problems):
                pilot = _pilot(llms, plan, settings["pilot"])
            rows.append(_row(cfg, name, status, plan, pilot))
    result = {"rows": rows, "problems": problems, "pilot": settings["pilot"],
              "total_requests": sum(r["requests"] for r in rows),
              "total_usd_max": sum(r["usd_max"] for r in rows),
              "total_usd_pilot": sum(r.get("usd_pilot", 0.0) for r in rows) if settings["pilot"] else None}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / "dry_run.json", result)
    print(render(result))
    print(f"dry run: nothing was sent{' but the pilot requests' if settings['pilot'] else ''}; "
          f"figures in {Path(run_dir) / 'dry_run.json'}")
    return result


def render(result: dict) -> str:
    cols = ["stage", "status", "role", "purpose", "requests", "prompt_tokens", "completion_tokens_max", "usd_max"]
    if result["pilot"]:
        cols += ["prompt_tokens_pilot", "completion_tokens_pilot", "usd_pilot"]
    lines = ["| " + " | ".join(cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for row in result["rows"]:
        cells = [f"{row[c]:,.4f}" if c.startswith("usd") and c in row else f"{row[c]:,}" if isinstance(row.get(c), int)
                 else str(row.get(c, "-")) for c in cols]
        lines.append("| " + " | ".join(cells) + f" | {row.get('note', '')} |")
    total = f"total: {result['total_requests']:,} requests, at most ${result['total_usd_max']:,.2f}"
    if result["total_usd_pilot"] is not None:
        total += f", expected ${result['total_usd_pilot']:,.2f} from the pilot"
    out = ["", "dry run: what this configuration would send", *lines, total]
    if result["problems"]:
        out += ["", "a real run would stop on:", *[f"- {p}" for p in result["problems"]]]
    return "\n".join(out) + "\n"
