"""Shared-prefix training: every example of an SFT batch starts with the same Alpaca template tokens ("Below is
an instruction that describes a task. ..."), about a third of a short example. `SharedPrefixTrainer` runs those
columns once per batch (batch 1) and the rows' tails on copies of their KV states, and applies the LM head only
where a label is predicted. Loss and gradients are those of the HF Trainer's usual forward up to float rounding
(tests/test_sft_shared_prefix.py); where the trick does not apply (a wrapped model under DDP or DeepSpeed,
gradient checkpointing, packed rows, labels inside the shared columns, too few shared columns) the Trainer's own
loss runs.
"""

from __future__ import annotations

from transformers import Trainer

IGNORE = -100
MIN_SHARED_TOKENS = 8  # below this the batch-1 pass costs about what it saves


def _causal_lm(model):
    """The `...ForCausalLM` inside `model` (itself, or a peft model's base with its adapters in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _checkpointing(lm) -> bool:
    """Whether activation checkpointing is on (it turns the prefix's KV cache off in training)."""
    flag = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(lm, flag, False))


def shared_prefix_loss(model, inputs: dict, num_items_in_batch=None, min_tokens: int = MIN_SHARED_TOKENS):
    """The causal-LM loss of `inputs` (input_ids, labels, right-padding attention_mask) computed with the shared
    columns run once, or None when the batch does not allow it. Reduction as HF's causal-LM loss: the sum over
    labelled tokens divided by `num_items_in_batch` when given (the Trainer's count over the accumulated
    batch), else the mean."""
    import torch
    import torch.nn.functional as F

    from teams_rl.llm.prefix_cache import prefix_then_tails, shared_columns

    if set(inputs) - {"input_ids", "labels", "attention_mask"}:  # e.g. packed rows' position_ids
        return None
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    if ids.shape[0] < 2:
        return None
    shared = shared_columns(ids)
    # position j's label is predicted at j - 1: the shared columns (and the first tail column's label, which
    # the prefix's last position predicts) must be unlabelled, and padding only on the right
    if shared < min_tokens or bool((labels[:, : shared + 1] != IGNORE).any()):
        return None
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any() or not mask[:, :shared].all()):
        return None
    lm = _causal_lm(model)
    _, tails = prefix_then_tails(lm.get_decoder(), ids, shared)
    targets = labels[:, shared + 1:]
    keep = targets != IGNORE
    logits = lm.get_output_embeddings()(tails.last_hidden_state[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is None:
        return loss / keep.sum().clamp(min=1)
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)


class SharedPrefixTrainer(Trainer):
    """The HF Trainer with `shared_prefix_loss` where it applies; `prefix_batches` counts those batches."""

    prefix_batches = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        usable = (not return_outputs and model is self.accelerator.unwrap_model(model)
                  and not _checkpointing(_causal_lm(model)) and self.args.world_size == 1
                  and self.model_accepts_loss_kwargs and self.label_smoother is None
                  and self.compute_loss_func is None)
        loss = None
        if usable:
            with self.accelerator.autocast():  # the mixed precision the Trainer's own forward runs under
                loss = shared_prefix_loss(model, inputs, num_items_in_batch)
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        self.prefix_batches += 1
        return loss
