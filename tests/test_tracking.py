"""wandb tracking: one offline run per stage, secrets redacted, JSON metrics without wandb."""

from __future__ import annotations

import json
import os

import pytest

from teams_rl.pipeline import run_pipeline
from teams_rl.tracking import REDACTED, redact
from tests.fakes import rule_llm_overrides


def test_redact_hides_secret_values_but_keeps_env_var_names():
    cfg = {"expert": {"backend": {"api_key": "sk-abc", "api_key_env": "OPENAI_API_KEY", "model": "gpt"}},
           "hf_token": "hf_xyz", "nested": [{"password": "p"}], "tokenizer": "keep"}
    out = redact(cfg)
    assert out["expert"]["backend"]["api_key"] == REDACTED
    assert out["expert"]["backend"]["api_key_env"] == "OPENAI_API_KEY"
    assert out["hf_token"] == REDACTED and out["nested"][0]["password"] == REDACTED
    assert out["tokenizer"] == "keep" and out["expert"]["backend"]["model"] == "gpt"


def test_metrics_are_written_as_json_without_wandb(compose, tmp_path):
    run_pipeline(compose(["stages=[llm_check]", *rule_llm_overrides()]), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics" / "llm_check.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["llm_check/all_reachable"] is True
    assert rows[0]["llm_check/expert/answered"] == 4
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_writes_one_run_per_stage(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["stages=[llm_check]", "logger=wandb", "experiment_name=trk", *rule_llm_overrides()])
    run_pipeline(cfg, tmp_path / "run")
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(f.suffix == ".wandb" for f in runs[0].iterdir())
    assert os.environ["WANDB_MODE"] == "offline"
