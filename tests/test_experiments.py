"""Experiment configs set what they claim; shared stages are shared; smoke and a sweep run end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from teams_rl.pipeline import fingerprints, plan, run_pipeline
from tests.conftest import CONF_DIR, REPO, compose_config
from tests.fakes import rule_llm_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PIPELINE = ["policy", "generate", "finetune", "evaluate", "privacy", "report"]


def compose(name, tmp_path, *extra):
    return compose_config([f"+experiment={name}", *extra], tmp_path)


def fps(cfg):
    return fingerprints(cfg, plan(cfg))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_global_named_after_its_file_and_documented(name, tmp_path):
    assert (CONF_DIR / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_\n")
    # runs, wandb groups and sweep reports are named after the experiment
    assert compose(name, tmp_path).experiment_name == name
    assert f"`{name}`" in (REPO / "experiments" / "README.md").read_text(), "experiments/README.md must list it"


def test_llama7b_is_the_papers_main_run(tmp_path):
    cfg = compose("llama7b", tmp_path)
    assert list(cfg.stages) == PIPELINE
    assert cfg.rl.algorithm == "trpo_paper" and cfg.rl.action_bias == {"breadth": 0.3}
    assert (cfg.policy.updates, cfg.policy.n_envs, cfg.policy.steps_per_update, cfg.policy.seed) == (200, 1, 6, 543)
    assert list(cfg.reward.terms) == ["reviewer_judge"] and cfg.reward.judge.strict is True  # exact "Not Equal"
    # every evolution of the 2,980 training seeds unfiltered; non-members from 100 seeds after them
    assert cfg.seeds.stop == 2980 and cfg.generate.heldout_seeds == 100
    assert not any(OmegaConf.to_container(cfg.filters.elimination).values())
    assert not cfg.filters.alpaca.enabled and not cfg.filters.rouge_l.enabled and not cfg.filters.exact_dedup
    assert cfg.generate.policy_update == 128 and list(cfg.policy.keep_updates) == [128]  # model128.pth
    for role in ("instructor", "reviewer"):
        assert cfg[role].backend.model == "WizardLMTeam/WizardLM-13B-V1.2"
        assert cfg[role].backend._target_.endswith("HFBackend")
    assert cfg.expert.backend.model == "gpt-4-1106-preview"
    assert cfg.seeds.kind == "alpaca"
    rules = OmegaConf.to_container(cfg.generate.rules)
    assert rules == {"op_bias": {"add_constraints": 0.7}, "forced_breadth_steps": [2, 5],
                     "replace_breadth_with": "add_constraints"}
    assert cfg.generate.episode_length == 6
    assert cfg.target.model == "huggyllama/llama-7b"
    assert cfg.deepspeed.zero_optimization.stage == 3
    assert cfg.deepspeed.zero_optimization.offload_param.device == "cpu"
    assert cfg.finetune.nproc_per_node == 4
    assert (cfg.evaluate.benchmarks.arc_challenge.num_fewshot, cfg.evaluate.benchmarks.hellaswag.num_fewshot) == (25, 10)
    assert list(cfg.privacy.attacks) == ["loss", "zlib", "min_k", "min_k_pp", "ref"]


def test_llama2_runs_share_the_policy_and_data_of_llama7b(tmp_path):
    main = fps(compose("llama7b", tmp_path))
    for name, model in (("llama2_7b", "meta-llama/Llama-2-7b-hf"), ("llama2_13b", "meta-llama/Llama-2-13b-hf")):
        cfg = compose(name, tmp_path)
        assert cfg.target.model == model and cfg.experiment_name == name
        other = fps(cfg)
        assert other["policy"] == main["policy"] and other["generate"] == main["generate"]
        assert other["finetune"] != main["finetune"] and other["evaluate"] != main["evaluate"]


def test_llama7b_wizardlm_is_the_baseline_on_the_same_seeds_and_target(tmp_path):
    main_cfg, cfg = compose("llama7b", tmp_path), compose("llama7b_wizardlm", tmp_path)
    assert (cfg.generate.mode, cfg.generate.episode_length, cfg.rl.algorithm) == ("wizardlm", 4, "random")
    assert not cfg.generate.rules.op_bias and cfg.filters.elimination.no_info_gain is True
    assert OmegaConf.to_container(cfg.seeds) == OmegaConf.to_container(main_cfg.seeds)
    assert cfg.expert.backend.model == main_cfg.expert.backend.model == "gpt-4-1106-preview"
    assert cfg.target.model == main_cfg.target.model and list(cfg.stages) == PIPELINE
    assert fps(cfg)["evaluate_base"] == fps(main_cfg)["evaluate_base"]
    assert fps(cfg)["generate"] != fps(main_cfg)["generate"]


def test_alpaca_baseline_trains_on_the_seeds_without_evolution(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_JSON", "/data/alpaca_data.json")
    cfg = compose("alpaca_baseline", tmp_path)
    assert cfg.finetune.dataset == "/data/alpaca_data.json"
    assert plan(cfg) == ["finetune", "evaluate_base", "evaluate", "report"]   # no policy, no generation
    assert cfg.target.model == "huggyllama/llama-7b" and cfg.finetune.nproc_per_node == 4
    # the base model is evaluated once for both experiments
    assert fps(cfg)["evaluate_base"] == fps(compose("llama7b", tmp_path))["evaluate_base"]


def test_local_vllm_puts_every_role_on_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_BASE_URL", "http://gpu-node:9000/v1")
    cfg = compose("local_vllm", tmp_path)
    for role in ("instructor", "reviewer", "expert"):
        backend = cfg[role].backend
        assert backend._target_ == "teams_rl.llm.openai_backend.OpenAIBackend"
        assert backend.base_url == "http://gpu-node:9000/v1"
        assert cfg[role].price.prompt_usd_per_1k == 0.0
    assert cfg.rl.algorithm == "trpo_paper" and cfg.target.model == "huggyllama/llama-7b"


def test_smoke_and_query_experiments_are_offline_and_small(tmp_path):
    cfg = compose("smoke", tmp_path)
    assert list(cfg.stages) == PIPELINE
    for role in ("instructor", "reviewer", "expert"):
        assert cfg[role].backend.model == "smollm2"
    assert cfg.seeds.kind == "tiny" and cfg.seeds.limit == 4 and cfg.target.model == "tiny_llama"
    teams, wizard = compose("queries_small", tmp_path), compose("queries_small_wizardlm", tmp_path)
    assert (teams.generate.mode, wizard.generate.mode) == ("teams_rl", "wizardlm")
    assert OmegaConf.to_container(teams.seeds) == OmegaConf.to_container(wizard.seeds)
    assert (teams.generate.episode_length, wizard.generate.episode_length) == (6, 4)
    assert wizard.rl.algorithm == "random" and wizard.filters.elimination.no_info_gain is True
    assert not wizard.generate.rules.op_bias and wizard.generate.rules.forced_breadth_steps == []
    assert list(teams.stages) == ["generate", "report"]


def _hydra_config(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def test_joblib_launcher_preset_composes():
    cfg = _hydra_config(["hydra/launcher=joblib", "+experiment=smoke"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional `slurm` extra is not installed")
    cfg = _hydra_config(["hydra/launcher=slurm_4gpu", "+experiment=llama7b"])
    assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.tasks_per_node == 1


@pytest.mark.slow
def test_smoke_runs_the_whole_pipeline_offline(tmp_path):
    cfg = compose("smoke", tmp_path / "artifacts", "logger=none")
    results = run_pipeline(cfg, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    assert set(manifest["stages"]) == {"policy", "generate", "finetune", "evaluate_base", "evaluate", "privacy",
                                       "report"}
    assert all(e["status"] == "ran" for e in manifest["stages"].values())
    gen = results["generate"]
    assert gen["seeds"] == 4 and gen["dataset/train"] > 0 and gen["dataset/heldout"] > 0
    report_dir = tmp_path / "run" / "report"
    md = (report_dir / "report.md").read_text()
    for figure in ("policy_learning_curve", "operator_mix", "dataset_diversity", "benchmark_bars", "roc_curves"):
        assert (report_dir / "figures" / f"{figure}.png").is_file(), figure
        assert f"figures/{figure}.png" in md
    with open(report_dir / "openllm_v1.csv") as fh:
        rows = {r[0]: r for r in csv.reader(fh)}
    assert rows["fine-tuned: smoke"][1] == f"{100 * results['evaluate']['finetuned/arc_challenge']:.2f}"


@pytest.mark.slow
def test_operator_sweep_shares_stages_and_is_aggregated(tmp_path):
    """Two jobs of a multirun (rule-based LLMs): the base evaluation runs once, the callback aggregates both."""
    args = [sys.executable, "-m", "teams_rl", "-m", "+experiment=smoke", "operators=teams_rl,wizardlm",
            "stages=[policy,generate,finetune,evaluate,report]", "rl=random", "logger=none",
            *rule_llm_overrides(), f"paths.artifacts={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/sweep",
            "++hydra.callbacks.sweep_report._target_=teams_rl.report.callback.SweepReport"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = []
    for job in ("0", "1"):
        manifest = json.loads((tmp_path / "sweep" / job / "run_manifest.json").read_text())
        statuses.append({s: e["status"] for s, e in manifest["stages"].items()})
    assert statuses[0]["evaluate_base"] == "ran" and statuses[1]["evaluate_base"] == "cached"
    for stage in ("policy", "generate", "finetune", "evaluate", "report"):
        assert statuses[0][stage] == statuses[1][stage] == "ran"     # the operator set changes them
    assert len(list((tmp_path / "artifacts" / "evaluate_base").glob("*/manifest.json"))) == 1
    assert len(list((tmp_path / "artifacts" / "policy").glob("*/manifest.json"))) == 2
    report = tmp_path / "sweep" / "report"
    assert f"sweep report: {report / 'report.md'}" in proc.stdout
    with open(report / "ablation.csv") as fh:
        groups = [r[0] for r in csv.reader(fh)][1:]
    assert groups == ["operators=teams_rl", "operators=wizardlm"]
    with open(report / "sweep_cache.csv") as fh:
        cache = {r[0]: r for r in csv.reader(fh)}
    assert cache["evaluate_base"][1:] == ["2", "1", "1", "1"]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "report" / "report.md").is_file()
