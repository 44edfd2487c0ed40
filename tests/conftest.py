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


def compose_config(overrides: list[str] = (), artifacts: Path | None = None, config_name: str = "config"):
    """The config `python -m teams_rl <overrides>` would run, with wandb off and artifacts in `artifacts`."""
    from hydra import compose, initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    extra = ["logger=none"]
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
