"""The evaluate stages: lm-eval on the offline task set, parity with lm-eval's CLI, MMLU averaging, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.eval import harness

OFFLINE_KEYS = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]



@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory) -> str:
    """A second random tiny Llama (seed 1): a stand-in 'fine-tuned' model whose scores differ from the base."""
    from teams_rl.models import build_tiny_llama

    model, tok = build_tiny_llama(seed=1)
    path = tmp_path_factory.mktemp("tiny_seed1")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def stage_folder(run_dir: Path, stage: str) -> Path:
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    return Path(manifest["stages"][stage]["folder"])


# --------------------------------------------------------------------------------------------- averaging
def handmade_results() -> dict:
    """An lm-eval-shaped result: a nested group with three subjects of 2, 8 and 10 questions."""
    return {
        "results": {
            "g": {"alias": "g", "acc,none": 0.35, "acc_stderr,none": 0.1},
            "g_sci": {"alias": " - sci"},
            "g_a": {"alias": "  - a", "acc,none": 1.0, "acc_stderr,none": 0.0},
            "g_b": {"alias": "  - b", "acc,none": 0.25, "acc_stderr,none": 0.16},
            "g_c": {"alias": " - c", "acc,none": 0.2, "acc_stderr,none": 0.13},
            "t": {"alias": "t", "acc,none": 0.5, "acc_norm,none": 0.75, "acc_norm_stderr,none": 0.2},
        },
        "group_subtasks": {"g": ["g_sci", "g_c"], "g_sci": ["g_a", "g_b"], "t": []},
        "n-samples": {"g_a": {"effective": 2}, "g_b": {"effective": 8}, "g_c": {"effective": 10},
                      "t": {"effective": 4}},
    }


def test_mmlu_macro_and_micro_on_unequal_subjects():
    avg = harness.subtask_averages(handmade_results(), "g")
    assert avg["sizes"] == {"g_a": 2, "g_b": 8, "g_c": 10}
    assert avg["macro"] == pytest.approx((1.0 + 0.25 + 0.2) / 3)               # 0.48333: subjects count equally
    assert avg["micro"] == pytest.approx((1.0 * 2 + 0.25 * 8 + 0.2 * 10) / 20)  # 0.3: questions count equally


def test_flatten_headlines_and_average():
    benches = [harness.Benchmark("mmlu", "g", 5, "acc", "macro", is_group=True),
               harness.Benchmark("arc", "t", 25, "acc_norm")]
    flat = harness.flatten(handmade_results(), benches)
    assert flat["mmlu"] == pytest.approx(0.48333333) and flat["mmlu/acc_micro"] == pytest.approx(0.3)
    assert flat["mmlu/a/acc"] == 1.0 and flat["mmlu/c/n"] == 10 and flat["mmlu/n_subtasks"] == 3
    assert flat["arc"] == 0.75 and flat["arc/acc"] == 0.5 and flat["arc/acc_norm_stderr"] == 0.2
    assert flat["average"] == pytest.approx((0.48333333 + 0.75) / 2)
    micro = harness.flatten(handmade_results(), [harness.Benchmark("mmlu", "g", 5, "acc", "micro", True)])
    assert micro["mmlu"] == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------- configs
def test_openllm_v1_protocol(compose):
    e = compose(["evaluate=openllm_v1"]).evaluate
    shots = {k: (e.benchmarks[k].task, e.benchmarks[k].num_fewshot, e.benchmarks[k].metric) for k in e.tasks}
    assert shots == {"arc_challenge": ("arc_challenge", 25, "acc_norm"), "hellaswag": ("hellaswag", 10, "acc_norm"),
                     "mmlu": ("mmlu", 5, "acc"), "truthfulqa_mc2": ("truthfulqa_mc2", 0, "acc")}
    assert e.benchmarks.mmlu.average == "macro" and e.include_defaults and e.batch_size == 1
    benches = harness.requested_benchmarks(compose(["evaluate=openllm_v1", "evaluate.num_fewshot=0"]).evaluate)
    assert {b.num_fewshot for b in benches} == {0}


def test_vllm_backend_uses_lm_eval_vllm_model_type(compose, monkeypatch):
    e = compose(["evaluate.backend=vllm", "evaluate.vllm.tensor_parallel_size=2", "evaluate.dtype=bfloat16"]).evaluate
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    model_type, args = harness.model_spec("/models/x", e)
    assert model_type == "vllm"
    assert args == {"pretrained": "/models/x", "dtype": "bfloat16", "tensor_parallel_size": 2,
                    "gpu_memory_utilization": 0.9, "seed": 1234}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(TeamsRLError, match="vllm"):
        harness.model_spec("/models/x", e)


def test_inputs_and_base_cache_key(compose, tmp_path):
    from teams_rl.pipeline import fingerprints, plan
    from teams_rl.stages import evaluate

    assert evaluate.STAGE.inputs_for(compose([])) == ["finetune", "evaluate_base"]
    assert evaluate.STAGE.inputs_for(compose([f"evaluate.model={tmp_path}", "evaluate.base_model=null"])) == []
    # the base result is keyed by the base model and eval settings only, never by the evaluated model
    a = compose(["stages=[evaluate]", f"evaluate.model={tmp_path}"])
    b = compose(["stages=[evaluate]", "evaluate.model=tiny_llama"])
    c = compose(["stages=[evaluate]", "evaluate.model=tiny_llama", "evaluate.limit=3"])
    assert plan(a) == ["evaluate_base", "evaluate"]
    fa, fb, fc = (fingerprints(x, plan(x)) for x in (a, b, c))
    assert fa["evaluate_base"] == fb["evaluate_base"] != fc["evaluate_base"]
    assert fa["evaluate"] != fb["evaluate"]


# --------------------------------------------------------------------------------------------- bad inputs
def test_unknown_task_is_one_line(compose):
    e = compose(["evaluate.tasks=[arc_chalenge_x]", "evaluate.benchmarks={}"]).evaluate
    with pytest.raises(TeamsRLError, match="unknown lm-eval task 'arc_chalenge_x'") as err:
        harness.resolve_benchmarks(harness.task_manager(e), harness.requested_benchmarks(e))
    assert "\n" not in str(err.value)


def test_unknown_task_fails_the_stage(compose, tmp_path, tiny_llama_dir):
    from teams_rl.pipeline import run_pipeline

    cfg = compose(["stages=[evaluate]", f"evaluate.model={tiny_llama_dir}", "evaluate.base_model=null",
                   "evaluate.tasks=[arc_challenge, offline_hellaswg]"])
    with pytest.raises(TeamsRLError, match=r"unknown lm-eval task 'offline_hellaswg'.*did you mean offline_hellaswag"):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.parametrize("key", ["evaluate.model", "evaluate.base_model"])
def test_missing_model_path_fails_before_anything_runs(compose, tmp_path, key):
    from teams_rl.pipeline import run_pipeline

    cfg = compose(["stages=[evaluate]", "evaluate.model=tiny_llama", f"{key}=/nonexistent/model"])
    with pytest.raises(TeamsRLError, match=f"{key}: model path /nonexistent/model does not exist"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("manifest.json"))


# --------------------------------------------------------------------------------------------- running lm-eval
@pytest.mark.slow
def test_evaluate_stage_on_offline_tasks(compose, tmp_path, tiny_llama_dir, other_tiny):
    """Base (tiny_llama) and 'fine-tuned' (another seed) on all four offline benchmarks; the base result is
    reused when only the evaluated model changes."""
    from teams_rl.pipeline import run_pipeline

    common = ["stages=[evaluate]", "evaluate=offline", f"evaluate.base_model={tiny_llama_dir}", "evaluate.num_fewshot=0"]
    result = run_pipeline(compose(common + [f"evaluate.model={other_tiny}"]), tmp_path / "run1")
    base, ev = result["evaluate_base"], result["evaluate"]
    for key in OFFLINE_KEYS:
        assert 0.0 <= ev[f"finetuned/{key}"] <= 1.0
        assert ev[f"delta/{key}"] == pytest.approx(ev[f"finetuned/{key}"] - base[key])
    assert ev["finetuned/arc_challenge"] == ev["finetuned/arc_challenge/acc_norm"]
    assert ev["finetuned/arc_challenge/n"] == 40 and ev["finetuned/mmlu/n_subtasks"] == 4
    assert ev["finetuned/average"] == pytest.approx(sum(ev[f"finetuned/{k}"] for k in OFFLINE_KEYS) / 4)
    assert ev["finetuned/mmlu/acc_micro"] == pytest.approx(ev["finetuned/mmlu/acc"])   # lm-eval's group number
    sizes = [ev[f"finetuned/mmlu/{s}/n"] for s in ("astronomy", "high_school_geography", "elementary_mathematics", "nutrition")]
    assert sizes == [8, 12, 16, 20]
    assert any(ev[f"delta/{k}"] != 0 for k in OFFLINE_KEYS)

    folder = stage_folder(tmp_path / "run1", "evaluate")
    lm = json.loads((folder / "lm_eval_results.json").read_text())
    assert lm["n-shot"]["offline_arc_challenge"] == 0 and lm["n-shot"]["offline_truthfulqa_mc2"] == 0
    assert lm["results"]["offline_hellaswag"]["acc_norm,none"] == ev["finetuned/hellaswag"]
    settings = json.loads((folder / "eval_settings.json").read_text())
    assert settings["lm_eval_version"] == "0.4.13" and settings["dtype"] == "float32"
    assert json.loads((folder / "metrics.json").read_text()) == ev
    assert "| average |" in (folder / "comparison.md").read_text()

    again = run_pipeline(compose(common + [f"evaluate.model={tiny_llama_dir}"]), tmp_path / "run2")
    manifest = json.loads((tmp_path / "run2" / "run_manifest.json").read_text())
    assert manifest["stages"]["evaluate_base"]["status"] == "cached"
    assert all(again["evaluate"][f"delta/{k}"] == 0 for k in OFFLINE_KEYS + ["average"])


def test_shared_prefix_scoring_gives_lm_eval_s_scores_with_the_primer_run_once(compose, tiny_llama_dir):
    """TruthfulQA mc2's requests all start with its six-question primer: the `teams_rl_hf` model runs it once per
    batch, and every score equals lm-eval's own `hf` model's up to float rounding (also 1-shot ARC, whose
    contexts share nothing, so it takes the plain path)."""
    from teams_rl.eval.shared_prefix_lm import SharedPrefixHFLM

    settings = ["evaluate.tasks=[truthfulqa_mc2,arc_challenge]", "evaluate.num_fewshot=1", "evaluate.limit=4",
                "evaluate.batch_size=8"]
    scores = {}
    for shared in (False, True):
        cfg = compose([*settings, f"evaluate.shared_prefix={str(shared).lower()}"])
        before = SharedPrefixHFLM.prefix_tokens_saved
        results, benches = harness.run_lm_eval(tiny_llama_dir, cfg.evaluate)
        saved = SharedPrefixHFLM.prefix_tokens_saved - before
        scores[shared] = harness.flatten(results, benches)
        assert (saved > 100 * 4) if shared else saved == 0   # ~190 primer tokens per extra row of a batch
    assert set(scores[True]) == set(scores[False]) and len(scores[True]) >= 6
    assert scores[True] == pytest.approx(scores[False], abs=1e-5)


@pytest.mark.slow
def test_stage_metrics_equal_lm_eval_cli(compose, tmp_path, tiny_llama_dir):
    """The same model and settings through `lm_eval` (its own CLI, in a subprocess) give the same numbers."""
    from teams_rl.pipeline import run_pipeline

    settings = ["evaluate.num_fewshot=1", "evaluate.limit=8", "evaluate.batch_size=8"]
    cfg = compose(["stages=[evaluate]", f"evaluate.model={tiny_llama_dir}", "evaluate.base_model=null", *settings,
                   "evaluate.shared_prefix=false"])   # lm-eval's own `hf` model, bit for bit
    ours = run_pipeline(cfg, tmp_path / "run")["evaluate"]
    tasks = [cfg.evaluate.benchmarks[k].task for k in OFFLINE_KEYS]
    cli_out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={tiny_llama_dir},dtype=float32", "--include_path", str(harness.TASKS_DIR),
         "--tasks", ",".join(tasks), "--num_fewshot", "1", "--limit", "8", "--batch_size", "8",
         "--device", "cpu", "--output_path", str(cli_out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = json.loads(next(cli_out.rglob("results_*.json")).read_text())
    stage = json.loads((stage_folder(tmp_path / "run", "evaluate") / "lm_eval_results.json").read_text())
    compared = 0
    for task, entry in cli["results"].items():
        for metric, value in entry.items():
            if "," in metric and isinstance(value, float):
                assert stage["results"][task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
                compared += 1
    assert compared >= 14
    benches = harness.resolve_benchmarks(harness.task_manager(cfg.evaluate), harness.requested_benchmarks(cfg.evaluate))
    expected = harness.flatten(cli, benches)
    assert {f"finetuned/{k}": v for k, v in expected.items()} == pytest.approx(ours)
