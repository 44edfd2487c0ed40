"""The finetune stage: configs, launching, bad inputs, training tiny_llama in-process / under DeepSpeed ZeRO-2
and ZeRO-3 / on 2 processes with torchrun, and resuming after a SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.pipeline import fingerprints, run_pipeline
from teams_rl.sft.launch import LaunchSettings, build_command, read_hostfile
from teams_rl.stages import finetune as stage
from tests.conftest import REPO

WORDS = ("the a cat dog runs quickly over lazy fox blue red green sky tree river mountain explain describe list "
         "why how water light small large city music write poem story number").split()



FAST_LR = "target.learning_rate=1e-2"  # random tiny weights: a few steps on one batch are enough to learn it
EVERY_STEP = "finetune.logging_steps=1"


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    """An Alpaca-format JSON list of `n` random but learnable examples (the output repeats the instruction)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        given = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) if rng.random() < 0.4 else ""
        rows.append({"instruction": instruction, "input": given, "output": f"{instruction} . {instruction}"})
    path.write_text(json.dumps(rows))
    return path


def finetune_overrides(data: Path, *extra: str) -> list[str]:
    return ["stages=[finetune]", f"finetune.dataset={data}", "target=tiny_llama", "finetune.progress=false", *extra]


def batch_loss(model_dir, data: Path) -> float:
    """Mean response-token loss of a saved model on every example of `data` (one padded batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teams_rl.sft.data import PadCollator, encode

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    feats = []
    for i, row in enumerate(json.loads(data.read_text())):
        ids, labels, _ = encode(tok, row["instruction"], row["input"], row["output"], 256)
        feats.append({"input_ids": ids, "labels": labels, "example_id": i})
    with torch.no_grad():
        return model(**PadCollator(tok.pad_token_id)(feats)).loss.item()


def finished_folder(cfg) -> Path:
    return Path(cfg.paths.artifacts) / "finetune" / fingerprints(cfg, ["finetune"])["finetune"]


# ------------------------------------------------------------------------------------------- configuration


def test_inputs_and_fingerprint_keys(compose, tmp_path):
    with_data = compose(finetune_overrides(tmp_path / "d.json"))
    assert stage.STAGE.inputs_for(with_data) == []
    assert stage.STAGE.inputs_for(compose(["target=tiny_llama"])) == ["generate"]
    keys = stage.STAGE.fingerprint_keys(with_data)
    assert {"target", "deepspeed", "finetune.dataset", "finetune.batching", "finetune.max_steps"} <= set(keys)
    assert not {"finetune.nproc_per_node", "finetune.hostfile", "finetune.save_steps"} & set(keys)
    base = fingerprints(with_data, ["finetune"])["finetune"]
    launch_only = compose(finetune_overrides(tmp_path / "d.json", "finetune.nproc_per_node=4", "finetune.save_steps=7"))
    assert fingerprints(launch_only, ["finetune"])["finetune"] == base
    for change in ("target.learning_rate=1e-4", "deepspeed=zero2", "finetune.batching=packed"):
        assert fingerprints(compose(finetune_overrides(tmp_path / "d.json", change)), ["finetune"])["finetune"] != base


@pytest.mark.parametrize("name", ["llama1_7b", "llama2_7b", "llama2_13b", "smollm2_135m", "tiny_llama"])
def test_targets(compose, name):
    t = compose([f"target={name}"]).target
    assert {"model", "max_length", "epochs", "learning_rate", "global_batch_size", "micro_batch_size", "warmup_steps",
            "lr_scheduler", "gradient_checkpointing", "precision"} <= set(t)
    assert t.global_batch_size % t.micro_batch_size == 0
    if name.startswith("llama"):  # the paper's train_models.sh
        assert (t.learning_rate, t.epochs, t.max_length, t.global_batch_size, t.warmup_steps) == (2e-5, 3, 512, 256, 2)
        assert t.lr_scheduler == "cosine" and t.gradient_checkpointing is True and t.precision in ("bf16", "fp16")
    assert t.model == {"llama1_7b": "huggyllama/llama-7b", "llama2_7b": "meta-llama/Llama-2-7b-hf",
                       "llama2_13b": "meta-llama/Llama-2-13b-hf", "smollm2_135m": "smollm2",
                       "tiny_llama": "tiny_llama"}[name]


def test_launch_commands(tmp_path, monkeypatch):
    job = tmp_path / "job.yaml"
    torchrun = build_command(LaunchSettings(nproc_per_node=2), job, 29999)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert torchrun[-3:] == ["-m", "teams_rl.sft.train", str(job)] and "--nproc_per_node" in torchrun
    assert torchrun[torchrun.index("--master_port") + 1] == "29999"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    ds = LaunchSettings(hostfile=str(hostfile))
    assert ds.kind == "deepspeed" and ds.world_size() == 8
    cmd = build_command(ds, job, 29999)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert ["--hostfile", str(hostfile)] == cmd[cmd.index("--hostfile"):cmd.index("--hostfile") + 2]
    assert "--no_local_rank" in cmd and cmd[-3:] == ["--module", "teams_rl.sft.train", str(job)]
    one_node_ds = build_command(LaunchSettings(nproc_per_node=2, launcher="deepspeed"), job, 1)
    assert one_node_ds[one_node_ds.index("--num_gpus") + 1] == "2"
    multi = LaunchSettings(nproc_per_node=4, nnodes=2)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(TeamsRLError, match="needs a SLURM allocation"):
        build_command(multi, job, 1)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    srun = build_command(multi, job, 29400)
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--rdzv_backend" in srun and srun[srun.index("--nnodes") + 1] == "2" and multi.world_size() == 8
    assert LaunchSettings().kind == "in_process"
    hostfile.write_text("node-a 4\n")
    with pytest.raises(TeamsRLError, match="line 1 is not a new 'host slots=N' entry"):
        read_hostfile(hostfile)


# ------------------------------------------------------------------------------------------- bad inputs


def _bad_dataset(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.json"
    path.write_text({"no_output": '[{"instruction": "a", "response": "b"}]', "empty": "[]"}.get(kind, "[]"))
    return path


@pytest.mark.parametrize("case, extra, message", [
    ("no_output", [], "no_output.json:1: missing field 'output'"),
    ("empty", [], "is empty"),
    ("ok", ["target.model=/nonexistent/llama-7b"], "model path /nonexistent/llama-7b does not exist"),
    ("ok", ["deepspeed=zero3_offload"], "needs a C++ compiler (/nonexistent/c++)"),
    ("ok", ["finetune.nproc_per_node=3"], "not a multiple of micro_batch_size x devices = 4 x 3"),
    ("ok", ["finetune.batching=sorted"], "finetune.batching='sorted' is not one of grouped, packed, padded"),
])
def test_bad_inputs_fail_with_one_clear_line(compose, tmp_path, monkeypatch, case, extra, message):
    data = write_alpaca(tmp_path / "ok.json", 4) if case == "ok" else _bad_dataset(tmp_path, case)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cfg = compose(finetune_overrides(data, *extra))
    with pytest.raises(TeamsRLError) as err:
        run_pipeline(cfg, tmp_path / "run")
    text = str(err.value)
    assert message in text and "\n" not in text
    if case != "ok":
        assert str(data) in text
    assert not (finished_folder(cfg) / "manifest.json").exists()


def test_deepspeed_checkpoints_resume_only_on_the_same_world_size(tmp_path):
    from teams_rl.sft.train import TrainJob

    TrainJob(out_dir=str(tmp_path), model="m", target={}, world_size=2).save(tmp_path / "job.yaml")
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    zero2 = {"zero_optimization": {"stage": 2}}
    stage.check_resumable(tmp_path, zero2, 1)  # an incomplete checkpoint (no trainer_state.json) is ignored
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(TeamsRLError, match="come from 2 process.*this run has 1"):
        stage.check_resumable(tmp_path, zero2, 1)
    stage.check_resumable(tmp_path, zero2, 2)
    stage.check_resumable(tmp_path, None, 1)  # plain torch checkpoints hold the whole optimizer state


# ------------------------------------------------------------------------------------------- training


def _check_trained(cfg, data: Path, metrics: dict, steps: int) -> Path:
    folder = finished_folder(cfg)
    assert (folder / "manifest.json").is_file()
    assert (folder / "base_model.txt").read_text().strip() == "tiny_llama" == metrics["base_model"]
    assert json.loads((folder / "train_metrics.json").read_text())["tokens"] == metrics["tokens"]
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == steps == metrics["steps"]
    assert not (folder / "checkpoints").exists() and not (folder / "model.partial").exists()
    assert metrics["tokens_per_s"] > 0 and 0.5 < metrics["real_token_fraction"] <= 1.0
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == steps and all("tokens_per_s" in r for r in rows)
    assert metrics["final_loss"] < 0.7 * metrics["first_loss"]
    from teams_rl.models import resolve_model

    assert batch_loss(folder / "model", data) < 0.7 * batch_loss(resolve_model("tiny_llama"), data)
    return folder


def test_finetune_in_process_lowers_loss_on_a_fixed_batch(compose, tmp_path):
    """8 examples = one global batch (4 x 2 accumulation): every step sees the same batch."""
    data = write_alpaca(tmp_path / "fixed.json", 8)
    cfg = compose(finetune_overrides(data, "finetune.max_steps=12", EVERY_STEP, FAST_LR))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    folder = _check_trained(cfg, data, metrics, steps=12)
    assert metrics["examples"] == 8 and metrics["world_size"] == 1 and metrics["deepspeed_stage"] == 0
    assert metrics["gradient_accumulation_steps"] == 2 and metrics["micro_batch_size"] == 4
    assert metrics["tokens"] >= 12 * metrics["dataset_tokens"]  # every step trains on all 8 examples
    history = (tmp_path / "run" / "metrics" / "finetune.jsonl").read_text().splitlines()
    assert len(history) == 12 and {"finetune/loss", "finetune/lr", "finetune/tokens_per_s"} <= set(json.loads(history[-1]))
    assert json.loads((folder / "ranks" / "rank0.json").read_text())["world_size"] == 1


@pytest.mark.parametrize("keep", [False, True])
def test_last_step_is_checkpointed_only_when_checkpoints_are_kept(compose, tmp_path, monkeypatch, keep):
    """The Trainer's last-step checkpoint (model + optimizer state) would be deleted right after the final save
    unless checkpoints are kept: it is skipped then; the checkpoints before it are written either way."""
    from transformers import Trainer

    saved = []
    original = Trainer._save_checkpoint

    def spy(self, *args, **kwargs):
        saved.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", spy)
    data = write_alpaca(tmp_path / "fixed.json", 8)
    cfg = compose(finetune_overrides(data, "finetune.max_steps=4", "finetune.save_steps=2",
                                     f"finetune.keep_checkpoints={str(keep).lower()}"))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    assert metrics["steps"] == 4 and saved == ([2, 4] if keep else [2])
    folder = finished_folder(cfg)
    assert (folder / "model" / "config.json").is_file()
    assert sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*")) == (
        ["checkpoint-2", "checkpoint-4"] if keep else [])


def test_finetune_packed_batching_trains(compose, tmp_path):
    data = write_alpaca(tmp_path / "fixed.json", 8)
    cfg = compose(finetune_overrides(data, "finetune.max_steps=12", "finetune.batching=packed", FAST_LR, EVERY_STEP,
                                     "target.global_batch_size=1", "target.micro_batch_size=1"))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    assert metrics["rows"] < metrics["examples"] == 8  # several examples per row
    assert metrics["real_token_fraction"] == 1.0  # one row per batch: no padding at all
    _check_trained(cfg, data, metrics, steps=12)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_finetune_deepspeed_on_cpu_lowers_loss(compose, tmp_path, zero):
    data = write_alpaca(tmp_path / "fixed.json", 8)
    cfg = compose(finetune_overrides(data, f"deepspeed={zero}", "finetune.max_steps=12", FAST_LR, EVERY_STEP))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    assert metrics["deepspeed_stage"] == int(zero[-1]) and metrics["precision"] == "fp32"
    _check_trained(cfg, data, metrics, steps=12)
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ and "RANK" not in os.environ  # the process is clean again


@pytest.mark.slow
def test_finetune_torchrun_two_processes_deepspeed_shards_the_data(compose, tmp_path):
    """`finetune.nproc_per_node=2` with ZeRO-3: torchrun starts 2 ranks; each trains on its own half."""
    data = write_alpaca(tmp_path / "data.json", 32)
    cfg = compose(finetune_overrides(data, "deepspeed=zero3", "finetune.nproc_per_node=2", "target.epochs=1",
                                     EVERY_STEP, FAST_LR))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    folder = finished_folder(cfg)
    assert metrics["world_size"] == 2 and metrics["ranks"] == 2 and metrics["gradient_accumulation_steps"] == 1
    assert metrics["steps"] == 4  # 32 examples / global batch 8
    ranks = [json.loads((folder / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    ids = [set(r["example_ids"]) for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 16 and not ids[0] & ids[1]  # each rank trained on its own half
    assert ids[0] | ids[1] == set(range(32))
    assert metrics["tokens"] == ranks[0]["real_tokens"] + ranks[1]["real_tokens"] == metrics["dataset_tokens"]
    assert (folder / "launch.log").is_file() and (folder / "model" / "model.safetensors").is_file()
    assert metrics["final_loss"] < metrics["first_loss"] and metrics["deepspeed_stage"] == 3
    forwarded = [json.loads(line) for line in (tmp_path / "run" / "metrics" / "finetune.jsonl").read_text().splitlines()]
    assert [r["step"] for r in forwarded] == [1, 2, 3, 4]  # rank 0's log rows reached this process's tracker
    assert forwarded[-1]["finetune/loss"] == metrics["final_loss"]
    from teams_rl.models import resolve_model

    assert batch_loss(folder / "model", data) < batch_loss(resolve_model("tiny_llama"), data)  # weights gathered


@pytest.mark.slow
def test_finetune_after_generate(compose, tmp_path):
    """Without finetune.dataset the stage plans policy -> generate in front and trains on generate's train split."""
    from tests.fakes import rule_llm_overrides

    cheap_generation = ["rl=fixed", "rl.schedule=[add_constraints,deepening,concretizing]", "reward=reviewer_judge",
                        "policy.updates=1", "policy.n_envs=1", "policy.steps_per_update=1", "policy.progress=false",
                        "generate.embedding_stats=false", "generate.progress=false"]
    cfg = compose(rule_llm_overrides() + cheap_generation + ["stages=[finetune]", "finetune.progress=false"])
    results = run_pipeline(cfg, tmp_path / "run")
    assert list(results) == ["policy", "generate", "finetune"]
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    dataset = Path(manifest["stages"]["generate"]["folder"]) / "dataset"
    metrics = results["finetune"]
    from datasets import load_from_disk

    assert metrics["dataset_source"] == str(dataset)
    assert metrics["examples_in"] == len(load_from_disk(str(dataset / "train"))) > 0
    assert (Path(manifest["stages"]["finetune"]["folder"]) / "model" / "config.json").is_file()


