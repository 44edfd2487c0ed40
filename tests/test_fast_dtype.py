"""`dtype: auto`: the CPU chooser times both dtypes once per machine and picks the faster; explicit dtypes pass."""

from __future__ import annotations

import json

import pytest

from teams_rl import fast_dtype
from teams_rl.errors import TeamsRLError


@pytest.fixture
def timer(monkeypatch):
    """A fake `time_matmul`: seconds per product by dtype (set `speeds`); records each dtype it timed."""
    calls = []
    speeds = {"float32": 0.01, "bfloat16": 0.01}

    def fake(dtype, *args, **kwargs):
        calls.append(dtype)
        return speeds[dtype]

    monkeypatch.setattr(fast_dtype, "time_matmul", fake)
    return speeds, calls


@pytest.mark.parametrize(("bf16_s", "expected"), [(0.0025, "bfloat16"),   # 4x faster (an AMX CPU)
                                                  (0.65, "float32"),      # 65x slower (emulated bf16)
                                                  (0.009, "float32")])    # 1.1x: within noise, keep fp32
def test_auto_on_cpu_picks_the_faster_and_measures_once(timer, tmp_path, bf16_s, expected):
    speeds, calls = timer
    speeds["bfloat16"] = bf16_s
    assert fast_dtype.resolve_dtype("auto", "cpu", tmp_path) == expected
    assert sorted(calls) == ["bfloat16", "float32"]
    assert fast_dtype.resolve_dtype("auto", "cpu", tmp_path) == expected
    assert len(calls) == 2  # the second call reads the cache file
    table = json.loads((tmp_path / fast_dtype.CACHE_FILE).read_text())
    entry = table[fast_dtype.machine_key()]
    flop = 2 * fast_dtype.SHAPE[0] * fast_dtype.SHAPE[1] * fast_dtype.SHAPE[2]
    assert entry["dtype"] == expected
    assert entry["gflops"] == {"float32": round(flop / 0.01 / 1e9, 2), "bfloat16": round(flop / bf16_s / 1e9, 2)}


def test_the_cache_is_keyed_by_thread_count(timer, tmp_path):
    import torch

    speeds, calls = timer
    before = torch.get_num_threads()
    fast_dtype.resolve_dtype("auto", "cpu", tmp_path)
    torch.set_num_threads(before + 1)
    try:
        speeds["bfloat16"] = 0.001
        assert fast_dtype.resolve_dtype("auto", "cpu", tmp_path) == "bfloat16"
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 4 and fast_dtype.resolve_dtype("auto", "cpu", tmp_path) == "float32"
    assert len(json.loads((tmp_path / fast_dtype.CACHE_FILE).read_text())) == 2


def test_explicit_dtypes_pass_through_and_bad_values_fail(timer, tmp_path, monkeypatch):
    _, calls = timer
    for name in ("float32", "bfloat16", "float16"):
        assert fast_dtype.resolve_dtype(name, "cpu", tmp_path) == name
        assert fast_dtype.resolve_dtype(name, "cuda", tmp_path) == name
    assert calls == [] and not (tmp_path / fast_dtype.CACHE_FILE).exists()
    for bad in ("fp32", "bf16", None, 32):
        with pytest.raises(TeamsRLError, match=r"^privacy.dtype must be one of auto, float32, bfloat16, float16, got"):
            fast_dtype.resolve_dtype(bad, "cpu", tmp_path, key="privacy.dtype")
    import torch

    for supported, expected in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert fast_dtype.resolve_dtype("auto", "cuda:0", tmp_path) == expected
    assert calls == []


def test_a_real_measurement_is_quick_and_sane(tmp_path):
    entry = fast_dtype.cpu_choice(tmp_path)
    assert entry["dtype"] in ("float32", "bfloat16")
    assert all(g > 0 for g in entry["gflops"].values())
    faster = max(entry["gflops"], key=entry["gflops"].get)
    assert entry["dtype"] == faster or entry["gflops"]["bfloat16"] < fast_dtype.MIN_GAIN * entry["gflops"]["float32"]


@pytest.mark.slow  # ~8 s: a pipeline run
def test_the_stage_manifest_records_the_dtype_each_role_ran_in(compose, tmp_path, tiny_llama_dir, monkeypatch):
    from pathlib import Path

    from teams_rl.pipeline import run_pipeline

    monkeypatch.setattr(fast_dtype, "cpu_choice", lambda cache_dir=None: {"dtype": "bfloat16"})  # an AMX machine
    cfg = compose(["stages=[llm_check]", "llm_check.roles=[reviewer]", "llm_check.requests_per_role=2",
                   "llm_check.max_tokens=2", f"reviewer.backend.model={tiny_llama_dir}", "reviewer.backend.dtype=auto",
                   "reviewer.backend.device=cpu"])
    run_pipeline(cfg, tmp_path / "run")
    stages = json.loads((tmp_path / "run" / "run_manifest.json").read_text())["stages"]
    manifest = json.loads((Path(stages["llm_check"]["folder"]) / "manifest.json").read_text())
    assert manifest["dtype"] == {"reviewer": "bfloat16"}
    assert manifest["llm"]["reviewer"]["model"] == f"hf/{tiny_llama_dir}?dtype=bfloat16"
