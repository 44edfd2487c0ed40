"""Shared-prefix SFT: the HF Trainer vs `SharedPrefixTrainer` fine-tuning SmolLM2-135M (fp32) on demo-sized Alpaca
examples (a tiny seed and a ~30-token response each, 8 per step: the embedded default's finetune workload).

`SharedPrefixTrainer` runs the Alpaca template tokens the 8 rows share once and the LM head only on labelled
positions (teams_rl/sft/shared_prefix.py). Each side trains a fresh copy of the model for `--steps` optimizer
steps, `--repeats` times interleaved; the fastest run of each counts (other processes share the CPU). Also
records both sides' losses (the same up to float rounding). The machine's matmul figures are recorded beside the
times. Writes experiments/bench/results/sft_shared_prefix.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench._common import machine, write_result  # noqa: E402

TARGET = 1.2
RESPONSE = ("Here is a clear answer in a few short steps, with one example and a brief summary of the main point at "
            "the end.")


def examples(tok, n: int) -> list[dict]:
    from teams_rl.evol.seeds import load_seeds
    from teams_rl.sft.data import encode

    seeds = load_seeds({"kind": "tiny"})[:n]
    out = []
    for k, seed in enumerate(seeds):
        ids, labels, _ = encode(tok, seed.instruction, seed.input, RESPONSE, max_length=256)
        out.append({"input_ids": ids, "labels": labels, "example_id": k, "length": len(ids)})
    return out


def run_once(trainer_class, feats, steps: int, out_dir: str) -> tuple[float, list[float]]:
    from datasets import Dataset
    from transformers import TrainingArguments

    from teams_rl.models import load_causal_lm
    from teams_rl.sft.data import PadCollator

    model, tok = load_causal_lm("smollm2", dtype="float32")
    model.config.use_cache = False
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4,
                             use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False, seed=0,
                             disable_tqdm=True, logging_steps=1, train_sampling_strategy="group_by_length",
                             length_column_name="length")
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(feats),
                            data_collator=PadCollator(tok.pad_token_id))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from transformers import Trainer

    from teams_rl.models import load_causal_lm
    from teams_rl.sft.shared_prefix import SharedPrefixTrainer

    _, tok = load_causal_lm("smollm2", dtype="float32")
    feats = examples(tok, 8 * args.steps)
    times, losses = {"plain": [], "shared": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, cls in (("plain", Trainer), ("shared", SharedPrefixTrainer)):
                seconds, losses[name] = run_once(cls, feats, args.steps, tmp)
                times[name].append(round(seconds, 2))
    best = {k: min(v) for k, v in times.items()}
    ratio = best["plain"] / best["shared"]
    from teams_rl.llm.prefix_cache import shared_columns
    from teams_rl.sft.data import PadCollator

    batch = PadCollator(tok.pad_token_id)(feats[:8])
    result = {"model": "smollm2 (fp32)", "examples_per_step": 8, "steps": args.steps,
              "tokens_per_example": round(sum(f["length"] for f in feats) / len(feats), 1),
              "shared_columns_first_step": shared_columns(batch["input_ids"]), "plain_s": best["plain"], "shared_s": best["shared"],
              "all_runs": times, "speedup": round(ratio, 2), "target_speedup": TARGET, "meets_target": ratio >= TARGET,
              "losses": losses,
              "max_loss_difference": max(abs(a - b) for a, b in zip(losses["plain"], losses["shared"], strict=True)),
              "machine_figures": machine()}
    write_result("sft_shared_prefix", result)
    print(f"SFT {args.steps} steps of 8: Trainer {best['plain']} s, SharedPrefixTrainer {best['shared']} s = "
          f"{ratio:.2f}x (target {TARGET}x); losses differ by at most {result['max_loss_difference']:.2e}; "
          f"fp32 {result['machine_figures']['fp32_gflops']} GFLOPS")


if __name__ == "__main__":
    main()
