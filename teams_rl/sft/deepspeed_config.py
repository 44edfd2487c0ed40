"""`conf/deepspeed/*` -> the dict that `TrainingArguments(deepspeed=...)` takes.

Each YAML file is a DeepSpeed JSON config written as YAML; `none` is empty (no DeepSpeed). "auto" values stay
"auto": the HF Trainer fills them from its own arguments (batch sizes, accumulation, clipping, optimizer
hyper-parameters, fp16/bf16) and from the model (ZeRO bucket sizes), so one file serves every target.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from teams_rl.errors import TeamsRLError


def render(node) -> dict | None:
    """The resolved DeepSpeed config as a plain dict, or None when the group is empty (`deepspeed=none`)."""
    if node is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    ds = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else copy.deepcopy(dict(node))
    return ds or None


def zero_stage(ds: dict | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def _offload_device(ds: dict, which: str) -> str:
    return str(((ds.get("zero_optimization") or {}).get(which) or {}).get("device", "none"))


def offloads(ds: dict | None) -> list[str]:
    """Which ZeRO state is offloaded to host memory: a subset of ["optimizer", "param"]."""
    if not ds:
        return []
    return [w for w in ("optimizer", "param") if _offload_device(ds, f"offload_{w}") not in ("none", "None")]


def for_device(ds: dict | None, on_cpu: bool) -> dict | None:
    """A copy adjusted for the device: on a CPU, DeepSpeed runs in fp32 (bf16 matmuls are ~60x slower there and
    fp16 is unsupported), without communication overlap and without pinned memory (no CUDA host allocator)."""
    if not ds:
        return None
    ds = copy.deepcopy(ds)
    if on_cpu:
        for key in ("fp16", "bf16"):
            ds[key] = {**(ds.get(key) or {}), "enabled": False}
        zero = ds.setdefault("zero_optimization", {})
        zero["overlap_comm"] = False
        for which in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(which), dict):
                zero[which]["pin_memory"] = False
    return ds


def toolchain_reason(ds: dict | None, on_cpu: bool) -> str | None:
    """Why this run will JIT-compile DeepSpeed C++ ops, or None when it will not."""
    if not ds:
        return None
    if "optimizer" in offloads(ds):
        return "ZeRO-Offload of the optimizer JIT-compiles DeepSpeed's cpu_adam op"
    if "optimizer" in ds:
        return "a DeepSpeed-side optimizer JIT-compiles DeepSpeed's fused Adam op"
    if on_cpu:
        return "DeepSpeed on a CPU JIT-compiles its shm_comm op"
    return None


def check_toolchain(ds: dict | None, on_cpu: bool) -> None:
    """Fail with one line before any work when the config needs a C++ toolchain this machine lacks.

    torch builds extensions with `$CXX` (default `c++`), `ninja` and the Python headers. A `ninja` installed in
    this interpreter's environment but not on PATH is put on PATH for the build.
    """
    reason = toolchain_reason(ds, on_cpu)
    if reason is None:
        return
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx})")
    if shutil.which("ninja") is None:
        venv_bin = Path(sys.executable).parent
        if (venv_bin / "ninja").is_file():
            os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        else:
            missing.append("ninja")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("the Python headers (Python.h)")
    if missing:
        raise TeamsRLError(f"{describe(ds)}: {reason}, which needs {', '.join(missing)}; install them "
                           "(e.g. apt-get install g++ python3-dev) or choose deepspeed=none")


def describe(ds: dict | None) -> str:
    """A short name for messages: 'no DeepSpeed', 'DeepSpeed ZeRO-3 (offload optimizer+param)'."""
    if not ds:
        return "no DeepSpeed"
    off = offloads(ds)
    return f"DeepSpeed ZeRO-{zero_stage(ds)}" + (f" (offload {'+'.join(off)})" if off else "")
