"""ROUGE-L near-duplicate removal (threshold 0.7) of 20,000 generated-like instructions: teams_rl's pruned
index (`teams_rl.evol.dedup.rouge_dedup`) vs the naive loop of Self-Instruct/Alpaca (rouge_score against every
kept instruction, single process).

The naive loop runs on a 2,000-instruction subset (where both outputs are compared and must be identical) and
is extrapolated to 20,000 two ways: quadratically ((20000/2000)^2 x its subset time), and by pairs (its
measured seconds per scored pair x the exact number of pairs it would score on the 20,000, which follows from
the fast run's decisions). Writes experiments/bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from teams_rl.evol.dedup import naive_rouge_dedup, rouge_dedup
from teams_rl.evol.seeds import load_seeds

RESULT = Path(__file__).resolve().parent / "results" / "dedup.json"
THRESHOLD = 0.7
ADDITIONS = [
    "in no more than {n} words", "and give {n} concrete examples", "assuming the reader is a {who}",
    "using a table with {n} rows", "and explain each step of your reasoning", "without using the letter {c}",
    "citing at least {n} historical events", "from the point of view of a {who}", "in the style of a {who}",
    "and compare it with the situation in {place}", "as a numbered list of {n} items",
    "including the trade-offs for a {who}", "in {place} during the {n}th century",
]
WHO = ["teacher", "nurse", "farmer", "software engineer", "child", "historian", "tourist", "judge", "chef", "pilot"]
PLACES = ["Japan", "Brazil", "Kenya", "Norway", "Peru", "Vietnam", "Egypt", "Canada", "India", "Chile"]
TOPICS = ["volcanoes", "tax law", "bird migration", "sourdough bread", "quantum computing", "jazz history",
          "urban gardening", "cryptography", "marathon training", "coral reefs", "solar panels", "chess openings",
          "medieval castles", "sleep science", "microfinance", "glaciers", "sign language", "bee colonies",
          "typography", "game theory", "vaccines", "river deltas", "opera", "robotics", "fermentation"]
VERBS = ["Explain", "Describe", "Summarize", "Compare", "Write a short essay about", "List the main facts about",
         "Give advice on", "Discuss the history of", "Create a quiz about", "Outline a lesson on"]


def generated_like(n: int, seed: int = 0) -> list[str]:
    """Evol-Instruct-like instructions: chains of in-depth rewrites (a seed plus added constraints) and
    in-breadth jumps to new topics, so that many are near-copies of an earlier one."""
    rng = random.Random(seed)
    seeds = [s.instruction for s in load_seeds({"kind": "tiny"})]
    out: list[str] = []

    def fill(text: str) -> str:
        return text.format(n=rng.randint(2, 12), who=rng.choice(WHO), place=rng.choice(PLACES),
                           c=rng.choice("aeiou"))

    while len(out) < n:
        if rng.random() < 0.5:
            current = rng.choice(seeds).rstrip(".?!")
        else:
            current = f"{rng.choice(VERBS)} {rng.choice(TOPICS)}"
        for _ in range(rng.randint(2, 6)):  # one chain of evolutions
            if rng.random() < 0.25:  # in-breadth: a new topic
                current = f"{rng.choice(VERBS)} {rng.choice(TOPICS)} {fill(rng.choice(ADDITIONS))}"
            else:  # in-depth: add a constraint
                current = f"{current} {fill(rng.choice(ADDITIONS))}"
            words = current.split()
            if len(words) > 60:
                current = " ".join(words[-40:])
            out.append(current + ".")
    return out[:n]


def naive_pairs_on(result, n: int) -> int:
    """The number of pairs the naive loop (stopping at the first match) scores, given the decisions."""
    kept_rank: dict[int, int] = {}
    pairs = 0
    for i in range(n):
        if result.keep[i]:
            pairs += len(kept_rank)
            kept_rank[i] = len(kept_rank)
        else:
            pairs += kept_rank[result.duplicate_of[i]] + 1
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--subset", type=int, default=2_000)
    args = parser.parse_args()

    texts = generated_like(args.n)
    subset = texts[: args.subset]

    start = time.perf_counter()
    fast_sub = rouge_dedup(subset, THRESHOLD)
    fast_sub_s = time.perf_counter() - start
    start = time.perf_counter()
    naive_sub = naive_rouge_dedup(subset, THRESHOLD)
    naive_sub_s = time.perf_counter() - start
    equal = fast_sub.keep == naive_sub.keep and fast_sub.duplicate_of == naive_sub.duplicate_of
    if not equal:
        raise SystemExit("fast and naive ROUGE-L dedup disagree on the subset")
    assert naive_pairs_on(fast_sub, len(subset)) == naive_sub.pairs_scored

    start = time.perf_counter()
    fast_full = rouge_dedup(texts, THRESHOLD)
    fast_full_s = time.perf_counter() - start

    per_pair = naive_sub_s / max(naive_sub.pairs_scored, 1)
    naive_full_pairs = naive_pairs_on(fast_full, len(texts))
    naive_full_by_pairs = per_pair * naive_full_pairs
    naive_full_quadratic = naive_sub_s * (len(texts) / len(subset)) ** 2
    result = {
        "benchmark": "rouge_l_dedup",
        "threshold": THRESHOLD,
        "n": len(texts),
        "subset": len(subset),
        "kept_subset": sum(fast_sub.keep),
        "kept_full": sum(fast_full.keep),
        "equal_output_on_subset": equal,
        "fast_subset_s": round(fast_sub_s, 3),
        "naive_subset_s": round(naive_sub_s, 3),
        "speedup_subset": round(naive_sub_s / fast_sub_s, 1),
        "fast_full_s": round(fast_full_s, 3),
        "naive_full_pairs": naive_full_pairs,
        "fast_full_pairs_scored": fast_full.pairs_scored,
        "naive_full_extrapolated_by_pairs_s": round(naive_full_by_pairs, 1),
        "naive_full_extrapolated_quadratic_s": round(naive_full_quadratic, 1),
        "speedup_full_by_pairs": round(naive_full_by_pairs / fast_full_s, 1),
        "speedup_full_quadratic": round(naive_full_quadratic / fast_full_s, 1),
        "target_speedup": 10,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"ROUGE-L dedup, threshold {THRESHOLD}")
    print(f"  subset {len(subset):,}: fast {fast_sub_s:.2f} s, naive {naive_sub_s:.1f} s "
          f"({result['speedup_subset']}x), identical output: {equal}, kept {result['kept_subset']:,}")
    print(f"  full {len(texts):,}: fast {fast_full_s:.2f} s (kept {result['kept_full']:,}); naive extrapolated "
          f"{naive_full_by_pairs:,.0f} s by pairs ({naive_full_pairs:,} pairs) / {naive_full_quadratic:,.0f} s "
          f"quadratic")
    print(f"  speedup on {len(texts):,}: {result['speedup_full_by_pairs']}x (by pairs), "
          f"{result['speedup_full_quadratic']}x (quadratic); target >= 10x")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
