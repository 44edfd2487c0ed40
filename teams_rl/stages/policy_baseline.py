"""Stage `policy_baseline`: uniformly random operators over the same budget and reward as the policy stage.

The yardstick of the learning curve: the same instructor, seeds, operator set, reward, `policy.n_envs` x
`policy.steps_per_update` transitions per update and `policy.updates` updates, but operators drawn uniformly
(WizardLM's way) and nothing trained. Its fingerprint leaves out `rl`, so one baseline serves every algorithm of
an `rl` sweep and is computed once. The report compares the policy's final reward (its last updates) with the
baseline's mean reward over all its transitions, with the standard error of the difference.

When its episodes are independent (`policy.carry_instruction: false`, the default) the baseline is rolled out
wide (`teams_rl.evol.wide_rollout`): all its episodes at once, one batched call per episode step, each
transition filed under the update it has in the policy's layout. Artifact folder: metrics.jsonl (one row per
update) and learning_curve.png. Otherwise (the paper preset carries the instruction over) it is the policy
stage's own loop with the random agent, checkpoints included.
"""

from __future__ import annotations

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
    from teams_rl.evol.wide_rollout import wide_possible

    random_cfg = random_config(cfg)
    s, opset = policy_stage.settings(random_cfg)
    if wide_possible(s):
        history = _wide(random_cfg, ctx, s, opset)
        metrics = policy_stage.summary(s, opset, history)
    else:
        metrics, history = policy_stage.train(random_cfg, ctx)
    return {**metrics, **policy_stage.reward_metrics("baseline", s, history)}  # over all its transitions


def _wide(cfg: DictConfig, ctx, s, opset) -> list[dict]:
    import torch

    from teams_rl.evol.reward_window import loggable
    from teams_rl.evol.training import seed_pool, torch_threads, write_metrics
    from teams_rl.evol.wide_rollout import WideRandomRollout
    from teams_rl.plotting import learning_curve

    llm_threads = torch.get_num_threads()
    if ctx.failures is not None:  # the failure budget's denominator: every request of the rollout
        ctx.failures.planned = s.updates * s.rollout * len(_roles(cfg))
    with torch_threads(s.torch_threads):
        rollout = WideRandomRollout(s, opset, seed_pool(s, cfg.get("seeds")), cfg.get("reward"), ctx.llm, llm_threads)
        history = rollout.run(progress=s.progress)
    out_dir = Path(ctx.out_dir)
    write_metrics(out_dir, history)
    for row in history:
        ctx.log(loggable(row), step=row["update"])
    title = f"random on {opset.name} ({s.n_envs} envs x {s.steps_per_update} steps/update, rolled out wide)"
    ctx.tracker.log_image("policy/learning_curve", learning_curve(history, opset.names,
                                                                  out_dir / "learning_curve.png", title))
    return history


# Uniformly random operators never look at the observation, and the baseline's figure uses all its transitions:
# one baseline serves every `policy.obs` and `policy.final_window` too (an observation ablation shares it).
BASELINE_RUN_ONLY_KEYS = (*policy_stage.RUN_ONLY_KEYS, "policy.obs", "policy.final_window")

STAGE = Stage(name="policy_baseline", version=6, run=run, config_keys=_config_keys,
              run_only_keys=BASELINE_RUN_ONLY_KEYS, resumable=True, validate=_validate, roles=_roles,
              estimate=_estimate)
