"""Length-aware chunks: SmolLM2-135M rewriting 96 tiny seeds with the default short operator prompts in one
`complete` call (12 sampled new tokens: the random baseline's widest step), `backend.chunk_step_tokens: 40`
(the batch is cut where padding to its longest prompt costs more than another chunk's decode steps) vs null
(one chunk of 96, padded to the longest prompt).

Both sides are the same backend with the option switched, run `--repeats` times interleaved; the fastest run
of each counts (other processes share the CPU). Also counts identical answers (the rows of a chunk are the same
arithmetic in other company, equal up to float rounding) and the padded prompt tokens of each side. The machine's
matmul figures are recorded beside the times. Writes experiments/bench/results/length_chunks.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import machine, write_result  # noqa: E402
from experiments.bench.bench_shared_prefix import requests  # noqa: E402
from teams_rl.llm.chunks import length_chunks  # noqa: E402
from teams_rl.llm.hf_backend import HFBackend  # noqa: E402
from teams_rl.llm.prefix_cache import shared_length  # noqa: E402

ROWS, STEP_TOKENS, TARGET = 96, 40.0, 1.1


def padded_tokens(lengths: list[int], step_tokens: float | None) -> tuple[int, int]:
    """(prompt tokens prefilled after the shared prefix, padding included; chunks) for one side."""
    lengths = sorted(lengths)
    chunks = length_chunks(lengths, [12] * len(lengths), ROWS, step_tokens)
    return sum((b - a) * lengths[b - 1] for a, b in chunks), len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    reqs = requests(ROWS)
    backend = HFBackend("smollm2", dtype="float32", batch_size=ROWS, show_progress=False)
    backend.complete(reqs[:2])  # load + warm-up
    ids = [backend._prompt_ids(r) for r in reqs]
    shared = shared_length(ids)
    tails = [len(i) - shared for i in ids]
    times, texts = {"plain": [], "chunked": []}, {}
    for _ in range(args.repeats):
        for side, step in (("plain", None), ("chunked", STEP_TOKENS)):
            backend.chunk_step_tokens = step
            start = time.perf_counter()
            answers = backend.complete(reqs)
            times[side].append(round(time.perf_counter() - start, 3))
            if any(not a.ok for a in answers):
                raise SystemExit(f"generation failed: {next(a.error for a in answers if not a.ok)}")
            texts[side] = [a.text for a in answers]
    backend.close()
    best = {k: min(v) for k, v in times.items()}
    ratio = best["plain"] / best["chunked"]
    (plain_tokens, _), (cut_tokens, chunks) = padded_tokens(tails, None), padded_tokens(tails, STEP_TOKENS)
    result = {"model": backend.model_id, "rows": ROWS, "new_tokens": 12, "step_tokens": STEP_TOKENS,
              "prompt_tokens_min_max": [min(map(len, ids)), max(map(len, ids))], "shared_tokens": shared,
              "tail_tokens_real": sum(tails), "tail_tokens_padded": {"plain": plain_tokens, "chunked": cut_tokens},
              "chunks": chunks, "plain_s": best["plain"], "chunked_s": best["chunked"], "all_runs": times,
              "speedup": round(ratio, 2), "target_speedup": TARGET, "meets_target": ratio >= TARGET,
              "identical_answers": sum(a == b for a, b in zip(texts["plain"], texts["chunked"], strict=True)),
              "machine_figures": machine()}
    path = write_result("length_chunks", result)
    f = result["machine_figures"]
    print(f"machine: {f['cpu']}, {f['cores']} cores, fp32 {f['fp32_gflops']} / bf16 {f['bf16_gflops']} GFLOPS, "
          f"load {f['load_average_1m']}")
    print(f"{ROWS} rewrites, prompts {result['prompt_tokens_min_max']} tokens ({shared} shared): padded tails "
          f"{plain_tokens} -> {cut_tokens} tokens in {chunks} chunks; one chunk {best['plain']:.2f} s, length-aware "
          f"{best['chunked']:.2f} s = {ratio:.2f}x (target >= {TARGET}x); identical answers "
          f"{result['identical_answers']}/{ROWS} -> {path}")


if __name__ == "__main__":
    main()
