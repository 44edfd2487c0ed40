"""Batched EvolutionVecEnv vs one env at a time, with the real SmolLM2 instructor on the CPU.

Both sides take the first step of the same N=8 episodes (same seeds, operator choices and per-request
sampling seeds) with the default reward (MiniLM novelty); the rounds alternate and the best of each is kept,
so that a change in machine load hits both sides alike. The batched VecEnv sends the 8 rewrite
prompts in one `complete` call per step; the baseline steps 8 separate envs, one prompt per call. The LLM
request cache is off, so every rewrite is generated. Prints env-steps/s of both and their ratio (target >= 3x)
and writes experiments/bench/results/vecenv.json.

    python experiments/bench/bench_vecenv.py [--n 8] [--repeats 2] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["logger=none"])


class CountingClient:
    """Counts `complete` calls (LLM round trips) made through the client."""

    def __init__(self, client):
        self.client = client
        self.calls = 0

    def complete(self, requests):
        self.calls += 1
        return self.client.complete(requests)

    def __getattr__(self, name):
        return getattr(self.client, name)


def build(cfg, n: int, max_tokens: int, prefix_cache: int | None = None):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from teams_rl.evol.env import EnvSettings, EvolutionVecEnv, make_envs
    from teams_rl.evol.observations import ObservationEncoder
    from teams_rl.evol.operators import load_operator_set
    from teams_rl.evol.rewards import build_reward
    from teams_rl.evol.seeds import load_seeds
    from teams_rl.llm.client import LLMClient

    extra = {} if prefix_cache is None else {"prefix_cache": prefix_cache}
    backend = instantiate(OmegaConf.to_container(cfg.instructor.backend, resolve=True), show_progress=False, **extra)
    client = CountingClient(LLMClient("instructor", backend, cache=None,
                                      sampling=OmegaConf.to_container(cfg.instructor.sampling, resolve=True)))
    opset = load_operator_set(cfg.operators)
    seeds = load_seeds(cfg.seeds)
    reward = build_reward(cfg.reward)
    encoder = ObservationEncoder("last_op", len(opset), 6)
    settings = EnvSettings(episode_length=6, max_tokens=max_tokens, seed=0)
    return client, lambda: make_envs(n, client, opset, seeds, reward, encoder, settings), EvolutionVecEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating batched / one-at-a-time rounds")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: policy.max_tokens of the config")
    parser.add_argument("--prefix-cache", type=int, default=None,
                        help="the hf backend's prefix KV cache entries (default: the config's; 0 = off)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from teams_rl.evol.embeddings import encode
    from teams_rl.llm.types import ChatRequest

    cfg = compose()
    max_tokens = args.max_tokens or int(cfg.policy.max_tokens)
    client, new_envs, VecEnvCls = build(cfg, args.n, max_tokens, args.prefix_cache)
    client.complete([ChatRequest.chat("Say hi.", max_tokens=4, seed=1)])  # load the model before timing
    encode(["warm up the embedding model"])
    actions = np.random.default_rng(0).integers(0, 6, size=args.n)

    def batched():
        venv = VecEnvCls(new_envs())
        venv.reset()
        _, _, _, infos = venv.step(actions)
        return [info["instruction"] for info in infos]

    def one_at_a_time():
        texts = []
        for i, env in enumerate(new_envs()):
            env.reset()
            texts.append(env.step(int(actions[i]))[4]["instruction"])
        return texts

    timings = {"batched": [], "one_at_a_time": []}
    texts = {}
    calls = {}
    for _ in range(args.repeats):  # alternate, so that a change in machine load hits both sides alike
        for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            before = client.calls
            wall, cpu = time.perf_counter(), time.process_time()
            texts[name] = fn()
            timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            calls[name] = client.calls - before
    wall = {k: min(w for w, _ in v) for k, v in timings.items()}
    cpu = {k: min(c for _, c in v) for k, v in timings.items()}
    rate = {k: args.n / wall[k] for k in wall}
    same = sum(a == b for a, b in zip(texts["batched"], texts["one_at_a_time"], strict=True))
    result = {
        "benchmark": "vecenv",
        "what": "env-steps/s of the batched EvolutionVecEnv vs the same envs stepped one at a time (SmolLM2 instructor)",
        "n_envs": args.n,
        "repeats": args.repeats,
        "max_tokens": max_tokens,
        "prefix_cache": getattr(client.backend, "prefix", None) is not None,
        "instructor": client.model_id,
        "batched_wall_s": round(wall["batched"], 2),
        "one_at_a_time_wall_s": round(wall["one_at_a_time"], 2),
        "batched_env_steps_per_s": round(rate["batched"], 4),
        "one_at_a_time_env_steps_per_s": round(rate["one_at_a_time"], 4),
        "ratio": round(rate["batched"] / rate["one_at_a_time"], 2),
        "cpu_time_ratio": round(cpu["one_at_a_time"] / cpu["batched"], 2),
        "target_ratio": 3.0,
        "instructor_calls_for_n_env_steps": {"batched": calls["batched"], "one_at_a_time": calls["one_at_a_time"]},
        "identical_instructions": f"{same}/{args.n}",
        "all_rounds_wall_s": {k: [round(w, 2) for w, _ in v] for k, v in timings.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    print(f"batched VecEnv (N={args.n}):  {rate['batched']:.3f} env-steps/s ({wall['batched']:.1f} s per step, best of {args.repeats})")
    print(f"one env at a time:        {rate['one_at_a_time']:.3f} env-steps/s ({wall['one_at_a_time']:.1f} s for {args.n} steps)")
    print(f"ratio: {result['ratio']:.2f}x wall, {result['cpu_time_ratio']:.2f}x CPU time (target >= 3x); "
          f"identical instructions {result['identical_instructions']}; load average {result['load_average_1min']}")
    out = ROOT / "experiments" / "bench" / "results" / "vecenv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
