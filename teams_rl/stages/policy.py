"""Stage `policy`: learn which textual operator to apply next (the paper's RL step).

Rolls out `policy.n_envs` evolution episodes in one batched `EvolutionVecEnv` (instructor LLM rewrites,
reward from `cfg.reward`) and trains the `cfg.rl` algorithm (stable-baselines3 / sb3-contrib TRPO, PPO, A2C)
for `policy.updates` updates of `policy.steps_per_update` transitions per env; the baselines `random` and
`fixed` train nothing but roll out the same budget so their reward curves compare. The engine is
`teams_rl.evol.training`.

Artifact folder: agent.json + policy.zip (the agent, see `teams_rl.evol.agents`), metrics.jsonl (one row per
update, with its transitions as [env, episode, step, reward] for the episode-clustered SE of
`teams_rl.evol.reward_window`), learning_curve.png, checkpoints/ (the last saved update: a loadable agent folder plus the sb3
model, env state and RNG states; a killed run resumes from it), and the updates named in
`policy.keep_updates` (kept for good: `generate.policy_update` picks one of them to generate with).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from teams_rl.evol.cleaning import KINDS as CLEANING_KINDS
from teams_rl.llm.failures import LLMFailures
from teams_rl.stages import Stage

log = logging.getLogger(__name__)

# policy.* keys that change how the run is carried out but not its result (kept out of the fingerprint)
RUN_ONLY_KEYS = ("policy.checkpoint_every", "policy.keep_checkpoints", "policy.torch_threads",
                 "policy.max_failed_fraction")

SUMMED_COUNTS = ("llm_queries/instructor", "llm_queries/reviewer", "requests/instructor", "requests/reviewer")


def _roles(cfg: DictConfig) -> list[str]:
    from teams_rl.evol.rewards import reward_uses_reviewer

    return ["instructor"] + (["reviewer"] if reward_uses_reviewer(cfg.get("reward")) else [])


def _config_keys(cfg: DictConfig) -> list[str]:
    keys = ["policy", "rl", "reward", "operators", *_roles(cfg)]
    if not (cfg.get("policy") or {}).get("seed_instructions"):
        keys.append("seeds")
    return keys


def settings(cfg: DictConfig):
    from teams_rl.evol.operators import load_operator_set
    from teams_rl.evol.policy_settings import PolicySettings

    opset = load_operator_set(cfg.get("operators"))
    return PolicySettings.from_config(cfg, opset.names), opset


def _validate(cfg: DictConfig) -> None:
    from teams_rl.evol.rewards import build_reward
    from teams_rl.evol.seeds import check_seeds

    s, _ = settings(cfg)
    build_reward(cfg.get("reward"))  # unknown terms and bad weights, without building a reviewer client
    if not s.seed_instructions:
        check_seeds(cfg.get("seeds"))


def _estimate(cfg: DictConfig) -> list:
    """What training sends (dry_run): one instructor rewrite per transition and, with a reviewer reward, at most
    one judgement per transition. Prompts grow by ~27 tokens (20 words) per in-depth step of an episode."""
    from teams_rl.evol.evolution import evolve_request
    from teams_rl.evol.rewards import Judge, reward_uses_reviewer
    from teams_rl.evol.training import seed_pool
    from teams_rl.llm.plans import RequestPlan
    from teams_rl.llm.types import ChatRequest

    s, opset = settings(cfg)
    texts = [item[1] if isinstance(item, tuple) else item.instruction for item in seed_pool(s, cfg.get("seeds"))[:16]]
    n, growth = s.updates * s.rollout, 27 * (s.episode_length - 1) / 2
    plans = [RequestPlan("instructor", "evolve", n, [evolve_request(opset, i % len(opset), t, max_tokens=s.max_tokens,
                                                                    temperature=s.temperature)
                                                     for i, t in enumerate(texts)], growth)]
    if reward_uses_reviewer(cfg.get("reward")):
        judge_cfg = (cfg.get("reward") or {}).get("judge") or {}
        judge = Judge(None, prompt=judge_cfg.get("prompt"), max_tokens=judge_cfg.get("max_tokens"))
        plans.append(RequestPlan("reviewer", "judge", n, [ChatRequest.chat(judge.render(t, t + " in detail"),
                                                                           max_tokens=judge.max_tokens, purpose="judge")
                                                          for t in texts], 2 * growth,
                                 "at most: unchanged rewrites are not judged"))
    return plans


def run(cfg: DictConfig, ctx) -> dict:
    metrics, history = train(cfg, ctx)
    return {**metrics, **final_window(settings(cfg)[0], history)}


def train(cfg: DictConfig, ctx) -> tuple[dict, list[dict]]:
    """(the stage's metrics, its per-update rows)."""
    import torch

    from teams_rl.evol.training import torch_threads

    llm_threads = torch.get_num_threads()
    with torch_threads((cfg.policy or {}).get("torch_threads", 1)):
        return _train(cfg, ctx, Path(ctx.out_dir), llm_threads)


def _train(cfg: DictConfig, ctx, out_dir: Path, llm_threads: int) -> tuple[dict, list[dict]]:
    from tqdm.auto import tqdm

    from teams_rl.evol.agents import write_agent
    from teams_rl.evol.reward_window import loggable
    from teams_rl.evol.training import PolicyTraining, seed_pool, write_metrics
    from teams_rl.plotting import learning_curve

    s, opset = settings(cfg)
    run = PolicyTraining(s, opset, seed_pool(s, cfg.get("seeds")), cfg.get("reward"), ctx.llm, llm_threads)
    if ctx.failures is not None:  # the failure budget's denominator: the requests all updates send
        ctx.failures.planned = s.updates * s.rollout * len(_roles(cfg))
    if run.restore(out_dir):
        log.info("policy: resuming after update %d of %d", run.done, s.updates)
        write_metrics(out_dir, run.history)
    title = f"{s.algorithm} on {opset.name} ({s.n_envs} envs x {s.steps_per_update} steps/update)"
    with tqdm(total=s.updates, initial=run.done, desc=f"policy {s.algorithm}", unit="update",
              disable=not s.progress) as bar:
        while run.done < s.updates:
            try:
                row = run.update()
            except LLMFailures as err:  # raised while collecting the rollout: nothing was trained on it
                raise LLMFailures(str(err).replace(
                    "; rerun", f"; stopped before update {run.done + 1}, the checkpoint of update {run.done} is kept "
                               "and a rerun resumes from it; rerun", 1)) from None
            run.history.append(row)
            if run.done % s.checkpoint_every == 0 or run.done == s.updates or run.done in s.keep_updates:
                run.save_checkpoint(out_dir)
            write_metrics(out_dir, run.history)
            ctx.log(loggable(row), step=row["update"])
            bar.set_postfix(reward=f"{row['mean_reward']:.3f}", entropy=f"{row['entropy']:.2f}")
            bar.update(1)

    write_agent(out_dir, run.agent_meta(), run.model)
    if run.history:
        plot = learning_curve(run.history, run.names, out_dir / "learning_curve.png", title)
        ctx.tracker.log_image("policy/learning_curve", plot)
    return summary(s, opset, run.history), run.history


def se_unit(s) -> str:
    """What the reward SEs take as one sampling unit: the episode, or the env's whole chain when an episode starts
    where the last one ended (`policy.carry_instruction`, the paper)."""
    return "env" if s.carry_instruction else "episode"


def reward_metrics(prefix: str, s, history: list[dict], last: int | None = None) -> dict:
    """`<prefix>/*`: the mean per-transition reward over the `last` updates of `history` (all when None), its
    SE clustered by `se_unit`, the independent-transition SE and the counts behind them."""
    from teams_rl.evol.reward_window import reward_window

    unit = se_unit(s)
    window = reward_window(history, last, unit)
    return {f"{prefix}/mean_reward": window["mean"], f"{prefix}/reward_se": window["se"],
            f"{prefix}/reward_se_iid": window["se_iid"], f"{prefix}/transitions": window["n"],
            f"{prefix}/episodes": window["episodes"], f"{prefix}/updates": window["updates"],
            f"{prefix}/se_unit": unit}


def final_window(s, history: list[dict]) -> dict:
    """The trained policy's "final reward": the mean over its last `policy.final_window` updates, with its SEs."""
    return reward_metrics("final_window", s, history, s.final_updates)


def summary(s, opset, history: list[dict]) -> dict:
    """The metrics of a run's per-update rows that the policy and the random baseline share."""
    last, first = (history[-1], history[0]) if history else ({}, {})
    metrics = {
        "algorithm": s.algorithm,
        "operator_set": opset.name,
        "updates": len(history),
        "timesteps": last.get("timesteps", 0),
        "first_mean_reward": first.get("mean_reward"),
        "final_mean_reward": last.get("mean_reward"),
        "mean_reward": float(np.mean([r["mean_reward"] for r in history])) if history else None,
        "final_entropy": last.get("entropy"),
        "judge_unparsable": last.get("judge_unparsable", 0),
        "rejected_frac": float(np.mean([r["rejected_frac"] for r in history])) if history else None,
        # share of the instructor's rewrites that needed each kind of clean_rewrite cleaning (all updates)
        **{k: float(np.mean([r.get(k, 0.0) for r in history])) if history else None
           for k in (f"cleaning/{kind}" for kind in CLEANING_KINDS)},
    }
    for key in SUMMED_COUNTS:
        metrics[key] = last.get(key, 0)
    for name in opset.names:
        metrics[f"op_prob/{name}"] = last.get(f"op_prob/{name}")
    return metrics


STAGE = Stage(name="policy", version=6, run=run, config_keys=_config_keys, run_only_keys=RUN_ONLY_KEYS,
              resumable=True, validate=_validate, roles=_roles, estimate=_estimate)
