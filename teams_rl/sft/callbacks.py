"""Trainer callbacks of the SFT stage."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback


class TrainLogCallback(TrainerCallback):
    """Rank 0, at every logging step: one JSON line (loss, lr, grad_norm, epoch, tokens/s, real-token fraction)
    appended to `path` and passed to `on_log(row, step)` (the stage's tracker) when given.

    It also times the training loop (after model setup and checkpoint loading) into `stats.train_seconds`.
    Tokens are the real (non-padding) tokens the collator of this rank produced; tokens/s multiplies them by the
    world size, the global rate when ranks get equal work (the stage reports the exact global sum at the end).
    """

    def __init__(self, stats, path: str | Path, on_log: Callable[[dict, int], None] | None = None):
        self.stats, self.path, self.forward = stats, Path(path), on_log
        self._begin = self._t = time.perf_counter()
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin = self._t = time.perf_counter()
        self._tokens = self.stats.real_tokens

    def on_train_end(self, args, state, control, **kwargs):
        self.stats.train_seconds = time.perf_counter() - self._begin

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), self.stats.real_tokens
        grad_norm = logs.get("grad_norm")
        row = {
            "loss": float(logs["loss"]),
            "lr": float(logs.get("learning_rate", 0.0)),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "epoch": float(logs.get("epoch", 0.0)),
            "tokens_per_s": (tokens - self._tokens) * args.world_size / max(now - self._t, 1e-9),
            "real_token_fraction": self.stats.real_token_fraction,
        }
        self._t, self._tokens = now, tokens
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": state.global_step, **row}) + "\n")
        if self.forward is not None:
            self.forward(row, state.global_step)


class NoFinalCheckpoint(TrainerCallback):
    """Skip the checkpoint the Trainer writes at the last step when checkpoints are not kept.

    That checkpoint (the model plus the optimizer's state, about three times the model's size) is written just
    before the stage saves the final model and deletes `checkpoints/`, so it would only be written and removed:
    SmolLM2-135M's took ~5 s of a ~65-s fine-tune on one CPU core. Checkpoints before the last step stay, so a
    killed run still resumes from the newest of them.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control
