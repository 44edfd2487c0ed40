"""`dtype: auto` for inference: the faster of float32 and bfloat16 on this machine.

CPUs differ by three orders of magnitude in bf16: one 2-core CPU here ran fp32 matmuls at 58.6 GFLOPS and bf16
at 0.9 (no native bf16, every product is emulated); an AMX CPU ran fp32 at 348 and bf16 at 1,401. So on a CPU
`auto` times a matmul of a decode-sized shape in both dtypes once per machine (~1 s) and remembers the answer in
`<cache>/fast_dtype.json`, keyed by the CPU model, the torch version and the thread count (each changes the
answer). On CUDA `auto` is bfloat16 where the GPU supports it, else float16; elsewhere float32.
An explicit dtype is used as given.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from teams_rl.errors import TeamsRLError

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *DTYPES)
CACHE_FILE = "fast_dtype.json"
# (rows, inner, columns) of the timed product: a batch of 64 token rows through a 1024-wide projection, about
# what batched decoding of a small model multiplies. 134 MFLOP: ~1 ms in fp32, ~0.15 s in emulated bf16.
SHAPE = (64, 1024, 1024)
TIME_PER_DTYPE_S = 0.3   # each dtype is timed for about this long (at least one product after a warm-up)
# bf16 costs precision (8 bits of mantissa): it is chosen only when clearly faster, not within timing noise.
MIN_GAIN = 1.2


def check_dtype(value, key: str = "dtype") -> str:
    """`value` as a dtype name, or one error line naming `key`."""
    if not isinstance(value, str) or value not in CHOICES:
        raise TeamsRLError(f"{key} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def resolve_dtype(value, device: str, cache_dir: str | Path | None = None, key: str = "dtype") -> str:
    """The dtype to load a model in on `device` ('cpu', 'cuda', 'cuda:1', ...): `value` unless it is `auto`."""
    value = check_dtype(value, key)
    if value != "auto":
        return value
    if str(device).startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if str(device) == "cpu":
        return cpu_choice(cache_dir)["dtype"]
    return "float32"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    import torch

    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_matmul(dtype: str, shape: tuple[int, int, int] = SHAPE, seconds: float = TIME_PER_DTYPE_S) -> float:
    """Seconds per product of `shape` in `dtype`: the fastest of the products timed within `seconds`."""
    import torch

    m, k, n = shape
    a = torch.randn(m, k).to(getattr(torch, dtype))
    b = torch.randn(k, n).to(getattr(torch, dtype))
    a @ b  # warm-up: first-call allocation and kernel selection
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def matmul_flops(device: str, dtype: str, n: int, rounds: int = 5, iters: int = 10) -> float:
    """Measured dense FLOP/s of `device` in `dtype`: the best of `rounds` timings of `iters` n x n x n products
    (the peak a benchmark's MFU is read against when no spec sheet figure applies)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * iters / best


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_choice(cache_dir: str | Path | None = None) -> dict:
    """{"dtype", "gflops": {dtype: figure}, "measured_at"} for this machine: from the cache file, or measured
    now (once; concurrent processes wait for the one that measures) and stored."""
    from filelock import FileLock

    if cache_dir is None:
        from teams_rl.models import default_cache_dir

        cache_dir = default_cache_dir()
    path = Path(cache_dir) / CACHE_FILE
    key = machine_key()
    entry = _read(path).get(key)
    if isinstance(entry, dict) and entry.get("dtype") in DTYPES:
        return entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        table = _read(path)
        entry = table.get(key)
        if isinstance(entry, dict) and entry.get("dtype") in DTYPES:
            return entry
        flop = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2]
        gflops = {d: round(flop / time_matmul(d) / 1e9, 2) for d in ("float32", "bfloat16")}
        faster = gflops["bfloat16"] >= MIN_GAIN * gflops["float32"]
        entry = {"dtype": "bfloat16" if faster else "float32", "gflops": gflops, "shape": list(SHAPE),
                 "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        table[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return entry


def depends_on_machine(config: object) -> bool:
    """Whether a stage's resolved config slice leaves its numeric precision to the machine: a `dtype: auto`, or a
    `precision` of bf16/fp16 (a CPU trains bf16 only where measured faster, fp16 never; `teams_rl.sft.train`)."""
    if isinstance(config, dict):
        return any((key == "dtype" and value == "auto") or (key == "precision" and value in ("bf16", "fp16"))
                   or depends_on_machine(value) for key, value in config.items())
    if isinstance(config, list):
        return any(depends_on_machine(value) for value in config)
    return False


def machine_precision(cache_dir: str | Path | None = None) -> str:
    """What `auto` resolves to on this machine's default device ("cuda:bfloat16", "cpu:float32", ...): part of the
    fingerprint of a stage whose precision depends on the machine, so that an artifacts folder shared by a bf16 and
    an fp32 machine never hands one's outputs to the other."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{device}:{resolve_dtype('auto', device, cache_dir)}"
