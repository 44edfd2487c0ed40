"""One SFT job: the prepared data, the target model and the HF Trainer (with DeepSpeed when configured).

The same `train(job)` runs in the pipeline's process (one device) or in every rank of a job started by
`teams_rl.sft.launch` (each rank runs `python -m teams_rl.sft.train JOB.yaml`, `main` below). Everything it
needs is in a `TrainJob` (saved as `job.yaml` in the artifact folder);
its outputs go to the artifact folder:

    data/                  the tokenised (or packed) training set, written by the stage before training
    checkpoints/           HF Trainer checkpoints (removed at the end unless finetune.keep_checkpoints)
    model/                 the final model + tokenizer (save_pretrained), written by rank 0 only
    trainer_state.json     the Trainer's state (log history), rank 0
    train_metrics.json     the run's metrics, rank 0
    train_log.jsonl        one line per logging step: loss, lr, grad_norm, tokens/s, real-token fraction, rank 0
    ranks/rank<r>.json     what each rank trained on: examples (ids), real and padded tokens
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from teams_rl.errors import TeamsRLError
from teams_rl.ports import free_port

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class TrainJob:
    """Everything one training run needs; plain data so that it round-trips through YAML to launched ranks."""

    out_dir: str
    model: str                      # a path or hub id `from_pretrained` accepts (built-ins already resolved)
    target: dict                    # cfg.target: hyper-parameters
    batching: str = "grouped"
    max_steps: int | None = None
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int = 2
    keep_checkpoints: bool = False
    logging_steps: int = 2
    progress: bool = True
    deepspeed: dict | None = None   # rendered and adjusted to the device (see deepspeed_config.for_device)
    world_size: int = 1             # processes the launch asks for (a DeepSpeed checkpoint resumes only on as many)
    lora: dict | None = None        # LoraSettings as a dict (teams_rl.sft.lora); None = full fine-tuning
    shared_prefix: bool = True      # run the template tokens a batch shares once (teams_rl.sft.shared_prefix)
    cache_dir: str | None = None    # paths.cache: where this machine's measured fast dtype is kept (teams_rl.fast_dtype)

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        import yaml

        return cls(**yaml.safe_load(Path(path).read_text()))


def accumulation_steps(global_batch: int, micro_batch: int, devices: int) -> int:
    """Gradient accumulation that makes `devices x micro_batch x accumulation` equal the global batch."""
    per_step = micro_batch * devices
    if global_batch % per_step:
        raise TeamsRLError(f"target.global_batch_size={global_batch} is not a multiple of micro_batch_size x devices "
                           f"= {micro_batch} x {devices}; change one of them")
    return global_batch // per_step


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint (the Trainer writes trainer_state.json last) in `folder`, if any."""
    done = [d for d in Path(folder).glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return str(max(done, key=lambda d: int(d.name.rsplit("-", 1)[1]))) if done else None


@contextmanager
def process_env(job: TrainJob, on_cpu: bool) -> Iterator[None]:
    """The environment of one run, restored afterwards: `TrainingArguments` and DeepSpeed leave process-wide
    state behind (ACCELERATE_USE_DEEPSPEED, accelerate's singletons, transformers' ZeRO-3 flag), which would
    turn a later plain run in the same process into a DeepSpeed one."""
    saved = dict(os.environ)
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if job.deepspeed and "RANK" not in os.environ:  # not started by torchrun/deepspeed: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        AcceleratorState._reset_state(reset_partial_state=True)
        unset_hf_deepspeed_config()


def data_parallel_devices(job: TrainJob) -> int:
    """How many devices one optimizer step is spread over: the launched world, or every visible GPU when a
    single plain process runs (the HF Trainer then uses DataParallel)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not job.deepspeed and torch.cuda.device_count() > 1:
        return torch.cuda.device_count()
    return world


def cpu_precision(precision: str, job: TrainJob) -> str:
    """What a CPU trains in for `target.precision`: bf16 (autocast, fp32 weights) where this machine's bf16
    matmuls measured faster than fp32 (`teams_rl.fast_dtype`; on CPUs without native bf16 they are ~60x slower),
    else fp32. fp16 and DeepSpeed on a CPU train in fp32."""
    if precision == "fp32":
        return precision
    if precision == "bf16" and not job.deepspeed:
        from teams_rl.fast_dtype import cpu_choice

        if cpu_choice(job.cache_dir)["dtype"] == "bfloat16":
            log.info("no GPU: training with bf16 autocast (this CPU's bf16 matmuls measured faster than fp32)")
            return precision
    log.info("no GPU: training in fp32 instead of target.precision=%s", precision)
    return "fp32"


def training_arguments(job: TrainJob, on_cpu: bool):
    from transformers import TrainingArguments

    t = job.target
    precision = str(t.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise TeamsRLError(f"target.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if on_cpu:
        precision = cpu_precision(precision, job)
    micro = int(t["micro_batch_size"])
    return TrainingArguments(
        output_dir=str(Path(job.out_dir) / "checkpoints"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation_steps(int(t["global_batch_size"]), micro, data_parallel_devices(job)),
        num_train_epochs=float(t["epochs"]),
        max_steps=int(job.max_steps) if job.max_steps else -1,
        learning_rate=float(t["learning_rate"]),
        lr_scheduler_type=str(t.get("lr_scheduler", "cosine")),
        warmup_steps=int(t.get("warmup_steps", 0)),
        weight_decay=float(t.get("weight_decay", 0.0)),
        max_grad_norm=float(t.get("max_grad_norm", 1.0)),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=bool(t.get("gradient_checkpointing", False)),
        activation_checkpointing_kwargs={"use_reentrant": False} if t.get("gradient_checkpointing") else None,
        train_sampling_strategy="group_by_length" if job.batching == "grouped" else "random",
        length_column_name="length",
        remove_unused_columns=False,  # the collators need example ids and position ids
        logging_steps=int(job.logging_steps),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(job.save_steps),
        save_total_limit=int(job.save_total_limit),
        seed=int(job.seed),
        use_cpu=on_cpu,  # without it a multi-process CPU run silently does not shard the data
        deepspeed=job.deepspeed,
        ddp_find_unused_parameters=False,
        report_to=[],  # metrics go through the stage's tracker (one wandb run per stage): callbacks.py
        disable_tqdm=not job.progress,
        dataloader_num_workers=0,  # the collator counts tokens in this process
    )


def _init_deepspeed_comm(args, job: TrainJob, on_cpu: bool) -> None:
    """Set up the process group (and on a CPU DeepSpeed's own comm layer, which accelerate leaves to the
    engine there) before the model loads: ZeRO-3 partitions the weights during `from_pretrained` and sizes
    its batch check by the world it sees then."""
    args.device  # noqa: B018 -- initialises torch.distributed through accelerate
    if job.deepspeed and on_cpu:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def load_model_and_tokenizer(job: TrainJob):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.model)
    if tok.pad_token_id is None:  # padding is never learned from (labels -100); any existing token will do
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32,
                                                 attn_implementation=job.target.get("attn_implementation", "sdpa"))
    model.config.use_cache = False  # a KV cache in training also hides packed position ids from the mask code
    if job.lora:
        from teams_rl.sft.lora import LoraSettings, wrap

        model = wrap(model, LoraSettings(**{**job.lora, "target_modules": tuple(job.lora["target_modules"])}))
    return model, tok


def build_callbacks(job: TrainJob, stats, on_log: Callable | None) -> list:
    from teams_rl.sft.callbacks import NoFinalCheckpoint, TrainLogCallback

    callbacks = [TrainLogCallback(stats, Path(job.out_dir) / "train_log.jsonl", on_log)]
    return callbacks if job.keep_checkpoints else [*callbacks, NoFinalCheckpoint()]


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def train(job: TrainJob, on_log: Callable[[dict, int], None] | None = None) -> dict:
    """Train, save the final model, return rank 0's metrics ({} on other ranks). Resumes from the newest
    complete checkpoint in `<out_dir>/checkpoints` and ends at the same number of steps."""
    import torch
    from datasets import load_from_disk
    from transformers import Trainer

    from teams_rl.sft.data import make_collator
    from teams_rl.sft.shared_prefix import SharedPrefixTrainer

    out = Path(job.out_dir)
    on_cpu = not torch.cuda.is_available()
    with process_env(job, on_cpu):
        args = training_arguments(job, on_cpu)  # first: under ZeRO-3 the model is partitioned while it loads
        _init_deepspeed_comm(args, job, on_cpu)
        model, tok = load_model_and_tokenizer(job)
        data = load_from_disk(str(out / "data"))
        collator = make_collator(job.batching, tok.pad_token_id)
        trainer_class = SharedPrefixTrainer if job.shared_prefix else Trainer
        trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=collator,
                                processing_class=tok, callbacks=build_callbacks(job, collator.stats, on_log))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before a LoRA merge
        resume = last_checkpoint(out / "checkpoints")
        resumed_from = trainer_state_step(resume) if resume else 0
        if resume:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        _save_final_model(trainer, out, job)
        rank, world = args.process_index, args.world_size
        (out / "ranks").mkdir(exist_ok=True)
        _write_json(out / "ranks" / f"rank{rank}.json",
                    {"rank": rank, "world_size": world, **collator.stats.as_dict()})
        if not trainer.is_world_process_zero():
            return {}
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics = {
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "epochs": float(trainer.state.epoch or 0.0),
            "train_loss": float(result.training_loss),
            "first_loss": float(losses[0]) if losses else None,
            "final_loss": float(losses[-1]) if losses else None,
            "train_seconds": collator.stats.train_seconds,
            "resumed_from_step": resumed_from,
            "world_size": world,
            "micro_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "lora": bool(job.lora),
            "shared_prefix_batches": getattr(trainer, "prefix_batches", 0),  # this process's, since a resume
            "trainable_parameters": trainable,
            "device": "cpu" if on_cpu else "cuda",
        }
        _write_json(out / "train_metrics.json", metrics)
        if not job.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return metrics


def trainer_state_step(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _save_final_model(trainer, out: Path, job: TrainJob) -> None:
    """Every rank takes part (ZeRO-3 gathers the weights); rank 0 writes `model.partial/` and renames it to
    `model/`, so a folder named `model` is always complete. LoRA: merged weights or the adapter alone."""
    partial, final = out / "model.partial", out / "model"
    shutil.rmtree(partial, ignore_errors=True)
    if job.lora and trainer.is_world_process_zero():
        from teams_rl.sft.lora import LoraSettings, save_final

        settings = LoraSettings(**{**job.lora, "target_modules": tuple(job.lora["target_modules"])})
        save_final(trainer.model, trainer.processing_class, partial, settings)
    elif not job.lora:
        trainer.save_model(str(partial))
    if trainer.is_world_process_zero():
        from teams_rl.models import is_adapter

        if not (partial / "config.json").is_file() and not is_adapter(partial):
            raise TeamsRLError(f"the trainer did not write a model into {partial}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)


def main(argv: list[str] | None = None) -> int:
    """A rank's entry point: train the job in `argv[0]`."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m teams_rl.sft.train JOB.yaml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][rank " + os.environ.get("RANK", "0")
                        + "][%(name)s] %(message)s")
    try:
        train(TrainJob.load(argv[0]))
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear the rank's process group down before the interpreter exits: left to the exit handlers, gloo's
    threads can abort a finished rank ("terminate called without an active exception", SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # a finished rank's result stands; the teardown error is only logged
            log.warning("destroying the process group failed: %s", err)


if __name__ == "__main__":
    raise SystemExit(main())
