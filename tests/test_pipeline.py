"""The stage cache: reuse, redo of unfinished work, fingerprints, budgets, run manifests, multiruns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from teams_rl.artifacts import MANIFEST
from teams_rl.errors import BudgetExceeded
from teams_rl.pipeline import fingerprints, plan, run_pipeline
from tests.conftest import REPO
from tests.fakes import RuleBackend, rule_llm_overrides

LLM_CHECK = ["stages=[llm_check]", *rule_llm_overrides()]
# A cheap cacheable stage: one update of a random policy over rule-based instructor and reviewer.
POLICY = ["stages=[policy]", *rule_llm_overrides(("instructor", "reviewer")), "rl=random", "reward=reviewer_judge",
          "policy.updates=1", "policy.n_envs=2", "policy.steps_per_update=2", "policy.progress=false"]


def fp(cfg, stage="llm_check"):
    return fingerprints(cfg, plan(cfg))[stage]


def sent_queries() -> int:
    return sum(b.queries for b in RuleBackend.instances)


def test_finished_stage_is_reused_without_any_query(compose, tmp_path):
    cfg = compose(POLICY)
    RuleBackend.instances.clear()
    first = run_pipeline(cfg, tmp_path / "run1")
    sent = sent_queries()
    manifest = json.loads((tmp_path / "run1" / "run_manifest.json").read_text())
    assert manifest["stages"]["policy"]["status"] == "ran"
    llm = manifest["llm"]
    assert llm["instructor"]["queries"] == 4 and sent == 4 + llm["reviewer"]["queries"] > 4

    RuleBackend.instances.clear()
    second = run_pipeline(cfg, tmp_path / "run2")
    assert sent_queries() == 0
    assert second == first
    manifest = json.loads((tmp_path / "run2" / "run_manifest.json").read_text())
    assert manifest["stages"]["policy"]["status"] == "cached"
    assert manifest["llm"] == {}


def test_llm_check_is_never_served_from_the_cache(compose, tmp_path):
    """A reachability check from yesterday says nothing about today: llm_check always asks again."""
    cfg = compose(LLM_CHECK)
    RuleBackend.instances.clear()
    run_pipeline(cfg, tmp_path / "run1")
    # One backend serves the 3 roles. The expert asks exactly what the instructor asked, so it is served by
    # the request cache; the greedy reviewer's requests differ (temperature 0) and are sent.
    assert sent_queries() == 8
    run_pipeline(cfg, tmp_path / "run2")
    manifest = json.loads((tmp_path / "run2" / "run_manifest.json").read_text())
    assert manifest["stages"]["llm_check"]["status"] == "ran"
    assert manifest["llm"]["instructor"]["cache_hits"] == 4  # asked again (answered by the request cache)


def test_stage_manifest_records_config_accounting_and_versions(compose, tmp_path):
    cfg = compose(LLM_CHECK)
    run_pipeline(cfg, tmp_path / "run")
    folder = tmp_path / "artifacts" / "llm_check" / fp(cfg)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["fingerprint"] == fp(cfg)
    assert manifest["config"]["llm_check"]["requests_per_role"] == 4
    assert manifest["llm"]["instructor"]["by_purpose"]["check"]["queries"] == 4
    assert manifest["versions"]["torch"] == "2.13.0+cpu" or manifest["versions"]["torch"].startswith("2.13.0")
    assert (folder / "llm_check.md").read_text().startswith("| role |")
    run_dir = tmp_path / "run"
    assert (run_dir / "config.resolved.yaml").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["llm_check"]["all_reachable"] is True


def test_unfinished_folder_is_redone_not_trusted(compose, tmp_path):
    cfg = compose(LLM_CHECK)
    folder = tmp_path / "artifacts" / "llm_check" / fp(cfg)
    folder.mkdir(parents=True)
    (folder / "half_written.txt").write_text("from a killed run")
    RuleBackend.instances.clear()
    run_pipeline(cfg, tmp_path / "run")
    assert sent_queries() == 8
    assert not (folder / "half_written.txt").exists()
    assert (folder / MANIFEST).is_file()


def test_fingerprint_tracks_relevant_keys_only(compose):
    base = fp(compose(LLM_CHECK))
    assert fp(compose([*LLM_CHECK, "llm_check.requests_per_role=5"])) != base
    assert fp(compose([*LLM_CHECK, "expert.sampling.temperature=0.3"])) != base
    assert fp(compose([*LLM_CHECK, "expert.backend.model=other"])) != base
    # runtime-only settings never change what a stage computes
    assert fp(compose([*LLM_CHECK, "experiment_name=other"])) == base
    assert fp(compose([*LLM_CHECK, "logger=wandb"])) == base
    assert fp(compose([*LLM_CHECK, "expert.budget.max_queries=3"])) == base
    assert fp(compose([*LLM_CHECK, "paths.llm_cache=/elsewhere.sqlite"])) == base


def test_fingerprint_of_a_machine_chosen_precision_names_what_this_machine_chose(compose, monkeypatch):
    """`dtype: auto` and bf16 training resolve per machine: a bf16 machine's artifacts are not an fp32 one's."""
    from teams_rl import fast_dtype

    cfg = compose([])
    names = [*plan(cfg), "policy_baseline"]  # the baseline is planned beside the report
    monkeypatch.setattr(fast_dtype, "machine_precision", lambda cache_dir=None: "cpu:float32")
    fp32 = fingerprints(cfg, names)
    monkeypatch.setattr(fast_dtype, "machine_precision", lambda cache_dir=None: "cpu:bfloat16")
    bf16 = fingerprints(cfg, names)
    for name in ("policy", "policy_baseline", "generate", "finetune", "privacy"):
        assert fp32[name] != bf16[name], name
    assert fp32["evaluate_base"] == bf16["evaluate_base"]  # `evaluate.dtype: float32`, no input: the same work
    explicit = compose(["instructor.backend.dtype=float32"])
    on_bf16 = fingerprints(explicit, ["policy"])
    monkeypatch.setattr(fast_dtype, "machine_precision", lambda cache_dir=None: "cpu:float32")
    assert fingerprints(explicit, ["policy"]) == on_bf16  # an explicit dtype is the same work on every machine
    assert on_bf16["policy"] not in (fp32["policy"], bf16["policy"])


def test_precision_left_to_the_machine_is_found_anywhere_in_a_slice():
    from teams_rl.fast_dtype import depends_on_machine

    assert depends_on_machine({"instructor": {"backend": {"dtype": "auto"}}})
    assert depends_on_machine({"target": {"precision": "bf16"}}) and depends_on_machine([{"precision": "fp16"}])
    assert not depends_on_machine({"instructor": {"backend": {"dtype": "float32"}}, "target": {"precision": "fp32"}})
    assert not depends_on_machine({"note": "auto", "dtype": "bfloat16"})


def test_budget_stops_cleanly_and_rerun_resumes(compose, tmp_path):
    cfg = compose([*LLM_CHECK, "instructor.budget.max_queries=3"])
    RuleBackend.instances.clear()
    with pytest.raises(BudgetExceeded, match="max_queries=3"):
        run_pipeline(cfg, tmp_path / "run1")
    assert sent_queries() == 3
    manifest = json.loads((tmp_path / "run1" / "run_manifest.json").read_text())
    assert manifest["stopped"] == "budget"
    assert not (tmp_path / "artifacts" / "llm_check" / fp(cfg) / MANIFEST).exists()

    RuleBackend.instances.clear()
    run_pipeline(compose([*LLM_CHECK, "instructor.budget.max_queries=10"]), tmp_path / "run2")
    # the instructor's 3 answers from the stopped run come from the request cache: 1 more for it, then the
    # reviewer's 4 (it never ran); the expert repeats the instructor's requests and is served by the cache
    assert sent_queries() == 1 + 4


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "teams_rl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.slow
def test_budget_stop_is_one_line_and_exit_3(tmp_path):
    proc = _cli(*LLM_CHECK, "logger=none", "instructor.budget.max_queries=0", f"paths.artifacts={tmp_path}/a",
                f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: budget reached for role 'instructor': 0 of max_queries=0 queries sent")


@pytest.mark.slow
def test_multirun_of_two_jobs_computes_shared_stage_once(tmp_path):
    proc = _cli("-m", *POLICY, "logger=none", "experiment_name=job_a,job_b", f"paths.artifacts={tmp_path}/a",
                f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr
    statuses = []
    for job in ("0", "1"):
        manifest = json.loads((tmp_path / "sweep" / job / "run_manifest.json").read_text())
        statuses.append(manifest["stages"]["policy"]["status"])
    assert statuses == ["ran", "cached"]
    assert len(list((tmp_path / "a" / "policy").glob("*/manifest.json"))) == 1


def test_a_user_given_input_file_counts_by_content(compose, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    overrides = ["stages=[finetune]", f"finetune.dataset={data}"]
    before = fp(compose(overrides), "finetune")
    assert fp(compose(overrides), "finetune") == before
    data.write_text('[{"instruction": "a", "input": "", "output": "c"}]')
    assert fp(compose(overrides), "finetune") != before
