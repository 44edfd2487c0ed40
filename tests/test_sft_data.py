"""SFT data: Alpaca template, prompt masking, truncation, loading/validation, batching efficiency, DeepSpeed
config rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.sft import data as sft_data
from teams_rl.sft import deepspeed_config as dsc
from teams_rl.sft.data import IGNORE_INDEX, encode, format_prompt, pack


@pytest.fixture(scope="module")
def tok():
    from teams_rl.models import load_tiny_tokenizer

    return load_tiny_tokenizer()


# ------------------------------------------------------------------------------------------- template, masking


def test_prompt_template_is_alpacas():
    assert format_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:")
    assert format_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
        "\n\n### Input:\n2 and 3\n\n### Response:")
    assert format_prompt("x", "   ") == format_prompt("x")  # a blank input is no input


def test_masking_without_input_hand_checked(tok):
    ids, labels, truncated = encode(tok, "Name a colour.", "", "Blue.", max_length=512)
    # 40 prompt tokens ("Below is an ... ### Response:") then "Blue." + EOS; checked by hand with the tiny tokenizer
    assert len(ids) == len(labels) == 45 and not truncated
    assert labels[:40] == [IGNORE_INDEX] * 40
    assert tok.convert_ids_to_tokens(ids[36:40]) == ["Ċ", "###", "ĠResponse", ":"]
    assert labels[40:] == ids[40:] == [37, 359, 72, 17, 0]
    assert tok.convert_ids_to_tokens(labels[40:]) == ["B", "lu", "e", ".", "<|endoftext|>"]
    assert ids == tok(format_prompt("Name a colour."))["input_ids"] + [37, 359, 72, 17, tok.eos_token_id]


def test_masking_with_input_hand_checked(tok):
    ids, labels, _ = encode(tok, "Add the numbers.", "2 and 3", "5", max_length=512)
    assert len(ids) == 59
    assert labels == [IGNORE_INDEX] * 57 + [24, 0]  # "5" and EOS are the only targets
    assert "ĠInput" in tok.convert_ids_to_tokens(ids[:57])
    assert tok.decode(ids[:57]) == format_prompt("Add the numbers.", "2 and 3")


def test_truncation_keeps_labels_aligned(tok):
    full_ids, full_labels, _ = encode(tok, "Name a colour.", "", "Blue, like the sky on a clear day.", 512)
    ids, labels, truncated = encode(tok, "Name a colour.", "", "Blue, like the sky on a clear day.", 44)
    assert truncated and len(ids) == len(labels) == 44
    assert ids == full_ids[:44] and labels == full_labels[:44]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    assert labels[:40] == [IGNORE_INDEX] * 40 and labels[40:] == ids[40:]
    assert ids[-1] != tok.eos_token_id  # the EOS was cut with the tail


def test_tokenize_dataset_counts_truncated_and_drops_prompt_only(tok):
    from datasets import Dataset

    ds = Dataset.from_list([
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky on a clear day." * 3},
        {"instruction": "word " * 60, "input": "", "output": "never seen"},  # prompt alone > 48 tokens
    ])
    tokenized, stats = sft_data.tokenize_dataset(ds, tok, max_length=48)
    assert (stats.examples_in, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert tokenized["example_id"] == [0, 1]
    assert tokenized["length"] == [45, 48]
    assert stats.tokens == 93
    assert tokenized[0]["labels"] == encode(tok, "Name a colour.", "", "Blue.", 48)[1]


# ------------------------------------------------------------------------------------------- loading


def test_load_alpaca_json_jsonl_and_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("d.json", "d.jsonl"):
        ds = sft_data.load_alpaca(tmp_path / name)
        assert ds["instruction"] == ["a", "c"] and ds["input"] == ["", ""] and ds["output"] == ["b", "d"]
    splits = DatasetDict({
        "train": Dataset.from_list([{**r, "input": r.get("input", ""), "seed_id": i} for i, r in enumerate(rows)]),
        "heldout": Dataset.from_list([{"instruction": "h", "input": "", "output": "o", "seed_id": 9}]),
    })
    splits.save_to_disk(str(tmp_path / "dataset"))
    train = sft_data.load_alpaca(tmp_path / "dataset")
    assert train.column_names == ["instruction", "input", "output"] and len(train) == 2
    assert sft_data.load_alpaca(tmp_path / "dataset", split="heldout")["output"] == ["o"]


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "response": "b"}]', "bad.json:1: missing field 'output'"),
    ('[{"output": "b"}]', "bad.json:1: missing field 'instruction'"),
    ("[]", "is empty"),
    ("", "is empty"),
    ('[{"instruction": "a", "output": "b"},', "invalid JSON"),
    ('{"instruction": "a"}\n{oops', "bad.json:2: invalid JSON"),
])
def test_load_alpaca_bad_files_fail_with_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TeamsRLError) as err:
        sft_data.load_alpaca(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_alpaca_bad_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(TeamsRLError, match="does not exist"):
        sft_data.load_alpaca(tmp_path / "missing.json")
    DatasetDict({"train": Dataset.from_list([{"prompt": "a", "completion": "b"}])}).save_to_disk(str(tmp_path / "x"))
    with pytest.raises(TeamsRLError, match=r"x\[train\] row 0: missing field 'instruction'"):
        sft_data.load_alpaca(tmp_path / "x")
    with pytest.raises(TeamsRLError, match="no split 'validation'"):
        sft_data.load_alpaca(tmp_path / "x", split="validation")
    Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(TeamsRLError, match="is empty"):
        sft_data.load_alpaca(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- batching


def alpaca_like_lengths(n: int, seed: int = 0, max_length: int = 512) -> list[int]:
    """Token lengths shaped like Alpaca with a Llama tokenizer: ~45 template tokens, a short instruction
    (median ~20) and a long-tailed response (median ~80, 3% hit the 512 cap); mean ~180."""
    rng = np.random.default_rng(seed)
    total = 45 + rng.lognormal(np.log(20), 0.5, n) + rng.lognormal(np.log(80), 0.9, n)
    return np.minimum(total.astype(int), max_length).tolist()


def fake_features(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [5] * n, "labels": [IGNORE_INDEX] * 3 + [6] * (n - 3), "example_id": i, "length": n}
            for i, n in enumerate(lengths)]


def run_batches(collator, features, batches) -> list[dict]:
    return [collator([features[i] for i in batch]) for batch in batches]


@pytest.mark.parametrize("micro, accumulation", [(4, 2), (16, 4), (64, 1)])
def test_grouped_batching_real_token_fraction_and_no_loss(micro, accumulation):
    """As the Trainer does it: the length-grouped sampler orders the examples in groups of micro x accumulation,
    the dataloader cuts micro-batches from that order; compared with random micro-batches."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = alpaca_like_lengths(8192)
    features = fake_features(lengths)
    order = list(LengthGroupedSampler(micro * accumulation, lengths=lengths,
                                      generator=torch.Generator().manual_seed(0)))
    grouped = sft_data.PadCollator(pad_id=1)
    run_batches(grouped, features, [order[i:i + micro] for i in range(0, len(order), micro)])
    padded = sft_data.PadCollator(pad_id=1)
    perm = np.random.default_rng(0).permutation(len(lengths)).tolist()
    run_batches(padded, features, [perm[i:i + micro] for i in range(0, len(perm), micro)])

    assert sorted(grouped.stats.example_ids) == list(range(len(lengths)))  # nothing lost, nothing twice
    assert grouped.stats.real_tokens == padded.stats.real_tokens == sum(lengths)
    assert grouped.stats.real_token_fraction >= 0.95
    assert padded.stats.real_token_fraction < 0.65  # the baseline spends more than a third on padding
    print(f"micro {micro} x {accumulation}: grouped {grouped.stats.real_token_fraction:.3f} "
          f"padded {padded.stats.real_token_fraction:.3f}")


