"""Prompt-prefix reuse for the local backend: the KV states of a prefix that many requests share (an operator
template, a chat system prompt) are computed once and reused, so a request prefills only its own tail.

The operator prompts are ~200-280 tokens of fixed template followed by a 10-60 token instruction; on a CPU the
prefill of the template dominates a rewrite (SmolLM2-135M: ~0.6 s of prefill vs ~0.06 s for the tail). A prefix
is found as the longest common token prefix of a request with the other requests of its batch or with recently
seen prompts (at least `min_tokens` long), and kept in a small LRU. Each row then prefills its tail alone
(batch 1, on a copy of the prefix states), the rows are left-padded into one batched cache, and `generate`
decodes them together from their last prompt token. Greedy outputs equal the plain batched prefill's
(tested); sampled ones are as reproducible as before (the same calls give the same text).

`shared_batch` is the cheap special case that needs no LRU: the tokens every row of one batch starts with (a
chat template's system prompt and the start of a short operator template) are prefilled once at batch 1 and
the rows' tails together, batched, in `generate`'s own first forward.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """An LRU of prefix token tuples -> per-layer (keys, values) at batch 1."""

    def __init__(self, max_entries: int = 16, min_tokens: int = 32, recent: int = 64):
        self.max_entries = int(max_entries)
        self.min_tokens = int(min_tokens)
        self._entries: OrderedDict[tuple[int, ...], list[tuple]] = OrderedDict()
        self._recent: deque[list[int]] = deque(maxlen=recent)
        self.hits = 0
        self.built = 0
        self.prefill_tokens_saved = 0

    def clear(self) -> None:
        self._entries.clear()
        self._recent.clear()

    def _longest_entry(self, ids: list[int]) -> tuple[int, ...] | None:
        best = None
        for key in self._entries:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and tuple(ids[:len(key)]) == key:
                best = key
        return best

    def prefix_for(self, ids: list[int], others: list[list[int]]) -> int:
        """How many leading tokens of `ids` to take from the cache (0: none), adding an entry when a prefix at
        least `min_tokens` long is shared with another request of the batch or a recent prompt."""
        key = self._longest_entry(ids)
        shared = max((common_prefix(ids, o) for o in [*others, *self._recent] if o is not ids), default=0)
        shared = min(shared, len(ids) - 1)  # the last prompt token always goes through `generate`
        if key is not None and shared - len(key) < self.min_tokens:  # a few more shared tokens are not worth an entry
            self._entries.move_to_end(key)
            return len(key)
        return shared if shared >= self.min_tokens else (len(key) if key is not None else 0)

    def get(self, ids: list[int], length: int, build) -> list[tuple]:
        """The states of `ids[:length]`: cached, or `build(tokens)` (then cached)."""
        key = tuple(ids[:length])
        if key in self._entries:
            self.hits += 1
            self.prefill_tokens_saved += length
            self._entries.move_to_end(key)
            return self._entries[key]
        base = self._longest_entry(list(key))  # extend the longest cached prefix instead of starting over
        states = build(list(key), None if base is None else self._entries[base], 0 if base is None else len(base))
        self.built += 1
        self._entries[key] = states
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return states

    def remember(self, ids: list[int]) -> None:
        self._recent.append(ids)


def shared_length(rows_ids: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one token of its own."""
    first = rows_ids[0]
    shared = min(common_prefix(first, ids) for ids in rows_ids[1:]) if len(rows_ids) > 1 else 0
    return min(shared, min(len(ids) for ids in rows_ids) - 1)


