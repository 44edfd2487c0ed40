"""Membership-inference scoring throughput: the privacy stage's batched per-token log-prob pass
(`teams_rl.eval.mia.token_scores`, length-sorted right-padded batches, logits only at scored positions) vs
the same pass one sequence at a time (batch size 1), on tiny_llama and SmolLM2-135M.

Sequences are Alpaca-formatted instruction/response pairs of generated-data length. Both passes run
`--repeats` times, alternating, and the fastest run of each is kept (the machine may be shared); this is
done with 1 torch thread and with torch's default count; the maximum log-prob difference
between the two passes is reported (it must be at the dtype's round-off). The models run in the dtype
`privacy.dtype: auto` chooses on this machine (`teams_rl.fast_dtype`), as the privacy stage does.
Writes experiments/bench/results/privacy_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import machine  # noqa: E402
from teams_rl.errors import TeamsRLError  # noqa: E402
from teams_rl.eval import mia  # noqa: E402
from teams_rl.fast_dtype import resolve_dtype  # noqa: E402
from teams_rl.models import load_causal_lm  # noqa: E402
from teams_rl.sft.data import format_prompt  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "privacy_scoring.json"
TOPICS = ["volcanoes", "tax law", "bird migration", "sourdough bread", "jazz history", "coral reefs",
          "solar panels", "chess openings", "sleep science", "glaciers", "robotics", "fermentation"]
VERBS = ["Explain", "Describe", "Summarize", "Compare", "Give advice on", "Outline a lesson on"]
FILLER = ("the main idea is that each part depends on the others and small changes add up over time so a careful "
          "reader should look at the causes the effects and the evidence before drawing a conclusion").split()


def pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        instruction = f"{rng.choice(VERBS)} {rng.choice(TOPICS)} in {rng.randint(2, 9)} sentences for a beginner."
        prompts.append(format_prompt(instruction))
        responses.append(" " + " ".join(rng.choices(FILLER, k=rng.randint(20, 70))).capitalize() + ".")
    return prompts, responses


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run each function `repeats` times, alternating between them so that both see the same machine load;
    returns ({name: fastest seconds}, {name: last result})."""
    best, last = {name: float("inf") for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, last


def bench_model(name: str, n: int, batch_size: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = resolve_dtype("auto", "cpu")  # the privacy stage's default; measured per thread count
    model, tok = load_causal_lm(name, dtype=dtype)
    prompts, responses = pairs(n)
    encoded = mia.encode_pairs(tok, prompts, responses)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mia.token_scores(model, encoded[:2], batch_size=2, pad_id=pad)  # warm-up
    times, out = interleaved({
        "single": lambda: mia.token_scores(model, encoded, batch_size=1, pad_id=pad),
        "batched": lambda: mia.token_scores(model, encoded, batch_size=batch_size, pad_id=pad),
    }, repeats)
    diff = max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(out["single"], out["batched"], strict=True))
    lengths = [len(ids) for ids, _ in encoded]
    ordered = sorted(lengths, reverse=True)          # token_scores batches length-sorted sequences
    padded = sum(max(ordered[i:i + batch_size]) * len(ordered[i:i + batch_size])
                 for i in range(0, len(ordered), batch_size))
    return {
        "model": name,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": threads,
        "sequences": n,
        "tokens_mean": float(np.mean(lengths)),
        "scored_tokens_mean": float(np.mean([len(ids) - start for ids, start in encoded])),
        "batch_size": batch_size,
        "padding_fraction": 1 - sum(lengths) / padded,
        "one_at_a_time_seq_per_s": n / times["single"],
        "batched_seq_per_s": n / times["batched"],
        "speedup": times["single"] / times["batched"],
        "max_abs_logprob_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="default: privacy.batch_size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny-n", type=int, default=128)
    parser.add_argument("--smollm2-n", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to measure (default: 1 and torch's default)")
    parser.add_argument("--models", nargs="+", default=["tiny_llama", "smollm2"])
    args = parser.parse_args()
    import torch

    threads = args.threads or sorted({1, torch.get_num_threads()})

    load_start = os.getloadavg()[0]   # other work on the machine slows both passes, not equally
    rows, skipped = [], {}
    sizes = {"tiny_llama": args.tiny_n, "smollm2": args.smollm2_n}
    for name in args.models:
        for t in threads:
            try:
                row = bench_model(name, sizes.get(name, args.smollm2_n), args.batch_size, args.repeats, t)
            except TeamsRLError as err:  # SmolLM2 not installed
                skipped[name] = str(err)
                print(f"{name}: skipped ({err})")
                break
            rows.append(row)
            print(f"{name:11s} {row['dtype']}, {t} thread(s), {row['sequences']} seqs ({row['tokens_mean']:.0f} tokens, "
                  f"{row['scored_tokens_mean']:.0f} scored): one at a time {row['one_at_a_time_seq_per_s']:.1f} seq/s, "
                  f"batched (bs {row['batch_size']}) {row['batched_seq_per_s']:.1f} seq/s -> {row['speedup']:.2f}x "
                  f"(target >= 4x); max |diff| {row['max_abs_logprob_diff']:.1e}", flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"benchmark": "privacy_scoring", "target_speedup": 4.0, "results": rows,
                                  "skipped": skipped, "machine": platform.platform(), "cpu_count": os.cpu_count(),
                                  "machine_figures": machine(),
                                  "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}}, indent=2))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
