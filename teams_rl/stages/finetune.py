"""Fine-tune the target model on the generated instruction dataset: the paper's single SFT step.

Input: the generate stage's `dataset/` (split `train`), or `finetune.dataset` (an Alpaca JSON / JSONL file or a
`save_to_disk` folder), which makes the stage independent of generation. Hyper-parameters come from `target`,
the DeepSpeed config from `deepspeed`, batching and launching from `finetune`.

Artifact folder: `model/` (the fine-tuned model + tokenizer, `save_pretrained`), `base_model.txt` (what it was
trained from: the reference for evaluation and membership inference), `train_metrics.json`,
`trainer_state.json`, `train_log.jsonl`, `data_stats.json`, `job.yaml` (the resolved job), `ranks/` (what each
rank trained on), and while it runs `data/` and `checkpoints/` (a killed run resumes from the last checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.stages import Stage

log = logging.getLogger(__name__)

# Settings of `finetune` that change how the job runs, not what it learns: kept out of the fingerprint, so
# e.g. a rerun on more GPUs or with other checkpoint intervals resumes the same artifact.
RUN_ONLY_KEYS = tuple(f"finetune.{k}" for k in ("nproc_per_node", "nnodes", "hostfile", "launcher", "master_port",
                                                 "save_steps", "save_total_limit", "keep_checkpoints", "logging_steps"))


def _inputs(cfg: DictConfig) -> list[str]:
    return [] if cfg.finetune.get("dataset") else ["generate"]


def _fingerprint_extra(cfg: DictConfig) -> dict:
    """A dataset given by path counts by its content, so editing the file in place trains anew."""
    from teams_rl.artifacts import content_hash

    return {"dataset_content": content_hash(cfg.finetune.dataset)} if cfg.finetune.get("dataset") else {}


def dataset_source(cfg: DictConfig, ctx) -> tuple[Path, str]:
    if cfg.finetune.get("dataset"):
        return Path(str(cfg.finetune.dataset)).expanduser(), str(cfg.finetune.get("split") or "train")
    return Path(ctx.inputs["generate"]) / "dataset", "train"


def prepare_data(out: Path, source: Path, split: str, model_path: str, max_length: int, batching: str) -> dict:
    """Tokenise (and pack) the dataset into `out/data` once; a resumed run reuses it, so its batches match
    the checkpoint's. Returns the data statistics."""
    stats_path, data_dir = out / "data_stats.json", out / "data"
    if data_dir.is_dir() and stats_path.is_file():
        return json.loads(stats_path.read_text())
    from transformers import AutoTokenizer

    from teams_rl.sft.data import load_alpaca, pack_dataset, tokenize_dataset

    dataset = load_alpaca(source, split)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenized, stats = tokenize_dataset(dataset, tokenizer, max_length)
    rows = pack_dataset(tokenized, max_length) if batching == "packed" else tokenized
    partial = out / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    rows.save_to_disk(str(partial))
    data_stats = {**stats.as_metrics(), "rows": len(rows), "dataset_source": str(source)}
    stats_path.write_text(json.dumps(data_stats, indent=2))
    os.replace(partial, data_dir)
    return data_stats


