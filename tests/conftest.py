"""Shared fixtures: offline environment, composed configs with temporary artifact folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["WANDB_MODE"] = os.environ.get("TEST_WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on a 2-core machine: torch's default thread pool per worker oversubscribes the
    # cores and runs many times slower (measured 4.3 s vs 0.25 s for a SmolLM2 batch-8 step).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The embedded default is a real run (SmolLM2 target, 12+ policy updates, ~50 seeds: minutes). Tests run the
# same code at the scale below unless they select an experiment or set the key themselves;
# `compose_config(..., scale=False)` composes the true default.
TEST_SCALE = {"target": "tiny_llama", "rl": "trpo", "seeds.limit": "8", "generate.heldout_seeds": "null",
              "policy.updates": "3", "policy.n_envs": "8", "policy.steps_per_update": "2", "policy.max_tokens": "32",
              "stages": "[policy,generate,finetune,evaluate,privacy,report]",
              # the fake LLMs (tests/generate_fakes.py, evol_fakes.py) read the paper wording's "#Given Prompt#:"
              "operators": "teams_rl", "generate": "default"}   # and generate=demo's rules need 2+ steps


def scaled_down(overrides) -> list[str]:
    """TEST_SCALE's overrides for the keys `overrides` leave alone (none when an experiment is selected)."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if any(key.startswith("experiment") for key in given):
        return []
    return [f"{k}={v}" for k, v in TEST_SCALE.items() if k not in given]


def compose_config(overrides: list[str] = (), artifacts: Path | None = None, config_name: str = "config",
                   scale: bool = True):
    """The config `python -m teams_rl <overrides>` would run (at TEST_SCALE unless `scale=False`), with wandb off
    and artifacts in `artifacts`."""
    from hydra import compose, initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    extra = ["logger=none"] + (scaled_down(overrides) if scale else [])
    if artifacts is not None:
        extra.append(f"paths.artifacts={artifacts}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=extra + list(overrides))


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> cfg whose artifacts live under this test's tmp_path."""

    def _compose(overrides=(), artifacts=None):
        return compose_config(overrides, artifacts or tmp_path / "artifacts")

    return _compose


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op torch thread per test: tiny models are overhead-bound, and with two xdist workers on two
    cores a second thread per worker makes steps many times slower (measured up to ~50x under contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> str:
    """The `tiny_llama` checkpoint materialised once in the model cache."""
    from teams_rl.models import resolve_model

    return resolve_model("tiny_llama")