DRIVER = """
import runpy, sys, time
from pathlib import Path
from transformers import TrainerCallback
import teams_rl.sft.train as train_mod

MARKER = Path(sys.argv[1])

class PauseAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        MARKER.write_text(str(state.global_step))
        time.sleep(600)

build = train_mod.build_callbacks
train_mod.build_callbacks = lambda *a, **k: build(*a, **k) + [PauseAfterFirstSave()]
sys.argv = ["teams_rl"] + sys.argv[2:]
runpy.run_module("teams_rl", run_name="__main__", alter_sys=True)  # = python -m teams_rl ARGS
"""


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_rerun_resumes(tmp_path):
    """Killed right after checkpoint-2; the rerun (the README command, with ZeRO-2) resumes from it."""
    data = write_alpaca(tmp_path / "data.json", 16)
    args = finetune_overrides(data, "deepspeed=zero2", "finetune.max_steps=6", "finetune.save_steps=2",
                              "logger=none", f"paths.artifacts={tmp_path / 'artifacts'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    marker = tmp_path / "saved"
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(marker), *args,
                             f"hydra.run.dir={tmp_path / 'run1'}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists() and marker.read_text() == "2", err.decode()[-2000:]
    folder = next((tmp_path / "artifacts" / "finetune").glob("*/"))
    assert (folder / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (folder / "manifest.json").exists() and not (folder / "model").exists()

    done = subprocess.run([sys.executable, "-m", "teams_rl", *args, f"hydra.run.dir={tmp_path / 'run2'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())["finetune"]
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == metrics["max_steps"] == 6
    assert metrics["deepspeed_stage"] == 2
    assert (folder / "manifest.json").is_file() and (folder / "model" / "config.json").is_file()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 4, 6]  # first step, then every 2
    assert metrics["tokens"] == 2 * metrics["dataset_tokens"]  # only steps 3-6 (epochs 2 and 3) ran here


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_lora_trains_only_adapters_and_later_stages_load_the_result(compose, tmp_path, save):
    """LoRA through peft: only the adapters train; `merged` saves an ordinary checkpoint, `adapter` the adapter
    alone, which the scoring loader (privacy) and lm-eval's model args (evaluate) apply to the base model."""
    import torch

    from teams_rl.eval.harness import model_spec
    from teams_rl.models import is_adapter, load_causal_lm, model_to_score, resolve_model

    data = write_alpaca(tmp_path / "fixed.json", 8)
    lora = ["finetune.lora.enabled=true", "finetune.lora.r=8", "finetune.lora.alpha=16", f"finetune.lora.save={save}",
            "finetune.lora.target_modules=[q_proj,v_proj]", "target.learning_rate=3e-2"]
    cfg = compose(finetune_overrides(data, "finetune.max_steps=12", EVERY_STEP, *lora))
    metrics = run_pipeline(cfg, tmp_path / "run")["finetune"]
    assert metrics["lora"] is True
    base_model, _ = load_causal_lm("tiny_llama")
    total = sum(p.numel() for p in base_model.parameters())
    assert 0 < metrics["trainable_parameters"] < 0.2 * total
    folder = finished_folder(cfg)
    model_dir = model_to_score(None, None, folder)
    assert is_adapter(model_dir) == (save == "adapter")
    tuned, _ = load_causal_lm(model_dir)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base_model.state_dict()[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only the adapted layers moved
    assert metrics["final_loss"] < metrics["first_loss"]
    kind, args = model_spec(model_dir, compose([]).evaluate)
    if save == "adapter":
        assert args["peft"] == model_dir and args["pretrained"] == resolve_model("tiny_llama")
    else:
        assert "peft" not in args and args["pretrained"] == model_dir


def test_lora_settings_are_checked(compose):
    from teams_rl.sft.lora import LoraSettings

    with pytest.raises(TeamsRLError, match="finetune.lora.save"):
        LoraSettings.from_config(compose(["finetune.lora.enabled=true", "finetune.lora.save=both"]).finetune)
    with pytest.raises(TeamsRLError, match="finetune.lora.r must be >= 1"):
        LoraSettings.from_config(compose(["finetune.lora.enabled=true", "finetune.lora.r=0"]).finetune)
    assert LoraSettings.from_config(compose([]).finetune) is None
