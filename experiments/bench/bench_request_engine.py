"""Request engine: `OpenAIBackend` throughput against a 100 ms OpenAI-compatible server vs the official code's loop.

Engine: 2,000 distinct requests through `LLMClient` (no cache) -> `OpenAIBackend` with max_concurrency 64,
against the loopback server (tests/loopback_server.py, run as its own process so that client and server do
not share one GIL) answering every request after 100 ms. The ideal is concurrency / latency = 640 requests/s;
the target is >= 0.9 of it. `client.complete` streams all 2,000 requests through the client's scheduler with
at most `max_concurrency` in flight (an async backend is never sent in chunks: each finished request frees its
slot for the next). Repeated `--repeats` times; the fastest run counts (other processes may share the CPU) and
every run is reported.
Baseline: the official TeaMs-RL expert loop, one request at a time with the sync `openai.OpenAI` client and
`time.sleep(2)` before each call, on 20 requests against the same server.
Writes experiments/bench/results/request_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from teams_rl.llm.client import LLMClient
from teams_rl.llm.openai_backend import OpenAIBackend
from teams_rl.llm.types import ChatRequest

REPO = Path(__file__).resolve().parents[2]
RESULT = Path(__file__).resolve().parent / "results" / "request_engine.json"
KEY_ENV = "TEAMS_RL_BENCH_KEY"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ServerProcess:
    """tests/loopback_server.py in a child process; it exits when we close its stdin."""

    def __init__(self, latency_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "loopback_server.py"), "--latency-s", str(latency_s),
             "--max-lifetime-s", "900"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _autogroup() -> str | None:
    """The CPU share group of this process ("/autogroup-N nice K" on Linux), reported next to the numbers."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def engine_run(backend: OpenAIBackend, n: int, run: str) -> dict:
    client = LLMClient("expert", backend, cache=None)
    requests = [ChatRequest.chat(f"Rewrite instruction {run}-{i} to be more specific.", max_tokens=64,
                                 temperature=0.7, top_p=0.95, seed=i, purpose="evolve") for i in range(n)]
    retries_before = backend.stats.retries
    cpu0, start = cpu_seconds(), time.perf_counter()
    answers = client.complete(requests)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise SystemExit(f"{len(failed)} engine requests failed, e.g. {failed[0]}")
    latencies = np.array([a.latency_s for a in answers])
    return {"seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 1),
            "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p99_s": round(float(np.percentile(latencies, 99)), 4),
            "retries": backend.stats.retries - retries_before}


def baseline_run(base_url: str, n: int, sleep_s: float) -> dict:
    """The official code's pattern: sleep, then one blocking chat completion, one request at a time."""
    import openai

    client = openai.OpenAI(api_key=os.environ[KEY_ENV], base_url=base_url)
    start = time.perf_counter()
    for i in range(n):
        time.sleep(sleep_s)
        response = client.chat.completions.create(
            model="loopback-model", max_tokens=64, temperature=0.7, top_p=0.95,
            messages=[{"role": "user", "content": f"Rewrite instruction {i} to be more specific."}])
        assert response.choices[0].message.content.startswith("echo:")
    seconds = time.perf_counter() - start
    client.close()
    return {"seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-s", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-requests", type=int, default=20)
    parser.add_argument("--baseline-sleep-s", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-bench-loopback")

    server = ServerProcess(args.latency_s)
    try:
        backend = OpenAIBackend("loopback-model", base_url=server.base_url, api_key_env=KEY_ENV,
                                max_concurrency=args.concurrency, timeout_s=30, progress=False)
        backend.complete([ChatRequest.chat(f"warm-up {i}") for i in range(args.concurrency)])
        runs: list[dict] = []
        for run in range(args.repeats):
            runs.append(engine_run(backend, args.requests, str(run)))
            print(f"engine run {run + 1}/{args.repeats}: {runs[-1]}", flush=True)
        server_stats = server.stats()
        backend.close()
        print(f"baseline: {args.baseline_requests} requests, sleep {args.baseline_sleep_s} s before each ...",
              flush=True)
        baseline = baseline_run(server.base_url, args.baseline_requests, args.baseline_sleep_s)
    finally:
        server.close()

    ideal = args.concurrency / args.latency_s
    best = max(runs, key=lambda x: x["requests_per_s"])
    result = {
        "setup": {"requests": args.requests, "concurrency": args.concurrency, "server_latency_s": args.latency_s,
                  "repeats": args.repeats, "baseline_requests": args.baseline_requests,
                  "baseline_sleep_s": args.baseline_sleep_s, "cpus": os.cpu_count(),
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "niceness": os.nice(0),
                  "autogroup": _autogroup(), "python": platform.python_version()},
        "ideal_requests_per_s": ideal,
        "engine": {**best, "fraction_of_ideal": round(best["requests_per_s"] / ideal, 3),
                   "runs": runs, "server_max_in_flight": server_stats["max_in_flight"]},
        "baseline": baseline,
        "speedup_vs_baseline": round(best["requests_per_s"] / baseline["requests_per_s"], 1),
        "target_fraction_of_ideal": 0.9,
    }
    result["target_met"] = result["engine"]["fraction_of_ideal"] >= 0.9
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nengine:   {best['requests_per_s']:.1f} requests/s = {result['engine']['fraction_of_ideal']:.3f} of the "
          f"ideal {ideal:.0f}/s (target 0.9; server peak in flight {server_stats['max_in_flight']}; "
          f"client CPU {best['client_cpu_ms_per_request']} ms/request)")
    print(f"baseline: {baseline['requests_per_s']:.4f} requests/s (sleep {args.baseline_sleep_s} s + one call at a time)")
    print(f"ratio:    {result['speedup_vs_baseline']}x the official loop's rate")
    print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
