"""Local generation throughput: SmolLM2-135M, 8 prompts x 64 new tokens, batched (batch 8) vs one at a time, and
`dtype: auto` (the dtype `teams_rl.fast_dtype` measured fastest on this machine) vs float32, batched.

Every side generates exactly 64 tokens per prompt (EOS is suppressed with `min_new_tokens`) with the smollm2
role's sampling (temperature 0.7, top_p 0.95, seeded). The float32 sides share one backend; the auto side is a
second backend of the same model in the dtype `auto` chose (when that is float32 it is the same work, and the
ratio measures only noise). Each side runs `--repeats` times, interleaved, and the fastest run counts (other
processes share the CPU). The machine's matmul figures (fp32/bf16 GFLOPS) are recorded beside the times.
Writes experiments/bench/results/local_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import machine  # noqa: E402
from teams_rl.llm.hf_backend import HFBackend  # noqa: E402
from teams_rl.llm.types import ChatRequest  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Rewrite this instruction so that it needs more reasoning steps: Sort a list of numbers.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip that are not about holding paper together.",
    "Give a short, precise definition of a prime number and one example.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "Suggest a name for a bakery that specialises in sourdough bread, and explain the choice.",
]
NEW_TOKENS = 64
RESULT = Path(__file__).resolve().parent / "results" / "local_generation.json"


def run_once(backend: HFBackend, batch_size: int) -> dict:
    backend.batch_size = batch_size
    requests = [ChatRequest.chat(p, max_tokens=NEW_TOKENS, temperature=0.7, top_p=0.95, seed=i)
                for i, p in enumerate(PROMPTS)]
    cpu0, start = time.process_time(), time.perf_counter()
    answers = backend.complete(requests)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise SystemExit(f"generation failed: {failed[0]}")
    tokens = sum(a.completion_tokens for a in answers)
    if tokens != NEW_TOKENS * len(PROMPTS):
        raise SystemExit(f"expected {NEW_TOKENS * len(PROMPTS)} generated tokens, got {tokens}")
    # CPU seconds (all threads of this process) move less than wall time when other jobs share the cores
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "cpu_seconds": round(cpu, 3), "tokens_per_cpu_s": round(tokens / cpu, 2)}


def _loaded(dtype: str) -> tuple[HFBackend, float]:
    backend = HFBackend("smollm2", dtype=dtype, batch_size=len(PROMPTS), generate_kwargs={"min_new_tokens": NEW_TOKENS},
                        show_progress=False)
    start = time.perf_counter()
    backend.complete([ChatRequest.chat("Hello", max_tokens=4, temperature=0.0)])  # load + warm-up
    return backend, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from teams_rl.fast_dtype import cpu_choice

    backend, load_s = _loaded("float32")
    auto, _ = _loaded("auto")
    choice = cpu_choice(auto.cache_dir) if auto.device_used == "cpu" else {"dtype": auto.dtype_used}

    load_before = round(os.getloadavg()[0], 2)  # other processes on the machine skew every side
    runs: dict[str, list[dict]] = {"batched": [], "sequential": [], "auto_batched": []}
    for _ in range(args.repeats):
        runs["batched"].append(run_once(backend, len(PROMPTS)))
        runs["auto_batched"].append(run_once(auto, len(PROMPTS)))
        runs["sequential"].append(run_once(backend, 1))
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in runs.items()}
    ratio = best["batched"]["tokens_per_s"] / best["sequential"]["tokens_per_s"]
    auto_ratio = best["auto_batched"]["tokens_per_s"] / best["batched"]["tokens_per_s"]
    auto_cpu_ratio = (max(r["tokens_per_cpu_s"] for r in runs["auto_batched"])
                      / max(r["tokens_per_cpu_s"] for r in runs["batched"]))
    result = {
        "model": backend.model_id,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "batch_size": len(PROMPTS),
        "decoding": "sampled, temperature 0.7, top_p 0.95, seeded",
        "torch_threads": torch.get_num_threads(),
        "device": str(backend.model.device),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "machine_figures": machine(),
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "load_and_warmup_s": round(load_s, 2),
        "batched": best["batched"],
        "sequential": best["sequential"],
        "all_runs": runs,
        "speedup": round(ratio, 2),
        "target_speedup": 3.5,
        "meets_target": ratio >= 3.5,
        "auto": {"dtype": auto.dtype_used, "model": auto.model_id, "choice": choice,
                 "batched": best["auto_batched"], "vs_float32_batched": round(auto_ratio, 2),
                 "vs_float32_batched_cpu_time": round(auto_cpu_ratio, 2),
                 "same_dtype_as_float32_side": auto.dtype_used == "float32"},
    }
    backend.close()
    auto.close()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    figures = result["machine_figures"]
    print(f"machine: {figures['cpu']}, {figures['cores']} cores, {figures['torch_threads']} threads, fp32 "
          f"{figures['fp32_gflops']} / bf16 {figures['bf16_gflops']} GFLOPS, load {figures['load_average_1m']}")
    print(f"batched (batch {len(PROMPTS)}): {best['batched']['tokens_per_s']:.1f} tok/s "
          f"({best['batched']['seconds']:.1f} s)")
    print(f"one at a time:     {best['sequential']['tokens_per_s']:.1f} tok/s "
          f"({best['sequential']['seconds']:.1f} s)")
    print(f"speedup: {ratio:.2f}x (target >= 3.5x)")
    print(f"dtype auto -> {auto.dtype_used} (chooser: {choice.get('gflops', 'on a GPU')}): "
          f"{best['auto_batched']['tokens_per_s']:.1f} tok/s batched = {auto_ratio:.2f}x float32 "
          f"({auto_cpu_ratio:.2f}x per CPU second)"
          + (" -- the same dtype, so only noise" if auto.dtype_used == "float32" else "") + f" -> {RESULT}")


if __name__ == "__main__":
    main()