def _checked(cfg: DictConfig):
    """Everything a user can get wrong, with one line, before any work: (launch settings, world size, batching,
    the DeepSpeed config for this device, the target's settings)."""
    import torch

    from teams_rl.models import check_model
    from teams_rl.sft import deepspeed_config as dsc
    from teams_rl.sft.data import BATCHING
    from teams_rl.sft.launch import LaunchSettings
    from teams_rl.sft.train import PRECISIONS, accumulation_steps

    settings = LaunchSettings.from_config(cfg.finetune)
    world = settings.world_size()
    batching = str(cfg.finetune.batching)
    if batching not in BATCHING:
        raise TeamsRLError(f"finetune.batching={batching!r} is not one of {', '.join(BATCHING)}")
    for key in ("max_length", "epochs", "global_batch_size", "micro_batch_size"):
        C.integer(cfg, f"target.{key}", minimum=1)
    C.integer(cfg, "target.warmup_steps", minimum=0, optional=True)
    C.number(cfg, "target.learning_rate", minimum=0.0)
    C.choice(cfg, "target.precision", PRECISIONS, default="fp32")
    C.integer(cfg, "finetune.max_steps", minimum=1, optional=True)
    C.integer(cfg, "finetune.seed")
    C.boolean(cfg, "finetune.shared_prefix", default=True)
    on_cpu = not torch.cuda.is_available()
    ds = dsc.for_device(dsc.render(cfg.get("deepspeed")), on_cpu)
    dsc.check_toolchain(ds, on_cpu)
    target = C.plain(cfg.target)
    accumulation_steps(int(target["global_batch_size"]), int(target["micro_batch_size"]), world)
    check_model(str(target["model"]), cfg.paths.get("cache"), "target.model")
    lora = _lora(cfg)
    if lora and ds and dsc.zero_stage(ds) == 3:
        raise TeamsRLError("finetune.lora with DeepSpeed ZeRO-3 is not supported here; use deepspeed=zero2 or none")
    if cfg.finetune.get("dataset") and not Path(str(cfg.finetune.dataset)).expanduser().exists():
        raise TeamsRLError(f"finetune.dataset {cfg.finetune.dataset} does not exist")
    return settings, world, batching, ds, target, on_cpu


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.models import resolve_model
    from teams_rl.sft import deepspeed_config as dsc
    from teams_rl.sft.launch import run_launched
    from teams_rl.sft.train import train

    settings, world, batching, ds, target, on_cpu = _checked(cfg)
    model_path = resolve_model(str(target["model"]), cfg.paths.get("cache"))

    out = Path(ctx.out_dir)
    source, split = dataset_source(cfg, ctx)
    data_stats = prepare_data(out, source, split, model_path, int(target["max_length"]), batching)
    log.info("finetune: %d examples (%d truncated, %d dropped) -> %d rows, %s batching, %s, %d process(es)",
             data_stats["examples"], data_stats["examples_truncated"], data_stats["examples_dropped"],
             data_stats["rows"], batching, dsc.describe(ds), world)
    (out / "base_model.txt").write_text(f"{target['model']}\n")
    shutil.rmtree(out / "ranks", ignore_errors=True)
    check_resumable(out, ds, world)
    job = build_job(cfg, out, model_path, target, batching, ds, world)
    job.save(out / "job.yaml")
    if settings.kind == "in_process":
        train(job, on_log=ctx.log)
    else:
        run_launched(out / "job.yaml", settings, env={"DS_ACCELERATOR": "cpu"} if on_cpu else None, on_log=ctx.log)
    return collect(out, {**data_stats, "base_model": str(target["model"]), "batching": batching,
                         "deepspeed_stage": dsc.zero_stage(ds), "global_batch_size": int(target["global_batch_size"])})


def build_job(cfg: DictConfig, out: Path, model_path: str, target: dict, batching: str, ds: dict | None, world: int):
    from teams_rl.sft.train import TrainJob

    settings = cfg.finetune
    return TrainJob(out_dir=str(out), model=model_path, target=target, batching=batching,
                    max_steps=settings.get("max_steps"), seed=int(settings.seed), save_steps=int(settings.save_steps),
                    save_total_limit=int(settings.save_total_limit), keep_checkpoints=bool(settings.keep_checkpoints),
                    logging_steps=int(settings.logging_steps), progress=bool(settings.get("progress", True)),
                    deepspeed=ds, world_size=world, lora=_lora(cfg),
                    shared_prefix=bool(settings.get("shared_prefix", True)),
                    cache_dir=OmegaConf.select(cfg, "paths.cache", default=None))


def _lora(cfg: DictConfig) -> dict | None:
    from teams_rl.sft.lora import LoraSettings

    settings = LoraSettings.from_config(cfg.finetune)
    return None if settings is None else settings.to_dict()


def check_resumable(out: Path, ds: dict | None, world_size: int) -> None:
    """DeepSpeed checkpoints hold one optimizer partition per rank: they resume only on as many processes."""
    from teams_rl.sft.train import TrainJob, last_checkpoint

    if not ds or not (out / "job.yaml").is_file() or last_checkpoint(out / "checkpoints") is None:
        return
    before = TrainJob.load(out / "job.yaml").world_size
    if before != world_size:
        raise TeamsRLError(f"finetune: the DeepSpeed checkpoints in {out / 'checkpoints'} come from {before} "
                           f"process(es) but this run has {world_size}; rerun with the same launch settings "
                           "or delete that folder to start over")


def collect(out: Path, extra: dict) -> dict:
    """Merge rank 0's metrics with every rank's token counts; check the model is there; rewrite
    train_metrics.json with the result and return it."""
    metrics_path = out / "train_metrics.json"
    from teams_rl.models import is_adapter

    if not metrics_path.is_file() or not ((out / "model" / "config.json").is_file() or is_adapter(out / "model")):
        raise TeamsRLError(f"finetune: training ended without writing {out / 'model'} and {metrics_path}")
    metrics = json.loads(metrics_path.read_text())
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    tokens = sum(r["real_tokens"] for r in ranks)
    padded = sum(r["padded_tokens"] for r in ranks)
    seconds = max((r["train_seconds"] for r in ranks), default=0.0)
    metrics.update(extra, ranks=len(ranks), tokens=tokens,
                   tokens_per_s=tokens / seconds if seconds else 0.0,
                   real_token_fraction=tokens / padded if padded else 0.0)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


STAGE = Stage(name="finetune", version=1, run=run, config_keys=["target", "deepspeed", "finetune"], inputs=_inputs,
              run_only_keys=RUN_ONLY_KEYS, resumable=True, fingerprint_extra=_fingerprint_extra, validate=_checked)
