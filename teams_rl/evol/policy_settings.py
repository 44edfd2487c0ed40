"""The policy-training settings (`cfg.policy` + `cfg.rl`), checked once and held as plain typed values."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from teams_rl import config as C
from teams_rl.errors import TeamsRLError

log = logging.getLogger(__name__)

ACTION_SPACES = ("discrete", "box")
ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "gelu": "GELU", "leaky_relu": "LeakyReLU"}


@dataclass(frozen=True)
class PolicySettings:
    """Everything the trainers read. `bias` (box only) and `schedule` (fixed only) are in action-index order."""

    algorithm: str
    action_space: str
    episode_length: int
    n_envs: int
    steps_per_update: int
    updates: int
    obs: str
    seed: int
    bias: tuple[float, ...] | None = None
    schedule: tuple[int, ...] = ()
    seed_instructions: tuple[str, ...] | None = None
    carry_instruction: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    min_words: int = 1
    checkpoint_every: int = 1
    keep_checkpoints: int | None = 1
    keep_updates: tuple[int, ...] = ()
    final_window: int | None = None  # updates of the "final reward" (null: the last half)
    prob_samples: int = 1024
    progress: bool = True
    torch_threads: int | None = 1
    normalize_obs: bool = False
    obs_clip: float = 5.0
    hyperparams: dict = field(default_factory=dict)
    policy_kwargs: dict = field(default_factory=dict)

    @property
    def rollout(self) -> int:
        """Transitions collected per update (all envs)."""
        return self.steps_per_update * self.n_envs

    @property
    def final_updates(self) -> int:
        """Updates whose transitions make the trained policy's "final reward" (its n goes in the metrics):
        `policy.final_window`, or the last half of training (the usual report of an RL run's final return)."""
        return self.final_window if self.final_window is not None else max(1, (self.updates + 1) // 2)

    @property
    def trains(self) -> bool:
        return self.algorithm not in ("random", "fixed")

    @classmethod
    def from_config(cls, cfg, names: list[str]) -> PolicySettings:
        """Validated settings from `cfg.policy` and `cfg.rl` for an operator set with operator `names`
        (one clear line per mistake, before anything is loaded)."""
        from teams_rl.evol.agents import ALGORITHMS
        from teams_rl.evol.observations import OBS_KINDS

        pol, rl = cfg.get("policy"), cfg.get("rl")
        if not pol:
            raise TeamsRLError("no policy settings (the `policy` config group is missing)")
        if not rl:
            raise TeamsRLError("no rl algorithm configured (choose one with rl=trpo|trpo_paper|ppo|a2c|random|fixed)")
        algorithm = C.get(rl, "algorithm")
        if algorithm not in ALGORITHMS:
            raise TeamsRLError(f"rl.algorithm '{algorithm}' is unknown (choose one of: {', '.join(ALGORITHMS)})")
        sizes = {}
        for key in ("episode_length", "n_envs", "steps_per_update", "updates"):
            value = C.get(pol, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TeamsRLError(f"policy.{key} must be a positive integer, got {value!r}")
            sizes[key] = value
        obs = C.get(pol, "obs")
        if obs not in OBS_KINDS:
            raise TeamsRLError(f"policy.obs must be one of {', '.join(OBS_KINDS)}, got {obs!r}")
        action_space = C.get(rl, "action_space", "discrete")
        if action_space not in ACTION_SPACES:
            raise TeamsRLError(f"rl.action_space must be discrete or box, got {action_space!r}")
        if algorithm in ("random", "fixed") and action_space != "discrete":
            raise TeamsRLError(f"rl.algorithm={algorithm} chooses operators directly: use rl.action_space=discrete")
        bias = _bias(cfg, C.plain(C.get(rl, "action_bias", {})), action_space, names)
        schedule = _schedule(C.plain(C.get(rl, "schedule", [])), names) if algorithm == "fixed" else ()
        seed_instructions = C.plain(C.get(pol, "seed_instructions"))
        if seed_instructions is not None and (isinstance(seed_instructions, str) or not seed_instructions):
            raise TeamsRLError("policy.seed_instructions must be null or a non-empty list of instructions")
        policy_kwargs = dict(C.plain(C.get(rl, "policy_kwargs", {})))
        act = policy_kwargs.get("activation_fn")
        if isinstance(act, str) and act.lower() not in ACTIVATIONS:
            raise TeamsRLError(f"rl.policy_kwargs.activation_fn '{act}' is unknown ({', '.join(ACTIVATIONS)})")
        hyper = C.plain(C.get(rl, "hyperparams", {})) or {}
        if algorithm == "ppo" and hyper.get("normalize_advantage", True) and \
                sizes["steps_per_update"] * sizes["n_envs"] < 2:
            raise TeamsRLError(f"rl={algorithm} normalises advantages over each minibatch (sb3 asserts > 1): "
                               "policy.n_envs x policy.steps_per_update must be >= 2")
        return cls(
            algorithm=algorithm, action_space=action_space, obs=obs, bias=bias, schedule=schedule,
            seed=C.integer(cfg, "policy.seed"), **sizes,
            seed_instructions=None if seed_instructions is None else tuple(str(s) for s in seed_instructions),
            carry_instruction=bool(C.get(pol, "carry_instruction", False)),
            max_tokens=C.integer(cfg, "policy.max_tokens", minimum=1, optional=True),
            temperature=C.number(cfg, "policy.temperature", minimum=0.0, optional=True),
            min_words=C.integer(cfg, "policy.min_words", minimum=0, optional=True) or 1,
            checkpoint_every=max(1, C.integer(cfg, "policy.checkpoint_every", minimum=0, optional=True) or 1),
            keep_checkpoints=C.integer(cfg, "policy.keep_checkpoints", minimum=0, optional=True),
            final_window=C.integer(cfg, "policy.final_window", minimum=1, optional=True),
            keep_updates=tuple(sorted(set(C.integer_list(cfg, "policy.keep_updates", minimum=1,
                                                         maximum=sizes["updates"])))),
            prob_samples=C.integer(cfg, "policy.prob_samples", minimum=1, optional=True) or 1024,
            progress=bool(C.get(pol, "progress", True)),
            torch_threads=C.integer(cfg, "policy.torch_threads", minimum=1, optional=True),
            normalize_obs=bool(C.get(rl, "normalize_obs", False)),
            obs_clip=float(C.get(rl, "obs_clip", 5.0)),
            hyperparams=dict(C.plain(C.get(rl, "hyperparams", {}))),
            policy_kwargs=policy_kwargs,
        )


def _bias(cfg, bias_cfg: dict, action_space: str, names: list[str]) -> tuple[float, ...] | None:
    if bias_cfg and action_space != "box":
        raise TeamsRLError("rl.action_bias needs rl.action_space=box (a categorical policy has no bias vector)")
    if action_space != "box":
        return None
    library = set(C.plain(C.get(cfg, "operators.library", {})) or {})
    bias = np.zeros(len(names))
    for name, value in bias_cfg.items():
        if name not in library and name not in names:
            raise TeamsRLError(f"rl.action_bias names unknown operator '{name}'")
        if name in names:
            bias[names.index(name)] = float(value)
        else:
            log.info("rl.action_bias: operator '%s' is not in this set; its bias is ignored", name)
    return tuple(float(b) for b in bias)


def _schedule(wanted: list, names: list[str]) -> tuple[int, ...]:
    if not wanted:
        raise TeamsRLError("rl=fixed needs rl.schedule: a list of operator names")
    for name in wanted:
        if name not in names:
            raise TeamsRLError(f"rl.schedule names '{name}', which is not in the operator set ({', '.join(names)})")
    return tuple(names.index(name) for name in wanted)
