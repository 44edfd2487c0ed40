"""Every config composes; bad overrides fail with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, REPO, compose_config

# Groups whose options are selected with `group=option`; `llm` and `role` are what the role groups
# (instructor, reviewer, expert: registered by teams_rl.config_groups) are made of.
LIBRARY_GROUPS = {"llm", "role", "experiment", "hydra"}


def group_options() -> list[tuple[str, str]]:
    from teams_rl.config_groups import ROLES

    pairs = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in LIBRARY_GROUPS):
        for option in sorted(group.glob("*.yaml")):
            pairs.append((group.name, option.stem))
    presets = sorted(p.stem for p in (CONF_DIR / "llm").glob("*.yaml"))
    return pairs + [(role, preset) for role in ROLES for preset in presets]


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_option_composes(group, option, tmp_path):
    if group == "method":
        pytest.skip("method options are @package _global_ and go with +experiment=budget_matched[_small] "
                    "(tests/test_budget_matched.py)")
    cfg = compose_config([f"{group}={option}"], tmp_path)
    node = OmegaConf.select(cfg, group)
    assert node is not None
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_config([f"+experiment={name}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["experiment_name"] == name
    assert resolved["stages"], "an experiment must run at least one stage"


def test_role_configs_have_backend_sampling_price_budget(tmp_path):
    for role in ("instructor", "reviewer", "expert"):
        for option in sorted(p.stem for p in (CONF_DIR / role).glob("*.yaml")):
            node = compose_config([f"{role}={option}"], tmp_path)[role]
            assert node.backend._target_.startswith("teams_rl.llm.")
            assert {"sampling", "price", "budget"} <= set(node.keys())
    reviewer = compose_config(["reviewer=openai_gpt4"], tmp_path).reviewer
    assert reviewer.sampling.temperature == 0.0  # the judge is greedy
    expert = compose_config(["expert=openai_gpt4"], tmp_path).expert
    assert expert.backend.model == "gpt-4-1106-preview"
    assert (expert.sampling.temperature, expert.sampling.top_p, expert.sampling.max_tokens) == (0.7, 0.95, 2048)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "teams_rl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_group_option_fails_clearly(tmp_path):
    proc = run_cli("instructor=nope", f"paths.artifacts={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0
    assert "Could not find 'instructor/nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_stage_fails_with_one_line(tmp_path):
    proc = run_cli("stages=[nope]", "logger=none", f"paths.artifacts={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: unknown stage 'nope' (available: ")
    assert "llm_check" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_the_embedded_default_is_a_real_run():
    """`python -m teams_rl` as shipped (not the tests' scale): SmolLM2 fine-tuned, >= 12 policy updates against a
    random-operator baseline of the same budget, 36 training seeds and 22 non-member seeds x 3 steps."""
    cfg = compose_config([], scale=False)
    assert cfg.target.model == "smollm2" and cfg.expert.backend.model == "smollm2"
    assert cfg.policy.updates >= 12 and list(cfg.stages)[:3] == ["policy", "policy_baseline", "generate"]
    assert cfg.seeds.limit == 36 and cfg.generate.heldout_seeds == 22 and cfg.generate.episode_length == 3
    assert cfg.seeds.limit * 3 >= 64 and cfg.generate.heldout_seeds * 3 >= 32  # before the filters' drops
