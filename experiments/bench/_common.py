"""What every benchmark shares: this machine's figures (quoted next to every time) and the loopback server
run as its own process (so client and server do not share one GIL)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
SLOWEST_FP32_GFLOPS = 58.6  # the slowest machine of this kind seen (2 cores, no AVX512)


def _gflops(dtype, n: int = 1024, reps: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def machine() -> dict:
    """CPU matmul speed (fp32, bf16 GFLOPS) with torch's threads, the load, the date: the context a time needs."""
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    fp32 = _gflops(torch.float32)
    return {"date": date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags),
            "fp32_gflops": round(fp32, 1),
            "bf16_gflops": round(_gflops(torch.bfloat16, reps=3 if "avx512_bf16" not in flags else 20), 1),
            "times_faster_than_slowest_seen_fp32": round(fp32 / SLOWEST_FP32_GFLOPS, 2),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


class ServerProcess:
    """tests/loopback_server.py in a child process (it exits when we close its stdin)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "loopback_server.py"),
                                      "--max-lifetime-s", "3600", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self, since: int = 0) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats?since={since}", timeout=30) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
