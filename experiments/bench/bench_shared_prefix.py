"""Shared batch prefix: SmolLM2-135M rewriting 16 tiny seeds with the default short operator prompts (one batch,
12 sampled new tokens, the policy stage's workload), `backend.shared_prefix: true` vs false.

The rows of a batch start with the same tokens (SmolLM2's default system prompt, the start of the short operator
template); with the option on they are prefilled once and the rows' tails together. Both sides are the same
backend with the option switched, run `--repeats` times interleaved; the fastest run of each counts (other
processes share the CPU). Also counts how many of the 16 answers are identical (the arithmetic is the same up to
float rounding, so a sampled row may rarely differ). The machine's matmul figures are recorded beside the times.
Writes experiments/bench/results/shared_prefix.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import machine, write_result  # noqa: E402
from teams_rl.evol.operators import load_operator_set  # noqa: E402
from teams_rl.evol.seeds import load_seeds  # noqa: E402
from teams_rl.llm.hf_backend import HFBackend  # noqa: E402
from teams_rl.llm.types import ChatRequest  # noqa: E402

ROWS, NEW_TOKENS, TARGET = 16, 12, 1.1


def requests(rows: int = ROWS) -> list[ChatRequest]:
    """`rows` policy rewrites of the embedded default: tiny seed i, operator i mod 6, seeded sampling."""
    from hydra import compose, initialize_config_dir

    from teams_rl.config_groups import CONF_DIR, register_role_groups

    register_role_groups()  # instructor/expert/... are built from conf/llm and conf/role
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")  # the embedded default: operators=teams_rl_short, seeds=tiny
    opset, seeds = load_operator_set(cfg.operators), load_seeds(cfg.seeds)
    out = []
    for i in range(rows):
        prompt = opset[i % len(opset)].render(seeds[i % len(seeds)].instruction)
        out.append(ChatRequest.chat(prompt, max_tokens=NEW_TOKENS, temperature=0.7, top_p=0.95, seed=i))
    return out


def run_once(backend: HFBackend, shared: bool, reqs: list[ChatRequest]) -> tuple[float, list[str]]:
    backend.shared_prefix = shared
    start = time.perf_counter()
    answers = backend.complete(reqs)
    seconds = time.perf_counter() - start
    if any(not a.ok for a in answers):
        raise SystemExit(f"generation failed: {next(a.error for a in answers if not a.ok)}")
    return seconds, [a.text for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reqs = requests()
    backend = HFBackend("smollm2", dtype="float32", batch_size=ROWS, show_progress=False)
    backend.complete(reqs[:2])  # load + warm-up
    ids = [backend._prompt_ids(r) for r in reqs]
    times = {True: [], False: []}
    texts = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            seconds, texts[shared] = run_once(backend, shared, reqs)
            times[shared].append(round(seconds, 3))
    from teams_rl.llm.prefix_cache import shared_length

    best = {k: min(v) for k, v in times.items()}
    ratio = best[False] / best[True]
    result = {"model": backend.model_id, "rows": ROWS, "new_tokens": NEW_TOKENS,
              "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1), "shared_tokens": shared_length(ids),
              "plain_s": best[False], "shared_s": best[True], "all_runs": {"plain": times[False], "shared": times[True]},
              "speedup": round(ratio, 2), "target_speedup": TARGET, "meets_target": ratio >= TARGET,
              "identical_answers": sum(a == b for a, b in zip(texts[False], texts[True], strict=True)),
              "machine_figures": machine()}
    backend.close()
    path = write_result("shared_prefix", result)
    f = result["machine_figures"]
    print(f"machine: {f['cpu']}, {f['cores']} cores, fp32 {f['fp32_gflops']} / bf16 {f['bf16_gflops']} GFLOPS, "
          f"load {f['load_average_1m']}")
    print(f"{ROWS} rewrites, {result['prompt_tokens_mean']} prompt tokens (mean), {result['shared_tokens']} shared: "
          f"plain {best[False]:.2f} s, shared prefix {best[True]:.2f} s = {ratio:.2f}x (target >= {TARGET}x); "
          f"identical answers {result['identical_answers']}/{ROWS} -> {path}")


if __name__ == "__main__":
    main()
