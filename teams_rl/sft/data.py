"""Alpaca-format SFT data: loading and validation, the Alpaca prompt template, tokenisation with the prompt
masked, and the batching modes that keep padding from wasting compute.

Batching (`finetune.batching`):
- `grouped` (default): the Trainer's length-grouped sampler puts examples of similar length in the same
  batch, which is then right-padded to its longest example. A batch is still `micro_batch_size` examples, so
  the paper's "global batch 256" keeps its meaning.
- `packed`: whole examples are packed into rows of at most `max_length` tokens (best-fit decreasing) with
  position ids restarting at every example; with no attention mask, transformers turns those position ids
  into a block-diagonal causal mask, so no token attends across examples. A batch is `micro_batch_size` rows.
- `padded`: random batches right-padded to the longest example (the original Alpaca/Llama-X trainer).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teams_rl.errors import TeamsRLError

IGNORE_INDEX = -100
BATCHING = ("grouped", "packed", "padded")
REQUIRED_COLUMNS = ("instruction", "output")

# The Stanford Alpaca / Llama-X template used by the paper's trainer (train_models/train.py).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example; the response follows it directly."""
    if input and input.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------- loading


def load_alpaca(path: str | Path, split: str = "train"):
    """An Alpaca JSON / JSONL file or a `save_to_disk` folder -> `datasets.Dataset` with instruction, input, output.

    Raises a one-line TeamsRLError naming the file (and line) for a missing path, malformed JSON, missing
    fields or no rows (the reader is `teams_rl.records`, shared with seeds and membership inference).
    """
    from datasets import Dataset

    from teams_rl.records import alpaca_rows, read_records

    rows = alpaca_rows(read_records(path, split, what="finetune dataset"), "finetune dataset", Path(path).expanduser())
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------- tokenising


def _assemble(prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int):
    target = list(response_ids) + [eos_id]
    ids = list(prompt_ids) + target
    labels = [IGNORE_INDEX] * len(prompt_ids) + target
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def encode(tokenizer, instruction: str, input: str, output: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one example: prompt then output + EOS, prompt labels = -100.

    Prompt and response are tokenised separately and concatenated, so the mask boundary is exact whatever the
    tokenizer merges; the prompt gets the tokenizer's special tokens (e.g. Llama's BOS). Both lists are cut
    to `max_length` from the right, which keeps every label aligned with its token.
    """
    prompt_ids = tokenizer(format_prompt(instruction, input))["input_ids"]
    response_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    return _assemble(prompt_ids, response_ids, tokenizer.eos_token_id, max_length)


@dataclass
class TokenizeStats:
    examples_in: int
    examples: int
    truncated: int
    dropped: int  # the prompt alone filled max_length: no response token left to learn from
    tokens: int

    def as_metrics(self) -> dict:
        return {"examples_in": self.examples_in, "examples": self.examples, "examples_truncated": self.truncated,
                "examples_dropped": self.dropped, "dataset_tokens": self.tokens}


def tokenize_dataset(dataset, tokenizer, max_length: int):
    """(tokenised Dataset with input_ids, labels, length, example_id; TokenizeStats). Kept in memory: nothing is
    written next to the source dataset (it belongs to another stage)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TeamsRLError("the target tokenizer has no EOS token; the SFT targets need one")

    def _encode(batch, indices):
        prompts = [format_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
        prompt_ids = tokenizer(prompts)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "length": [], "example_id": [], "truncated": []}
        for idx, p, r in zip(indices, prompt_ids, response_ids, strict=True):
            ids, labels, truncated = _assemble(p, r, eos, max_length)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["example_id"].append(idx)
            out["truncated"].append(truncated)
        return out

    encoded = dataset.map(_encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          keep_in_memory=True, desc="tokenising")
    keep = encoded.filter(lambda labels: any(x != IGNORE_INDEX for x in labels), input_columns="labels",
                          keep_in_memory=True, desc="dropping prompt-only examples")
    stats = TokenizeStats(examples_in=len(dataset), examples=len(keep), truncated=int(sum(keep["truncated"])),
                          dropped=len(encoded) - len(keep), tokens=int(sum(keep["length"])))
    if len(keep) == 0:
        raise TeamsRLError(f"every example's prompt is longer than max_length={max_length}: nothing to train on")
    return keep.remove_columns("truncated"), stats


