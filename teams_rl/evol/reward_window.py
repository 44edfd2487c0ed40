"""The mean reward of a window of updates and its standard error, with the episode as the unit of sampling.

Every update row of a policy (or random-baseline) run carries its transitions under `TRANSITIONS_KEY`, each as
[env index, episode index, episode step, reward]. The transitions of one episode are not independent draws: they
share a seed instruction and each step rewrites the last one's output. The standard error therefore treats each
episode as one cluster (the cluster-robust variance of a mean, with the usual G / (G - 1) correction); the
independent-transition SE is kept beside it, so the report can show how much the clustering matters. An episode
cut by the window's edge contributes the transitions that fall inside it.
"""

from __future__ import annotations

import math
from collections import defaultdict

from teams_rl.errors import TeamsRLError

TRANSITIONS_KEY = "transitions_by_episode"  # per update row: [[env, episode, step, reward], ...]


def transition_record(info: dict, reward: float) -> list:
    """One transition as stored in an update row: [env index, episode index, episode step, reward]."""
    return [int(info["env_index"]), int(info["episode_index"]), int(info["step"]), float(reward)]


def loggable(row: dict) -> dict:
    """An update row as a metrics logger takes it: numbers only, without the per-transition list or `update`."""
    return {k: v for k, v in row.items() if v is not None and k not in ("update", TRANSITIONS_KEY)}


def clustered_se(rewards: list[float], clusters: list) -> float | None:
    """Cluster-robust standard error of the mean of `rewards` (None with fewer than two clusters)."""
    n = len(rewards)
    sums: dict = defaultdict(float)
    mean = sum(rewards) / n if n else 0.0
    for reward, key in zip(rewards, clusters, strict=True):
        sums[key] += reward - mean
    g = len(sums)
    if g < 2:
        return None
    return math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / n


def reward_window(history: list[dict], last: int | None = None, unit: str = "episode") -> dict:
    """Mean, sd, n and standard errors of the per-transition reward over the `last` updates of `history` (all when
    None): `se` clustered by `unit` (`episode`, or `env` when episodes carry their instruction over, so one env's
    episodes are one chain), `se_iid` as if every transition were independent, `episodes` the clusters."""
    if unit not in ("episode", "env"):
        raise ValueError(f"unit must be episode or env, got {unit!r}")
    rows = [r for r in (history[-last:] if last else history) if r.get("transitions")]
    if any(TRANSITIONS_KEY not in r for r in rows):
        raise TeamsRLError(f"an update row has no {TRANSITIONS_KEY} (written before per-transition records); "
                           "rerun the stage")
    records = [t for r in rows for t in r[TRANSITIONS_KEY]]
    n = len(records)
    if not n:
        return {"mean": None, "sd": None, "se": None, "se_iid": None, "n": 0, "episodes": 0, "updates": len(rows)}
    rewards = [float(t[3]) for t in records]
    clusters = [(int(t[0]), int(t[1]) if unit == "episode" else 0) for t in records]
    mean = sum(rewards) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "se": clustered_se(rewards, clusters), "se_iid": sd / math.sqrt(n), "n": n,
            "episodes": len(set(clusters)), "updates": len(rows)}
