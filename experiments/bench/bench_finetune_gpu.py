"""bf16 fine-tuning throughput and model FLOPs utilisation (MFU) on one GPU, through the finetune stage's own
training code (`teams_rl.sft.train.train`: HF Trainer, with `deepspeed=none` and `deepspeed=zero2`).

Model: a Llama-shaped random-init model of ~1.1B parameters (the TinyLlama-1.1B shape: hidden 2048, 22 layers,
32 heads, 4 KV heads, MLP 5632, vocab 32000), trained in bf16 mixed precision on full rows of `--seq-len`
random tokens (no padding, so every token is real and attention takes the fused causal kernel).

    MFU = 6 x parameters x tokens/s / peak

where peak is the bf16 dense matmul throughput measured in the same run (8192^3 GEMMs, the best of several
timed rounds). tokens/s is the median over the logging intervals after the first `--warmup-steps` steps.
Target: MFU >= 0.40. Without CUDA the script says so and exits 0 (nothing is written); `--cpu-smoke` runs the
same code on a tiny model on the CPU in fp32 to check it. Writes experiments/bench/results/finetune_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT = Path(__file__).resolve().parent / "results" / "finetune_gpu.json"
TARGET_MFU = 0.40
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=1024)


def build_model(folder: Path, shape: dict, max_positions: int) -> int:
    """Save a random Llama of `shape` (+ the committed tiny tokenizer, only for its special tokens) into
    `folder`; return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from teams_rl.models import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    config = LlamaConfig(**shape, max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_rows(out: Path, rows: int, seq_len: int, vocab: int) -> None:
    """The stage's `data/` folder: `rows` full-length sequences of random tokens, every token a target."""
    import numpy as np
    from datasets import Dataset

    ids = np.random.default_rng(0).integers(0, vocab, size=(rows, seq_len)).tolist()
    Dataset.from_dict({"input_ids": ids, "labels": ids, "length": [seq_len] * rows,
                       "example_id": list(range(rows))}).save_to_disk(str(out / "data"))


def run_one(name: str, ds_file: str, work: Path, model_dir: Path, args, on_cpu: bool) -> dict:
    import torch
    from omegaconf import OmegaConf

    from teams_rl.sft import deepspeed_config as dsc
    from teams_rl.sft.train import TrainJob, train

    out = work / name
    out.mkdir()
    write_rows(out, args.micro_batch * args.steps, args.seq_len, args.vocab)
    ds = dsc.for_device(dsc.render(OmegaConf.load(REPO / "conf" / "deepspeed" / f"{ds_file}.yaml")), on_cpu)
    target = {"max_length": args.seq_len, "epochs": 1, "learning_rate": 1e-5, "global_batch_size": args.micro_batch,
              "micro_batch_size": args.micro_batch, "warmup_steps": 0, "lr_scheduler": "constant",
              "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False,
              "precision": "fp32" if on_cpu else "bf16", "attn_implementation": "sdpa"}
    job = TrainJob(out_dir=str(out), model=str(model_dir), target=target, batching="padded", max_steps=args.steps,
                   seed=0, save_steps=10**9, save_total_limit=1, logging_steps=args.log_every, progress=False,
                   deepspeed=ds)
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    metrics = train(job)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in rows if r["step"] > args.warmup_steps] or [rows[-1]["tokens_per_s"]]
    result = {"deepspeed": ds_file, "tokens_per_s": statistics.median(steady),
              "tokens_per_s_intervals": [round(t, 1) for t in steady], "final_loss": metrics["final_loss"],
              "steps": metrics["steps"], "precision": metrics["precision"]}
    if not on_cpu:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (the paper's max length: 512)")
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per step (16 x 512 = 8k tokens)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, on the CPU: checks the script")
    args = parser.parse_args()

    import torch

    on_cpu = args.cpu_smoke
    if not on_cpu and not torch.cuda.is_available():
        print("bench_finetune_gpu: skipped, no CUDA device here (it needs one H100/H200-class GPU; "
              "`--cpu-smoke` checks the script on a CPU). Nothing written.")
        return 0
    shape = TINY if on_cpu else LLAMA_1B
    if on_cpu:
        args.matmul_size, args.steps, args.warmup_steps, args.log_every = 1024, 8, 2, 2
        args.seq_len, args.micro_batch = min(args.seq_len, 128), min(args.micro_batch, 4)
    args.vocab = shape["vocab_size"]
    device = "cpu" if on_cpu else "cuda"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    from teams_rl.fast_dtype import matmul_flops

    peak = matmul_flops(device, "float32" if on_cpu else "bfloat16", args.matmul_size, iters=20)
    with tempfile.TemporaryDirectory(prefix="bench_finetune_gpu_") as tmp:
        work = Path(tmp)
        params = build_model(work / "model", shape, max(args.seq_len, 2048))
        runs = {name: run_one(name, name, work, work / "model", args, on_cpu) for name in ("none", "zero2")}
    for r in runs.values():
        r["mfu"] = round(6 * params * r["tokens_per_s"] / peak, 4)
    result = {
        "benchmark": "finetune_gpu_mfu",
        "device": "cpu (smoke)" if on_cpu else torch.cuda.get_device_name(0),
        "model": f"random Llama, {params / 1e9:.3f}B parameters, {json.dumps(shape)}",
        "parameters": params, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "peak_matmul_tflops": round(peak / 1e12, 2), "peak_dtype": str(dtype).replace("torch.", ""),
        "runs": runs, "zero2_vs_none_tokens_per_s": round(runs["zero2"]["tokens_per_s"] / runs["none"]["tokens_per_s"], 3),
        "target_mfu": TARGET_MFU, "python": platform.python_version(), "torch": torch.__version__,
    }
    print(f"fine-tuning throughput, {result['device']}, {result['model']}")
    print(f"  measured matmul peak ({result['peak_dtype']}, {args.matmul_size}^3): {result['peak_matmul_tflops']} TFLOP/s")
    for name, r in runs.items():
        print(f"  deepspeed={name:6s} {r['tokens_per_s']:10.0f} tokens/s  MFU {r['mfu']:.3f} "
              f"(target {TARGET_MFU})" + (f"  peak memory {r['max_memory_gib']} GiB" if "max_memory_gib" in r else ""))
    print(f"  zero2 / none tokens/s: {result['zero2_vs_none_tokens_per_s']}")
    if on_cpu:
        print("cpu smoke run: nothing written")
        return 0
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
