"""How the local backend splits a batch of requests into `generate` calls.

A batched `generate` left-pads every prompt to the longest of its chunk, and on a CPU each padded prompt token
costs as much compute as a real one: one 136-token prompt among ninety-five ~80-token ones makes the whole
chunk prefill 136 tokens per row (measured on SmolLM2-135M, 2 cores: 38 s for that chunk against 16 s for
eighty 88-token rows). A separate chunk is not free either: every decode step of a chunk pays a fixed cost
(kernel launches, Python, reading the weights) whatever its number of rows. `length_chunks` weighs the two:
it cuts the requests, sorted by (max_tokens, prompt length), into the contiguous chunks of at most
`batch_size` rows that minimise padded prompt tokens + `step_tokens` x decode steps, where `step_tokens` is
what one decode step costs in prompt tokens of prefill on the machine at hand.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_chunks(lengths: Sequence[int], max_new: Sequence[int], batch_size: int,
                  step_tokens: float | None) -> list[tuple[int, int]]:
    """`[start, end)` ranges over the rows (already sorted by (max_new, length)) of at most `batch_size` rows.

    With `step_tokens` None every chunk but the last has `batch_size` rows (plain batching); otherwise the
    ranges minimise sum over chunks of rows x longest prompt + step_tokens x most new tokens (dynamic
    programming over the cut points; the shared prefix that every row skips is the same in every split, so it
    does not change which split is best)."""
    n = len(lengths)
    if step_tokens is None or n <= 1:
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest split of rows[:j]
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = steps = 0
        for start in range(end - 1, max(end - batch_size, 0) - 1, -1):
            longest, steps = max(longest, lengths[start]), max(steps, max_new[start])
            cost = best[start] + (end - start) * longest + step_tokens * steps
            if cost < best[end]:
                best[end], cut[end] = cost, start
    ranges, end = [], n
    while end > 0:
        ranges.append((cut[end], end))
        end = cut[end]
    return ranges[::-1]
