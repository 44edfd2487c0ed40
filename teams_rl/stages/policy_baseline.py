"""Stage `policy_baseline`: uniformly random operators over the same budget and reward as the policy stage.

The yardstick of the learning curve: the same instructor, seeds, operator set, reward, `policy.n_envs` x
`policy.steps_per_update` transitions per update and `policy.updates` updates, but operators drawn uniformly
(WizardLM's way) and nothing trained. Its fingerprint leaves out `rl`, so one baseline serves every algorithm of
an `rl` sweep and is computed once. The report compares the policy's final reward (its last updates) with the
baseline's mean reward over all its transitions, with the standard error of the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from teams_rl.stages import Stage
from teams_rl.stages import policy as policy_stage

RANDOM_RL = {"algorithm": "random", "action_space": "discrete", "action_bias": {}, "normalize_obs": False,
             "obs_clip": 5.0, "hyperparams": {}, "policy_kwargs": {}}


def random_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the policy stage's algorithm replaced by the uniform random baseline."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.rl = OmegaConf.create(RANDOM_RL)
    return out


def _config_keys(cfg: DictConfig) -> list[str]:
    return [k for k in policy_stage.STAGE.config_keys(random_config(cfg)) if k != "rl"]


def _roles(cfg: DictConfig) -> list[str]:
    return policy_stage.STAGE.roles(cfg)


def _validate(cfg: DictConfig) -> None:
    policy_stage.STAGE.validate(random_config(cfg))


def _estimate(cfg: DictConfig) -> list:
    return policy_stage.STAGE.estimate(random_config(cfg))


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.evol.training import reward_window

    metrics = policy_stage.run(random_config(cfg), ctx)
    history = [json.loads(line)
               for line in (Path(ctx.out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    window = reward_window(history)
    metrics.update({"baseline/mean_reward": window["mean"], "baseline/reward_se": window["se"],
                    "baseline/transitions": window["n"]})
    return metrics


STAGE = Stage(name="policy_baseline", version=2, run=run, config_keys=_config_keys,
              run_only_keys=policy_stage.RUN_ONLY_KEYS, resumable=True, validate=_validate, roles=_roles,
              estimate=_estimate)
