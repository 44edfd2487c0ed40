"""Padding waste in SFT: one epoch of the same Alpaca-like data on the same model with three batchings:

- `padded`  random batches right-padded to their longest example (the original Alpaca / Llama-X trainer): the baseline
- `grouped` length-grouped batches (the stage's default)
- `packed`  several whole examples per row, position ids restarting per example

It runs the real stage (`run_pipeline`, stages=[finetune], in this process, CPU, fp32) on a 2-layer random Llama
(hidden 256) over the committed tiny tokenizer, with example lengths shaped like Alpaca under a Llama tokenizer
(~45 template tokens, instruction median ~20, long-tailed response median ~80, capped at 512). Reports the real
(non-padding) token fraction and real tokens/s of each, and the tokens/s ratio against `padded` measured in the
same run (target >= 1.8x). Writes experiments/bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULT = Path(__file__).resolve().parent / "results" / "packing.json"
MODES = ("padded", "grouped", "packed")
TARGET_RATIO = 1.8


def single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that are one lowercase word with a leading space: each costs exactly one token."""
    words = [t[1:] for t in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,}", t)]
    return sorted(words)


def alpaca_like(n: int, tokenizer, seed: int = 0) -> list[dict]:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    words = single_token_words(tokenizer)
    instr = np.maximum(nrng.lognormal(np.log(20), 0.5, n).astype(int), 2)
    resp = np.maximum(nrng.lognormal(np.log(80), 0.9, n).astype(int), 1)
    rows = []
    for i in range(n):
        text = lambda k: " ".join(rng.choice(words) for _ in range(int(k)))  # noqa: E731
        given = text(rng.randint(3, 15)) if rng.random() < 0.4 else ""
        rows.append({"instruction": text(instr[i]), "input": given, "output": text(resp[i])})
    return rows


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from teams_rl.models import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_mode(mode: str, data: Path, model: Path, work: Path, micro: int) -> dict:
    from hydra import compose, initialize_config_dir

    from teams_rl.pipeline import run_pipeline

    overrides = ["logger=none", f"paths.artifacts={work / 'artifacts'}", "stages=[finetune]",
                 f"finetune.dataset={data}", "target=tiny_llama", f"target.model={model}", "target.max_length=512",
                 "target.epochs=1", f"target.micro_batch_size={micro}", f"target.global_batch_size={micro}",
                 "target.learning_rate=1e-4", f"finetune.batching={mode}", "finetune.progress=false",
                 "finetune.save_steps=1000000", "finetune.logging_steps=1000000"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    m = run_pipeline(cfg, work / f"run-{mode}")["finetune"]
    return {k: m[k] for k in ("tokens_per_s", "real_token_fraction", "tokens", "train_seconds", "steps", "rows",
                              "examples", "final_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable on a shared machine; the three modes get the same)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from teams_rl.models import load_tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
        work = Path(tmp)
        data = work / "alpaca_like.json"
        data.write_text(json.dumps(alpaca_like(args.examples, load_tiny_tokenizer())))
        model = build_model(work / "model", args.hidden, args.layers)
        results = {mode: run_mode(mode, data, model, work, args.micro_batch) for mode in MODES}

    base = results["padded"]["tokens_per_s"]
    for r in results.values():
        r["speedup_vs_padded"] = round(r["tokens_per_s"] / base, 3)
    out = {"benchmark": "sft_batching", "examples": args.examples, "micro_batch": args.micro_batch,
           "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab 1024",
           "device": f"cpu fp32, {args.threads} thread(s)",
           "max_length": 512, "modes": results, "target_speedup": TARGET_RATIO,
           "python": platform.python_version(), "machine": platform.machine()}
    print(f"SFT batching, {args.examples} Alpaca-like examples, micro-batch {args.micro_batch}, one epoch, CPU")
    for mode, r in results.items():
        print(f"  {mode:8s} real-token fraction {r['real_token_fraction']:.3f}  {r['tokens_per_s']:8.0f} tokens/s  "
              f"{r['train_seconds']:6.1f} s  {r['steps']} steps  x{r['speedup_vs_padded']:.2f} vs padded")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