def shared_batch(model, rows_ids: list[list[int]], length: int, pad_id: int = 0):
    """(input_ids, attention_mask, DynamicCache) for `generate`: the first `length` tokens (shared by every
    row) prefilled once and in the cache for all rows; each row's tail follows after left padding between the
    prefix and the tail (masked; positions come from the mask, so a tail sits right after the prefix)."""
    import torch
    from transformers import DynamicCache

    device, n = model.device, len(rows_ids)
    prefix = torch.tensor([rows_ids[0][:length]], device=device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
    layers = [(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous())
              for layer in cache.layers]
    width = max(len(ids) for ids in rows_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    input_ids[:, :length] = prefix
    mask[:, :length] = 1
    for r, ids in enumerate(rows_ids):
        tail = len(ids) - length
        input_ids[r, width - tail:] = torch.tensor(ids[length:], device=device)
        mask[r, width - tail:] = 1
    return input_ids, mask, DynamicCache(ddp_cache_data=layers, config=model.config)


def batched_cache(model, rows_ids: list[list[int]], prefix: PrefixCache, pad_id: int = 0):
    """(input_ids, attention_mask, DynamicCache) for `generate`: every row left-padded to the longest, its
    states for all but its last prompt token in the cache (prefix from `prefix`, tail prefilled alone)."""
    import torch
    from transformers import DynamicCache

    device = model.device

    def forward(tokens: list[int], past, start: int):
        cache = past if past is not None else DynamicCache(config=model.config)
        if tokens:
            model(input_ids=torch.tensor([tokens], device=device), past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(start, start + len(tokens), device=device)[None], logits_to_keep=1)
        return cache

    def build(tokens: list[int], base: list[tuple] | None, start: int) -> list[tuple]:
        past = None if base is None else DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in base],
                                                      config=model.config)
        return [(layer.keys, layer.values) for layer in forward(tokens[start:], past, start).layers]

    states = []
    for ids in rows_ids:
        length = prefix.prefix_for(ids, rows_ids)
        past = None
        if length:
            cached = prefix.get(ids, length, build)
            past = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in cached], config=model.config)
        row = forward(ids[length:-1], past, length)
        states.append([(layer.keys, layer.values) for layer in row.layers] if row.layers and row.get_seq_length()
                      else None)
        prefix.remember(ids)
    width = max(len(ids) for ids in rows_ids)
    input_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long, device=device)
    for r, ids in enumerate(rows_ids):
        input_ids[r, width - len(ids):] = torch.tensor(ids, device=device)
        mask[r, width - len(ids):] = 1
    template = next(s for s in states if s is not None)
    layers = []
    for li, (k0, _) in enumerate(template):
        keys = torch.zeros((len(rows_ids), k0.shape[1], width - 1, k0.shape[3]), dtype=k0.dtype, device=device)
        values = torch.zeros_like(keys)
        for r, row in enumerate(states):
            if row is None:
                continue
            k, v = row[li]
            keys[r, :, width - 1 - k.shape[2]:] = k[0]
            values[r, :, width - 1 - v.shape[2]:] = v[0]
        layers.append((keys, values))
    return input_ids, mask, DynamicCache(ddp_cache_data=layers, config=model.config)


def shared_columns(input_ids) -> int:
    """How many leading columns every row of `input_ids` `[batch, seq]` holds the same tokens in (at most seq - 1,
    so a tail is left to run)."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def prefix_then_tails(module, input_ids, shared: int, head_kwargs: dict | None = None,
                      tail_kwargs: dict | None = None):
    """(output on row 0's first `shared` columns, output on every row's tail): `module` (a causal LM or its
    decoder) runs the shared columns once at batch 1, then the tails batched on copies of those KV states.
    Causal attention makes this the same arithmetic as one batched forward (up to float rounding) for
    right-padded rows; gradients flow through the copies back to the one prefix pass. `head_kwargs` and
    `tail_kwargs` go to the two calls (e.g. `logits_to_keep`)."""
    from transformers import DynamicCache

    n = input_ids.shape[0]
    cache = DynamicCache(config=module.config)
    head = module(input_ids=input_ids[:1, :shared], past_key_values=cache, use_cache=True, **(head_kwargs or {}))
    layers = [(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous())
              for layer in cache.layers]
    tails = module(input_ids=input_ids[:, shared:], past_key_values=DynamicCache(ddp_cache_data=layers,
                                                                                  config=module.config),
                   use_cache=False, **(tail_kwargs or {}))
    return head, tails


def logits_with_shared_prefix(model, input_ids, min_tokens: int):
    """(logits `[batch, seq, vocab]`, shared columns) of a right-padded batch (lm-eval's loglikelihood batches)
    with the leading columns that every row shares (a task's fixed primer or few-shot examples) run once at
    batch 1; (None, 0) when fewer than `min_tokens` are shared, or the batch has one row. The logits equal one
    batched forward's up to float rounding (tested)."""
    import torch

    n = input_ids.shape[0]
    if n < 2:
        return None, 0
    shared = shared_columns(input_ids)
    if shared < min_tokens:
        return None, 0
    head, tails = prefix_then_tails(model, input_ids, shared)
    return torch.cat([head.logits.expand(n, -1, -1), tails.logits], dim=1), shared
