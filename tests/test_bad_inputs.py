"""Bad input never becomes a half-written result: each case ends with one line starting with `error:`, the
documented exit code (README "Errors"), no manifest written by that run and, for config errors, no stage
started at all. The run goes through `teams_rl.__main__.execute`, what `python -m teams_rl` calls; a few
cases also run the real command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from teams_rl.__main__ import execute
from tests.conftest import REPO
from tests.fakes import rule_llm_overrides
from tests.generate_fakes import fake_llm_overrides
from tests.loopback_server import LoopbackServer

CONFIG, BUDGET, LLM = 2, 3, 4  # the exit codes (teams_rl/__main__.py)
FAKE = fake_llm_overrides()
SMALL_GENERATE = ["stages=[generate]", "rl=fixed", "rl.schedule=[add_constraints]", "reward=reviewer_judge",
                  "policy.updates=1", "policy.n_envs=1", "policy.steps_per_update=1", "policy.progress=false",
                  "generate.progress=false", "generate.embedding_stats=false", "seeds.limit=3"]
GENERATE = FAKE + SMALL_GENERATE


def run_cli_like(compose, tmp_path: Path, overrides: list[str], capsys) -> tuple[int, str, Path]:
    """(exit code, the last stderr line, the artifacts folder) of `python -m teams_rl OVERRIDES`."""
    artifacts = tmp_path / "artifacts"
    cfg = compose(overrides, artifacts=artifacts)
    capsys.readouterr()
    code = execute(cfg, str(tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else ""), artifacts


def manifests(artifacts: Path) -> list[Path]:
    return sorted(artifacts.glob("*/*/manifest.json")) if artifacts.exists() else []


def stage_folders(artifacts: Path) -> list[Path]:
    return sorted(p for p in artifacts.glob("*/*") if p.is_dir()) if artifacts.exists() else []


def check(code: int, line: str, expected_code: int, message: str) -> None:
    assert code == expected_code, (code, line)
    assert line.startswith("error: ") and message in line, line


# ------------------------------------------------------------------------------------------------ config values

CONFIG_CASES = [
    (["seeds.limit=abc"], "seeds.limit must be an integer, got 'abc' (str)"),
    (["policy.updates=1.5"], "policy.updates must be a positive integer, got 1.5"),
    (["policy.updates=0"], "policy.updates must be a positive integer, got 0"),
    (["policy.n_envs=-2"], "policy.n_envs must be a positive integer, got -2"),
    (["generate.episode_length=0"], "generate.episode_length must be >= 1, got 0"),
    (["generate.episode_length=abc"], "generate.episode_length must be an integer, got 'abc'"),
    (["privacy.holdout_fraction=1.5"], "privacy.holdout_fraction must be 0.0 <= holdout_fraction < 1.0, got 1.5"),
    (["generate.holdout_fraction=-0.1"], "generate.holdout_fraction must be >= 0.0, got -0.1"),
    (["generate.max_failed_fraction=1.0"], "generate.max_failed_fraction must be 0.0 <= max_failed_fraction < 1.0"),
    (["+generate.rules.op_bias.shout=1"], "operator 'shout' is not in set 'teams_rl'"),
    (["rl=fixed", "rl.schedule=[deepening,shout]"], "rl.schedule names 'shout', which is not in the operator set"),
    (["generate.rules.forced_breadth_steps=[7]"], "generate.rules.forced_breadth_steps [7] outside 1..3"),
    (["generate.mode=chaos"], "generate.mode must be one of teams_rl, wizardlm, none, got 'chaos'"),
    (["generate.schedule=random"], "generate.schedule must be one of stream, barrier, got 'random'"),
    (["filters.rouge_l.threshold=2"], "filters.rouge_l.threshold must be in (0, 1], got 2.0"),
    (["privacy.k=0"], "privacy.k is the fraction of tokens min-k% averages: (0, 1], got 0"),
    (["privacy.attacks=[loss,shadow]"], "privacy.attacks: unknown shadow"),
    (["evaluate.batch_size=0"], "evaluate.batch_size must be >= 1, got 0"),
    (["target.learning_rate=fast"], "target.learning_rate must be a number, got 'fast' (str)"),
    (["finetune.batching=sorted"], "finetune.batching='sorted' is not one of grouped, packed, padded"),
    (["stages=[llm_check]", "llm_check.roles=[critic]"], "llm_check.roles: unknown role(s) critic"),
    (["dry_run.pilot=-1"], "dry_run.pilot must be >= 0, got -1"),
    (["policy.final_window=0"], "policy.final_window must be >= 1, got 0"),
    (["rl.algorithm=sac"], "rl.algorithm 'sac' is unknown"),
    (["stages=[polish]"], "unknown stage 'polish'"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[c[0][-1] for c in CONFIG_CASES])
def test_a_config_error_stops_before_any_stage(compose, tmp_path, capsys, overrides, message):
    code, line, artifacts = run_cli_like(compose, tmp_path, FAKE + overrides, capsys)
    check(code, line, CONFIG, message)
    assert not stage_folders(artifacts), "a stage started"


# ------------------------------------------------------------------------------------------------ files

def _seed_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "seeds.jsonl"
    if case == "missing":
        return tmp_path / "absent.jsonl"
    if case == "directory":
        (tmp_path / "a_folder").mkdir()
        return tmp_path / "a_folder"
    path.write_bytes({
        "empty": b"",
        "bad_line": b'{"instruction": "one two three"}\n{"instruction": "four"\n',
        "missing_field": b'{"instruction": "one two three"}\n{"prompt": "no instruction here"}\n',
        "not_utf8": b'{"instruction": "caf\xe9 au lait"}\n',
    }[case])
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "seed file {tmp}/absent.jsonl does not exist"),
    ("directory", "is a folder but not a `datasets` save_to_disk folder"),
    ("empty", "seeds.jsonl: file is empty"),
    ("bad_line", "seeds.jsonl:2: invalid JSON"),
    ("missing_field", "seeds.jsonl:2: missing field 'instruction'"),
    ("not_utf8", "seeds.jsonl: not UTF-8 text"),
])
def test_a_bad_seed_file_stops_before_any_stage(compose, tmp_path, capsys, case, message):
    path = _seed_file(tmp_path, case)
    code, line, artifacts = run_cli_like(compose, tmp_path, GENERATE + ["seeds=local_json", f"seeds.path={path}"],
                                         capsys)
    check(code, line, CONFIG, message.format(tmp=tmp_path))
    assert not stage_folders(artifacts)


@pytest.mark.parametrize("content, message", [
    ("[]", "finetune dataset {path} is empty"),
    ('[{"instruction": "a", "response": "b"}]', "train.json:1: missing field 'output'"),
])
def test_a_bad_finetune_dataset_is_one_line(compose, tmp_path, capsys, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    code, line, artifacts = run_cli_like(compose, tmp_path, ["stages=[finetune]", f"finetune.dataset={path}",
                                                             "target=tiny_llama"], capsys)
    check(code, line, CONFIG, message.format(path=path))
    assert not manifests(artifacts)


def test_a_missing_finetune_dataset_stops_before_any_stage(compose, tmp_path, capsys):
    code, line, artifacts = run_cli_like(compose, tmp_path, ["stages=[finetune]", "finetune.dataset=/nope.json"],
                                         capsys)
    check(code, line, CONFIG, "finetune.dataset /nope.json does not exist")
    assert not stage_folders(artifacts)


# ------------------------------------------------------------------------------------------------ checkpoints

def test_missing_and_truncated_checkpoints(compose, tmp_path, capsys, tiny_llama_dir):
    code, line, artifacts = run_cli_like(compose, tmp_path, ["stages=[evaluate]", "evaluate.model=/nope/ckpt"], capsys)
    check(code, line, CONFIG, "evaluate.model: model path /nope/ckpt does not exist")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, truncated)
    weights = next(truncated.glob("*.safetensors"))
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    code, line, artifacts = run_cli_like(compose, tmp_path, ["stages=[privacy]", f"privacy.model={truncated}",
                                                             "privacy.members=/nope.json"], capsys)
    check(code, line, CONFIG, "privacy.members: /nope.json does not exist")
    code, line, artifacts = run_cli_like(compose, tmp_path, ["stages=[evaluate]", f"evaluate.model={truncated}"],
                                         capsys)
    check(code, line, CONFIG, f"{weights.name} cannot be read")
    assert not stage_folders(artifacts)


def test_a_truncated_policy_checkpoint_is_one_line(compose, tmp_path, capsys):
    from teams_rl.errors import TeamsRLError
    from teams_rl.evol.agents import load_agent

    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "agent.json").write_text(json.dumps({"algorithm": "trpo", "operators": ["a"], "episode_length": 1}))
    (folder / "policy.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TeamsRLError, match="policy.zip: cannot load the trpo policy") as err:
        load_agent(folder)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ credentials

def test_a_missing_api_key_stops_before_any_stage(compose, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, line, artifacts = run_cli_like(compose, tmp_path, SMALL_GENERATE + rule_llm_overrides(("instructor", "reviewer"))
                                         + ["expert=openai_gpt4"], capsys)
    check(code, line, CONFIG, "environment variable OPENAI_API_KEY is not set (needed by role model gpt-4-1106-preview)")
    assert not stage_folders(artifacts)


def _server_expert(server, model: str = "loopback-model", outage_s: float = 1.0) -> list[str]:
    return ["expert=vllm_server", f"expert.backend.base_url={server.base_url}", f"expert.backend.model={model}",
            "expert.backend.api_key_env=TEAMS_RL_NO_KEY", "expert.backend.max_retries=1",
            "expert.backend.backoff_base_s=0.01", "expert.backend.backoff_max_s=0.02",
            f"expert.backend.max_outage_s={outage_s}", "expert.backend.timeout_s=2", "expert.backend.progress=false"]


def _generate_against(server, **kwargs) -> list[str]:
    return SMALL_GENERATE + rule_llm_overrides(("instructor", "reviewer")) + _server_expert(server, **kwargs)


@pytest.mark.parametrize("case, message", [
    ("unreachable", "expert requests failed (connection"),
    ("wrong_model", "expert requests failed (http_4xx"),
    ("empty", "expert requests failed (empty"),
])
def test_server_faults_stop_the_stage_without_a_manifest(compose, tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.delenv("TEAMS_RL_NO_KEY", raising=False)
    with LoopbackServer(responder="evol", known_models=("loopback-model",)) as server:
        if case == "empty":
            server.add_fault("empty", times=None)
        if case == "unreachable":
            server.outage(30, kind="refuse")
        overrides = _generate_against(server, model="gpt-4-typo" if case == "wrong_model" else "loopback-model")
        code, line, artifacts = run_cli_like(compose, tmp_path, overrides, capsys)
    check(code, line, LLM, message)
    assert "rerun to retry" in line
    if case == "wrong_model":
        assert "does not exist" in line  # the server's own message is quoted
    assert [m.parent.parent.name for m in manifests(artifacts)] == ["policy"]  # generate committed nothing


# ------------------------------------------------------------------------------------------------ LLM outputs and data

@pytest.mark.parametrize("style, message", [
    ("echo", "no record survived the filters (evolution_failed 3)"),
    ("verbose", "no record survived the filters (alpaca_length 3)"),
    ("refusal", "no record survived the filters (rule2_sorry_short_answer 3)"),
])
def test_outputs_that_are_never_data_stop_with_an_empty_dataset(compose, tmp_path, capsys, style, message):
    """The expert only echoes the template, writes 10x too long, or refuses: nothing survives, nothing is
    committed as a dataset."""
    overrides = GENERATE + [f"+expert.backend.style={style}", "generate.episode_length=1"]
    code, line, artifacts = run_cli_like(compose, tmp_path, overrides, capsys)
    check(code, line, CONFIG, message)
    assert [m.parent.parent.name for m in manifests(artifacts)] == ["policy"]


def test_a_budget_stop_is_exit_3_and_keeps_what_was_done(compose, tmp_path, capsys):
    code, line, artifacts = run_cli_like(compose, tmp_path, GENERATE + ["expert.budget.max_queries=2"], capsys)
    check(code, line, BUDGET, "budget reached for role 'expert': 2 of max_queries=2 queries sent")
    journal = next(artifacts.glob("generate/*/journal.jsonl"))
    assert len(journal.read_text().splitlines()) == 2  # the two answered requests are journaled
    assert [m.parent.parent.name for m in manifests(artifacts)] == ["policy"]


# ------------------------------------------------------------------------------------------------ the real command line

@pytest.mark.slow
def test_the_command_line_prints_one_error_line_and_exit_codes(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "teams_rl", "logger=none", f"paths.artifacts={tmp_path}/a",
                               f"hydra.run.dir={tmp_path}/run", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)

    bad_value = cli("seeds.limit=abc")
    assert bad_value.returncode == CONFIG
    assert bad_value.stderr.strip().splitlines()[-1] == "error: seeds.limit must be an integer, got 'abc' (str)"
    unknown_option = cli("rl=sac")  # Hydra's own composition error, as Hydra prints it
    assert unknown_option.returncode == 1 and "Could not find 'rl/sac'" in unknown_option.stderr
    assert not (tmp_path / "a").exists()


def test_llm_check_reports_a_dead_host_within_its_short_limits(compose, tmp_path, capsys, monkeypatch):
    """Nothing listens at the base_url: the check gives up after llm_check.max_outage_s (not the backend's
    minutes), writes its table and exits 4 naming the role."""
    from teams_rl.ports import free_port

    monkeypatch.delenv("TEAMS_RL_NO_KEY", raising=False)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    overrides = ["stages=[llm_check]", "llm_check.roles=[expert]", "llm_check.requests_per_role=2",
                 "llm_check.max_outage_s=1", "expert=vllm_server", f"expert.backend.base_url={dead}",
                 "expert.backend.api_key_env=TEAMS_RL_NO_KEY", "expert.backend.max_outage_s=300",
                 "expert.backend.backoff_max_s=0.2"]
    code, line, artifacts = run_cli_like(compose, tmp_path, overrides, capsys)
    check(code, line, LLM, f"llm_check: expert (WizardLMTeam/WizardLM-13B-V1.2 at {dead}) answered 0 of 2 (connection")
    table = (tmp_path / "run" / "llm_check.md").read_text()
    wall = float(table.splitlines()[2].split("|")[6])
    assert wall < 1 + 10  # the check's 1 s outage limit (+ one attempt's timeout), not the backend's 300 s
    assert not manifests(artifacts)
