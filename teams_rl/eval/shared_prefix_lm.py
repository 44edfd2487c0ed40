"""lm-eval's `hf` model with each loglikelihood batch's shared leading tokens scored once.

Multiple-choice tasks send every choice with its full context, and the contexts of a task often start alike:
TruthfulQA mc2's fixed six-question primer (~190 of ~210 tokens, ~7 choices per question), few-shot examples
drawn the same way for every document. lm-eval scores each request in full, so on a CPU the primer dominates
(SmolLM2-135M, 2 cores: TruthfulQA at 8 documents was 25 of the evaluate stage's ~30 s of scoring). This model
runs the columns that all rows of a batch share once at batch 1 and the rest batched on copies of their states
(`teams_rl.llm.prefix_cache.logits_with_shared_prefix`); the scores equal the plain model's up to float rounding.
Registered as lm-eval model type `teams_rl_hf` (selected by `evaluate.shared_prefix`, on by default).
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

MODEL_TYPE = "teams_rl_hf"
MIN_SHARED_TOKENS = 16  # fewer shared tokens are not worth a second forward


@register_model(MODEL_TYPE)
class SharedPrefixHFLM(HFLM):
    """HFLM whose causal forward reuses the batch's shared prefix; counts the prompt tokens it did not run."""

    prefix_tokens_saved = 0

    def _model_call(self, inps, attn_mask=None, labels=None):
        import torch

        from teams_rl.llm.prefix_cache import logits_with_shared_prefix

        if attn_mask is not None or labels is not None:  # seq2seq: lm-eval's own path
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        dtype = getattr(self, "mixed_precision_dtype", None)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
            logits, shared = logits_with_shared_prefix(self.model, inps, MIN_SHARED_TOKENS)
        if logits is None:
            return super()._model_call(inps)
        SharedPrefixHFLM.prefix_tokens_saved += shared * (inps.shape[0] - 1)
        return logits