def test_pad_collator_tensors():
    batch = sft_data.PadCollator(pad_id=1)(fake_features([5, 3]))
    assert batch["input_ids"].tolist() == [[5] * 5, [5, 5, 5, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100] * 3 + [6, 6], [-100] * 5]


def test_pack_places_every_example_once_within_capacity():
    lengths = alpaca_like_lengths(3000, seed=1)
    rows = pack(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (len(rows) * 512) >= 0.97  # best-fit decreasing leaves <3% of each row empty
    assert pack([], 8) == [] and pack([8, 1, 7], 8) == [[0], [2, 1]]
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack([9], 8)


def test_packed_batching_real_token_fraction_and_no_loss():
    from datasets import Dataset

    lengths = alpaca_like_lengths(4096)
    tokenized = Dataset.from_list(fake_features(lengths))
    rows = sft_data.pack_dataset(tokenized, 512)
    collator = sft_data.PackedCollator(pad_id=1)
    perm = np.random.default_rng(0).permutation(len(rows)).tolist()
    features = [rows[i] for i in range(len(rows))]
    run_batches(collator, features, [perm[i:i + 8] for i in range(0, len(perm), 8)])
    assert sorted(collator.stats.example_ids) == list(range(len(lengths)))
    assert collator.stats.real_tokens == sum(lengths)
    assert collator.stats.real_token_fraction >= 0.95


def test_packed_collator_restarts_positions_and_masks_segment_starts():
    from datasets import Dataset

    feats = fake_features([4, 3, 6])
    rows = sft_data.pack_dataset(Dataset.from_list(feats), capacity=8)
    assert rows["example_ids"] == [[2], [0, 1]]
    batch = sft_data.PackedCollator(pad_id=1)([rows[0], rows[1]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist()[1] == [-100, -100, -100, 6, -100, -100, -100]
    assert batch["input_ids"].tolist()[0] == [5] * 6 + [1]
    assert "attention_mask" not in batch  # the model derives a block-diagonal mask from the positions


def test_packed_rows_do_not_attend_across_examples(tok):
    """A packed row gives exactly the loss of its examples run one by one (so no token sees another example)."""
    import torch

    from teams_rl.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=3, attn_implementation="sdpa")
    model.config.use_cache = False
    examples = [encode(tok, "Name a colour.", "", "Blue.", 512), encode(tok, "Add the numbers.", "2 and 3", "5", 512),
                encode(tok, "Say something long.", "", "words " * 30, 512)]
    feats = [{"input_ids": i, "labels": lab, "example_id": k, "length": len(i)}
             for k, (i, lab, _) in enumerate(examples)]
    with torch.no_grad():
        total, count = 0.0, 0
        for f in feats:
            out = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
            n = sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX)
            total, count = total + out.loss.item() * n, count + n
        from datasets import Dataset

        rows = sft_data.pack_dataset(Dataset.from_list(feats), capacity=512)
        assert len(rows) == 1
        packed = model(**sft_data.PackedCollator(pad_id=1)([rows[0]])).loss.item()
    assert packed == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------------------- DeepSpeed configs


def _group(name: str):
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    return OmegaConf.load(CONF_DIR / "deepspeed" / f"{name}.yaml")


def test_deepspeed_configs_render_with_auto_values_kept():
    assert dsc.render(_group("none")) is None
    zero2, zero3, offload = (dsc.render(_group(n)) for n in ("zero2", "zero3", "zero3_offload"))
    assert [dsc.zero_stage(c) for c in (zero2, zero3, offload)] == [2, 3, 3]
    for ds in (zero2, zero3, offload):
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert "optimizer" not in zero2 and "optimizer" not in zero3  # the Trainer's AdamW: no op to compile
    assert dsc.offloads(offload) == ["optimizer", "param"] and dsc.offloads(zero3) == []
    assert offload["optimizer"]["type"] == "AdamW" and offload["fp16"]["initial_scale_power"] == 32  # the paper's
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert dsc.describe(offload) == "DeepSpeed ZeRO-3 (offload optimizer+param)"


def test_deepspeed_config_for_cpu():
    offload = dsc.render(_group("zero3_offload"))
    cpu = dsc.for_device(offload, on_cpu=True)
    assert cpu["fp16"]["enabled"] is False and cpu["bf16"]["enabled"] is False
    assert cpu["zero_optimization"]["overlap_comm"] is False
    assert cpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert offload["zero_optimization"]["offload_param"]["pin_memory"] is True  # the input is not modified
    assert dsc.for_device(offload, on_cpu=False) == offload
    assert dsc.for_device(None, on_cpu=True) is None


def test_toolchain_check(monkeypatch):
    zero2, offload = dsc.render(_group("zero2")), dsc.render(_group("zero3_offload"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(TeamsRLError) as err:
        dsc.check_toolchain(offload, on_cpu=False)
    assert "cpu_adam" in str(err.value) and "/nonexistent/c++" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TeamsRLError, match="shm_comm"):
        dsc.check_toolchain(zero2, on_cpu=True)
    dsc.check_toolchain(zero2, on_cpu=False)  # a GPU run with the Trainer's optimizer compiles nothing
    dsc.check_toolchain(None, on_cpu=True)
    monkeypatch.delenv("CXX")
    dsc.check_toolchain(offload, on_cpu=True)  # this machine has g++ and the headers
