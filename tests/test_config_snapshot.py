"""The composed experiment configs equal a committed snapshot, so a refactor of conf/ cannot change a run.

An intentional change updates the snapshot in the same commit, and the commit message names it:
    TEAMS_RL_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/test_config_snapshot.py
"""

from __future__ import annotations

import os

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

SNAPSHOT = CONF_DIR.parent / "tests" / "snapshots" / "composed_configs.yaml"
EXPERIMENTS = ("llama7b", "smoke", "wizardlm_baseline")


def composed(name: str) -> dict:
    """`python -m teams_rl +experiment=NAME` as composed, before interpolations are resolved (so the snapshot
    does not depend on the machine's environment variables)."""
    from hydra import compose, initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=[f"+experiment={name}"]), resolve=False)


def test_experiments_compose_to_the_snapshot():
    now = {name: composed(name) for name in EXPERIMENTS}
    if os.environ.get("TEAMS_RL_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text("# Written by tests/test_config_snapshot.py; see its docstring.\n"
                            + yaml.safe_dump(now, sort_keys=True, width=120))
        pytest.skip("snapshot rewritten")
    expected = yaml.safe_load(SNAPSHOT.read_text())
    for name in EXPERIMENTS:
        assert now[name] == expected[name], f"+experiment={name} composes differently from {SNAPSHOT.name}"