# ---------------------------------------------------------------------------------------------- packing


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows whose lengths sum to at most `capacity`.
    Every index appears in exactly one row; no example is split."""
    free: list[tuple[int, int]] = []  # (remaining room, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        k = bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            insort(free, (capacity - n, len(rows) - 1))
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            insort(free, (room - n, row))
    return rows


def pack_dataset(tokenized, capacity: int):
    """Rows of packed examples: input_ids, labels, position_ids (restarting per example), example_ids, length."""
    from datasets import Dataset

    ids, labels, example_ids = tokenized["input_ids"], tokenized["labels"], tokenized["example_id"]
    out = {"input_ids": [], "labels": [], "position_ids": [], "example_ids": [], "length": []}
    for row in pack(tokenized["length"], capacity):
        r_ids, r_labels, r_pos = [], [], []
        for i in row:
            r_ids += ids[i]
            seg = list(labels[i])
            seg[0] = IGNORE_INDEX  # never predict an example's first token from the previous example
            r_labels += seg
            r_pos += range(len(ids[i]))
        out["input_ids"].append(r_ids)
        out["labels"].append(r_labels)
        out["position_ids"].append(r_pos)
        out["example_ids"].append([example_ids[i] for i in row])
        out["length"].append(len(r_ids))
    return Dataset.from_dict(out)


# ---------------------------------------------------------------------------------------------- collators


@dataclass
class BatchStats:
    """What the batches of one rank contained: examples, real and padded token counts (and over how long)."""

    batches: int = 0
    examples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    example_ids: list[int] = field(default_factory=list)
    train_seconds: float = 0.0  # the training loop's wall time, set by callbacks.TrainLogCallback

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add(self, example_ids: list[int], real: int, padded: int) -> None:
        self.batches += 1
        self.examples += len(example_ids)
        self.real_tokens += real
        self.padded_tokens += padded
        self.example_ids.extend(int(i) for i in example_ids)

    def as_dict(self) -> dict:
        return {"batches": self.batches, "examples": self.examples, "real_tokens": self.real_tokens,
                "padded_tokens": self.padded_tokens, "real_token_fraction": self.real_token_fraction,
                "train_seconds": self.train_seconds, "example_ids": self.example_ids}


def _right_pad(features: list[dict], pad_id: int):
    """(input_ids, labels) tensors [batch, longest]: ids padded with `pad_id`, labels with -100."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.as_tensor(f["input_ids"])
        labels[row, :n] = torch.as_tensor(f["labels"])
    return ids, labels


class PadCollator:
    """Right-pads a batch of examples to its longest one: input_ids with the pad id, labels with -100, and an
    attention mask. Used by `grouped` and `padded` batching."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.stats = BatchStats()

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels = _right_pad(features, self.pad_id)
        mask = torch.zeros_like(ids)
        for row, f in enumerate(features):
            mask[row, :len(f["input_ids"])] = 1
        self.stats.add([f["example_id"] for f in features], int(mask.sum()), ids.numel())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator:
    """Pads packed rows to the longest row of the batch. No attention mask: the restarting position ids tell
    the model where examples start; the padding tail gets positions 0.. as a segment of its own and -100 labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.stats = BatchStats()

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels = _right_pad(features, self.pad_id)
        width = ids.shape[1]
        pos = torch.arange(width, dtype=torch.long).repeat(len(features), 1)
        real, example_ids = 0, []
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            pos[row, :n] = torch.as_tensor(f["position_ids"])
            pos[row, n:] = torch.arange(width - n)
            real += n
            example_ids += f["example_ids"]
        self.stats.add(example_ids, real, ids.numel())
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def make_collator(batching: str, pad_id: int):
    if batching not in BATCHING:
        raise TeamsRLError(f"finetune.batching={batching!r} is not one of {', '.join(BATCHING)}")
    return PackedCollator(pad_id) if batching == "packed" else PadCollator(pad_id)
