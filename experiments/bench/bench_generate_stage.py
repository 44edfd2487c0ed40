"""The generate stage against a long-tailed server: streaming chains vs the step barrier, as a fraction of the bound.

The loopback server (tests/loopback_server.py, its own process) answers with the rule-based expert after a
lognormal latency (mean `--mean-s`, sigma `--sigma`; a pure function of the request, so both schedules meet the
same latencies). The stage runs `--seeds` seeds x `--steps` steps + an answer per evolution with the expert at
`max_concurrency` `--concurrency`, once with `generate.schedule=stream` and once with `barrier`, each with its own
artifacts and request cache. The bound is the server's summed latency of those requests / concurrency: no
schedule can finish sooner. Printed: LLM-phase wall time (first request in to last answer out) / bound and
bound / wall (the efficiency, goal >= 0.85 for the stream at sigma 1), for both schedules measured in the same
run, and whether both made the same records. Writes experiments/bench/results/generate_stage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import ServerProcess, machine, write_result  # noqa: E402

TOPICS = ("photosynthesis", "tax law", "the French revolution", "sorting algorithms", "volcanoes", "jazz harmony",
          "protein folding", "sailing", "inflation", "the immune system", "chess openings", "bridges")
VERBS = ("Explain", "Summarise", "Compare the main views on", "Describe the history of", "Give three facts about",
         "Write a short guide to", "List common mistakes about", "Teach a child about")


def write_seeds(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            text = f"{VERBS[i % len(VERBS)]} {TOPICS[(i // len(VERBS)) % len(TOPICS)]} (case {i})."
            fh.write(json.dumps({"id": f"s{i:04d}", "instruction": text}) + "\n")


def overrides(base_url: str, seeds: Path, steps: int, concurrency: int, artifacts: Path, schedule: str) -> list[str]:
    out = ["logger=none", f"paths.artifacts={artifacts}", "seeds=local_json", f"seeds.path={seeds}",
           "seeds.fields.id=id", "rl=random", "reward=reviewer_judge", "policy.updates=1", "policy.n_envs=1",
           "policy.steps_per_update=1", "policy.progress=false", f"generate.episode_length={steps}",
           "filters=none", "generate.embedding_stats=false", "generate.progress=false", "privacy.holdout_fraction=0.2",
           f"generate.schedule={schedule}"]
    for role in ("instructor", "reviewer", "expert"):
        out += [f"{role}=vllm_server", f"{role}.backend.base_url={base_url}", f"{role}.backend.model=loopback-model",
                f"{role}.backend.api_key_env=TEAMS_RL_BENCH_NO_KEY", f"{role}.backend.max_concurrency={concurrency}",
                f"{role}.backend.progress=false", f"{role}.backend.timeout_s=600"]
    return out


def compose(over: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from teams_rl.config_groups import CONF_DIR, register_role_groups

    register_role_groups()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=over)


def run_schedule(server: ServerProcess, args, seeds: Path, work: Path, schedule: str) -> dict:
    from teams_rl.pipeline import run_pipeline

    artifacts = work / schedule / "artifacts"
    over = overrides(server.base_url, seeds, args.steps, args.concurrency, artifacts, schedule)
    run_pipeline(compose(over + ["stages=[policy]"]), work / schedule / "policy_run")
    before = server.stats()
    started = time.perf_counter()
    run_pipeline(compose(over + ["stages=[generate]"]), work / schedule / "run")
    stage_wall = time.perf_counter() - started
    after = server.stats(since=before["records"])  # the generate stage's requests only
    requests = after["records"] - before["records"]
    bound = after["latency_sum_s"] / args.concurrency
    llm_wall = after["last_finish"] - after["first_start"]
    folder = next((artifacts / "generate").glob("*/manifest.json")).parent
    return {"schedule": schedule, "requests": requests, "bound_s": round(bound, 2), "llm_wall_s": round(llm_wall, 2),
            "stage_wall_s": round(stage_wall, 2), "llm_wall_over_bound": round(llm_wall / bound, 3),
            "efficiency": round(bound / llm_wall, 3), "stage_efficiency": round(bound / stage_wall, 3),
            "max_in_flight": after["max_in_flight"],
            "records": (folder / "alpaca.json").read_text() + (folder / "heldout.json").read_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--mean-s", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args(argv)
    os.environ.pop("TEAMS_RL_BENCH_NO_KEY", None)
    figures = machine()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = work / "seeds.jsonl"
        write_seeds(seeds, args.seeds)
        for schedule in ("stream", "barrier"):
            with ServerProcess("--responder", "evol", "--lognormal-mean-s", str(args.mean_s),
                               "--lognormal-sigma", str(args.sigma)) as server:
                results[schedule] = run_schedule(server, args, seeds, work, schedule)
    same = results["stream"].pop("records") == results["barrier"].pop("records")
    out = {"benchmark": "generate_stage", "machine": figures, "settings": vars(args), "same_records": same,
           **results, "stream_vs_barrier_speedup": round(results["barrier"]["llm_wall_s"]
                                                         / results["stream"]["llm_wall_s"], 2)}
    path = write_result("generate_stage", out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    print(f"machine: {figures}")
    for name in ("stream", "barrier"):
        r = results[name]
        print(f"{name:8s}: {r['requests']} requests, LLM phase {r['llm_wall_s']:.1f} s = {r['llm_wall_over_bound']:.2f} "
              f"x the bound {r['bound_s']:.1f} s (efficiency {r['efficiency']:.2f}; whole stage {r['stage_efficiency']:.2f})")
    print(f"same records: {same}; goal: stream efficiency >= 0.85 -> "
          f"{'met' if results['stream']['efficiency'] >= 0.85 else 'NOT met'}; wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
