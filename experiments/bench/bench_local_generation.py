"""Local generation throughput: SmolLM2-135M, 8 prompts x 64 new tokens, batched (batch 8) vs one at a time.

Both sides generate exactly 64 tokens per prompt (EOS is suppressed with `min_new_tokens`), use the same
backend instance and the smollm2 role's sampling (temperature 0.7, top_p 0.95, seeded). Each side runs
`--repeats` times, interleaved, and the fastest run counts (other processes share the CPU).
Writes experiments/bench/results/local_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from teams_rl.llm.hf_backend import HFBackend
from teams_rl.llm.types import ChatRequest

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
    start = time.perf_counter()
    answers = backend.complete(requests)
    seconds = time.perf_counter() - start
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise SystemExit(f"generation failed: {failed[0]}")
    tokens = sum(a.completion_tokens for a in answers)
    if tokens != NEW_TOKENS * len(PROMPTS):
        raise SystemExit(f"expected {NEW_TOKENS * len(PROMPTS)} generated tokens, got {tokens}")
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    backend = HFBackend("smollm2", batch_size=len(PROMPTS), generate_kwargs={"min_new_tokens": NEW_TOKENS},
                        show_progress=False)
    start = time.perf_counter()
    backend.complete([ChatRequest.chat("Hello", max_tokens=4, temperature=0.0)])  # load + warm-up
    load_s = time.perf_counter() - start

    load_before = round(os.getloadavg()[0], 2)  # other processes on the machine skew both sides
    runs: dict[str, list[dict]] = {"batched": [], "sequential": []}
    for _ in range(args.repeats):
        runs["batched"].append(run_once(backend, len(PROMPTS)))
        runs["sequential"].append(run_once(backend, 1))
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in runs.items()}
    ratio = best["batched"]["tokens_per_s"] / best["sequential"]["tokens_per_s"]
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
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "load_and_warmup_s": round(load_s, 2),
        "batched": best["batched"],
        "sequential": best["sequential"],
        "all_runs": runs,
        "speedup": round(ratio, 2),
        "target_speedup": 3.5,
        "meets_target": ratio >= 3.5,
    }
    backend.close()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"batched (batch {len(PROMPTS)}): {best['batched']['tokens_per_s']:.1f} tok/s "
          f"({best['batched']['seconds']:.1f} s)")
    print(f"one at a time:     {best['sequential']['tokens_per_s']:.1f} tok/s "
          f"({best['sequential']['seconds']:.1f} s)")
    print(f"speedup: {ratio:.2f}x (target >= 3.5x) -> {RESULT}")


if __name__ == "__main__":
    main()
