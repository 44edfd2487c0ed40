"""Shared-prefix SFT (teams_rl/sft/shared_prefix.py): the same loss and gradients as the HF forward, the cases
where it must step aside, and a Trainer run that uses it and ends at the same weights."""

from __future__ import annotations

import pytest

from teams_rl.sft import data as sft_data
from teams_rl.sft.data import encode
from teams_rl.sft.shared_prefix import shared_prefix_loss

EXAMPLES = [("Name a colour.", "", "Blue."), ("Add the numbers.", "2 and 3", "5"),
            ("Say something long about the sea.", "", "words " * 12), ("List two fruits.", "", "Apple, pear.")]


@pytest.fixture(scope="module")
def tok():
    from teams_rl.models import load_tiny_tokenizer

    return load_tiny_tokenizer()


def _batch(tok, examples):
    feats = [{"input_ids": i, "labels": lab, "example_id": k, "length": len(i)}
             for k, (i, lab, _) in enumerate(encode(tok, *e, max_length=512) for e in examples)]
    return sft_data.PadCollator(pad_id=tok.pad_token_id)(feats)


def _model(seed=3):
    from teams_rl.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=seed, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_the_plain_forward(tok, num_items):
    import torch

    examples = [e for e in EXAMPLES if not e[1]]  # one template: the rows share its ~25 tokens
    batch = _batch(tok, examples)
    model = _model()
    plain = model(**batch, num_items_in_batch=num_items).loss
    plain.backward()
    expected = _grads(model)
    model.zero_grad()
    loss = shared_prefix_loss(model, dict(batch), num_items_in_batch=num_items)
    assert loss is not None
    loss.backward()
    got = _grads(model)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_mixed_templates_still_share_the_common_start(tok):
    batch = _batch(tok, EXAMPLES)  # with and without an input: the first sentence differs after "...a task"
    model = _model()
    with torch_no_grad():
        plain = model(**batch).loss.item()
        shared = shared_prefix_loss(model, dict(batch))
    assert shared is not None and shared.item() == pytest.approx(plain, rel=1e-5)


def test_steps_aside_where_it_does_not_apply(tok):
    import torch

    model = _model()
    batch = _batch(tok, [e for e in EXAMPLES if not e[1]])
    assert shared_prefix_loss(model, {**batch, "position_ids": torch.zeros_like(batch["input_ids"])}) is None
    one = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix_loss(model, one) is None  # nothing to share
    labelled = {**batch, "labels": batch["input_ids"].clone()}  # a label inside the shared columns
    assert shared_prefix_loss(model, labelled) is None
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}  # left padding
    assert shared_prefix_loss(model, left) is None
    assert shared_prefix_loss(model, dict(batch), min_tokens=10_000) is None


def test_trainer_uses_it_and_reaches_the_same_weights(tok, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from teams_rl.sft.shared_prefix import SharedPrefixTrainer

    feats = [{"input_ids": i, "labels": lab, "example_id": k, "length": len(i)}
             for k, (i, lab, _) in enumerate(encode(tok, *e, max_length=512) for e in EXAMPLES * 2)]
    weights = {}
    for cls in (Trainer, SharedPrefixTrainer):
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, use_cpu=True,
                                 report_to=[], save_strategy="no", remove_unused_columns=False, seed=0,
                                 disable_tqdm=True, train_sampling_strategy="group_by_length",
                                 length_column_name="length")
        model = _model()
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(feats),
                      data_collator=sft_data.PadCollator(pad_id=tok.pad_token_id))
        trainer.train()
        weights[cls] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if cls is SharedPrefixTrainer:
            assert trainer.prefix_batches == 4  # 2 steps x 2 micro-batches, every one shared
    # Adam turns rounding-level gradient differences into visible ones on near-zero gradients, so compare
    # the whole update: the two runs' weights differ by a tiny fraction of how far training moved them
    start = _model().state_dict()
    moved = sum(float((w - start[n]).norm() ** 2) for n, w in weights[Trainer].items()) ** 0.5
    apart = sum(float((weights[SharedPrefixTrainer][n] - w).norm() ** 2) for n, w in weights[Trainer].items()) ** 0.5
    assert moved > 0.1  # the runs trained
    assert apart < 1e-3 * moved


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_bf16_autocast_reaches_the_shared_prefix_forward(tok, tmp_path):
    """With bf16 mixed precision the shared-prefix loss runs under the Trainer's autocast, as its own forward."""
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from teams_rl.sft.shared_prefix import SharedPrefixTrainer

    feats = [{"input_ids": i, "labels": lab, "example_id": k, "length": len(i)}
             for k, (i, lab, _) in enumerate(encode(tok, *e, max_length=512) for e in EXAMPLES * 2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=1e-2, use_cpu=True, bf16=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    model = _model()
    seen = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = SharedPrefixTrainer(model=model, args=args, train_dataset=Dataset.from_list(feats),
                                  data_collator=sft_data.PadCollator(pad_id=tok.pad_token_id))
    trainer.train()
    assert trainer.prefix_batches == 1 and seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


@pytest.mark.parametrize(("measured", "precision", "deepspeed", "expected"), [
    ("bfloat16", "bf16", None, "bf16"), ("float32", "bf16", None, "fp32"), ("bfloat16", "fp16", None, "fp32"),
    ("bfloat16", "bf16", {"zero_optimization": {"stage": 2}}, "fp32"), ("bfloat16", "fp32", None, "fp32")])
def test_a_cpu_trains_in_bf16_only_where_measured_faster(monkeypatch, measured, precision, deepspeed, expected):
    from teams_rl import fast_dtype
    from teams_rl.sft.train import TrainJob, cpu_precision

    asked = []
    monkeypatch.setattr(fast_dtype, "cpu_choice", lambda cache_dir=None: asked.append(cache_dir) or {"dtype": measured})
    job = TrainJob(out_dir="unused", model="m", target={}, deepspeed=deepspeed, cache_dir="/the/paths.cache")
    assert cpu_precision(precision, job) == expected
    assert set(asked) <= {"/the/paths.cache"}  # the measurement the stage fingerprints read (paths.cache)
