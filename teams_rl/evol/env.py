"""The instruction-evolution MDP as a `gymnasium.Env`, and a batched stable-baselines3 `VecEnv` of N of them.

State: the current instruction. Action: an operator index (`Discrete(n_ops)`), or, for the paper's preset, a
real vector (`Box`, one coordinate per operator) mapped to `argmax(action + bias)`. Transition: the instructor
LLM applies the operator (a rejected or failed rewrite keeps the instruction). Reward: `rewards.RewardFunction`.
An episode is `episode_length` steps from a seed instruction drawn from the seed pool (or, with
`carry_instruction`, from where the previous episode ended, as in the official code).

`step_envs` advances several environments with ONE instructor `complete` call (and one reviewer call), so a
single env and the `EvolutionVecEnv` share the exact same code path: N single envs built with the same seeds
and indices give the same trajectories as one VecEnv.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from teams_rl.errors import TeamsRLError
from teams_rl.evol.evolution import evolve_detailed
from teams_rl.evol.observations import ObservationEncoder
from teams_rl.evol.operators import OperatorSet
from teams_rl.evol.rewards import RewardFunction, StepBatch

ACTION_SPACES = ("discrete", "box")
BOX_BOUND = 100.0


@dataclass
class EnvSettings:
    """How episodes run. `action_bias` (box only) is added to the action vector before the argmax."""

    episode_length: int = 6
    action_space: str = "discrete"
    action_bias: Sequence[float] | None = None
    carry_instruction: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    min_words: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.action_space not in ACTION_SPACES:
            raise TeamsRLError(f"action_space must be one of {', '.join(ACTION_SPACES)}, got '{self.action_space}'")
        if int(self.episode_length) < 1:
            raise TeamsRLError(f"episode_length must be >= 1, got {self.episode_length}")
        if self.action_bias is not None and self.action_space != "box":
            raise TeamsRLError("action_bias only applies to action_space=box")


@dataclass
class _Episode:
    instruction: str = ""
    seed_id: str = ""
    step: int = 0
    last_op: int | None = None
    archive: list[str] = field(default_factory=list)
    index: int = 0  # episodes started by this env
    ret: float = 0.0
    queries: dict[str, int] = field(default_factory=lambda: {"instructor": 0, "reviewer": 0})
    started: float = field(default_factory=time.perf_counter)


def _seed_pairs(seeds: Sequence) -> list[tuple[str, str]]:
    """(id, instruction) pairs from `Seed`-like objects, plain strings or (id, text) tuples."""
    pairs = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, str):
            pairs.append((str(i), seed))
        elif isinstance(seed, tuple):
            pairs.append((str(seed[0]), str(seed[1])))
        else:
            text = seed.instruction if not getattr(seed, "input", "") else f"{seed.instruction}\n{seed.input}"
            pairs.append((str(seed.id), text))
    if not pairs:
        raise TeamsRLError("the environment needs at least one seed instruction")
    return pairs


class InstructionEvolutionEnv(gym.Env):
    """One evolution episode at a time. `info` of a step carries the new and previous instruction, the
    operator, whether the rewrite was rejected, the reward terms and the queries spent (this step and this
    episode); the last step of an episode also carries sb3's `episode` summary ({"r", "l", "t"})."""

    metadata = {"render_modes": []}
    render_mode = None

    def __init__(self, instructor, opset: OperatorSet, seeds: Sequence, reward: RewardFunction,
                 encoder: ObservationEncoder, settings: EnvSettings | None = None, index: int = 0):
        super().__init__()
        self.instructor = instructor
        self.opset = opset
        self.seed_pool = _seed_pairs(seeds)
        self.reward_fn = reward
        self.encoder = encoder
        self.settings = settings or EnvSettings()
        self.index = int(index)
        n = len(opset)
        if encoder.n_ops != n or encoder.episode_length != self.settings.episode_length:
            raise TeamsRLError("the observation encoder does not match the operator set / episode length")
        self.observation_space = encoder.space
        if self.settings.action_space == "discrete":
            self.action_space = spaces.Discrete(n)
            self.bias = None
        else:
            # sb3 needs finite bounds; +-BOX_BOUND never binds for a Gaussian policy in practice
            self.action_space = spaces.Box(low=-BOX_BOUND, high=BOX_BOUND, shape=(n,), dtype=np.float32)
            bias = np.zeros(n) if self.settings.action_bias is None else np.asarray(self.settings.action_bias, float)
            if bias.shape != (n,):
                raise TeamsRLError(f"action_bias has {bias.size} entries, the operator set has {n}")
            self.bias = bias
        self._np_random, _ = gym.utils.seeding.np_random(int(np.random.SeedSequence(
            [int(self.settings.seed), self.index]).generate_state(1)[0]))
        self.ep = _Episode()
        self.total_queries = {"instructor": 0, "reviewer": 0}
        self._has_episode = False

    # -- actions ----------------------------------------------------------------------------------------
    def action_to_op(self, action) -> int:
        """The operator index an action selects (box: argmax of action + bias)."""
        if self.bias is None:
            op = int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
            if not 0 <= op < len(self.opset):
                raise ValueError(f"action {op} out of range for {len(self.opset)} operators")
            return op
        vec = np.asarray(action, dtype=np.float64).reshape(-1)
        if vec.shape != self.bias.shape:
            raise ValueError(f"box action has shape {vec.shape}, expected {self.bias.shape}")
        return int(np.argmax(vec + self.bias))

    # -- episodes -----------------------------------------------------------------------------------------
    def begin_episode(self, seed: int | None = None, options: dict | None = None) -> dict:
        """Start an episode without computing the observation (`step_envs`/the VecEnv batch that)."""
        if seed is not None:
            self._np_random, _ = gym.utils.seeding.np_random(int(seed))
        options = options or {}
        if "instruction" in options:
            seed_id, text = str(options.get("seed_id", "custom")), str(options["instruction"])
        elif self.settings.carry_instruction and self._has_episode:
            seed_id, text = self.ep.seed_id, self.ep.instruction
        else:
            seed_id, text = self.seed_pool[int(self.np_random.integers(len(self.seed_pool)))]
        self.ep = _Episode(instruction=text, seed_id=seed_id, archive=[text], index=self.ep.index + 1)
        self._has_episode = True
        return {"instruction": text, "seed_id": seed_id, "episode_index": self.ep.index}

    def observe(self) -> np.ndarray:
        return self.encoder.encode([self.ep.instruction], [self.ep.last_op], [self.ep.step])[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            super().reset(seed=seed)
        info = self.begin_episode(options=options)
        return self.observe(), info

    def step(self, action):
        obs, reward, terminated, truncated, info = step_envs([self], [action])[0]
        return obs, reward, terminated, truncated, info

    def request_seed(self) -> int:
        """The sampling seed of this step's requests: a function of (seed, env index, episode, step)."""
        return int(np.random.SeedSequence([int(self.settings.seed), self.index, self.ep.index, self.ep.step])
                   .generate_state(1)[0] % (2**31 - 1))

    # -- checkpointing ------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Everything needed to continue this env exactly (JSON-serialisable)."""
        return {
            "instruction": self.ep.instruction, "seed_id": self.ep.seed_id, "step": self.ep.step,
            "last_op": self.ep.last_op, "archive": list(self.ep.archive), "episode_index": self.ep.index,
            "episode_return": self.ep.ret, "episode_queries": dict(self.ep.queries),
            "total_queries": dict(self.total_queries), "has_episode": self._has_episode,
            "rng": self.np_random.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        self.ep = _Episode(instruction=state["instruction"], seed_id=state["seed_id"], step=int(state["step"]),
                           last_op=state["last_op"], archive=list(state["archive"]),
                           index=int(state["episode_index"]), ret=float(state["episode_return"]),
                           queries=dict(state["episode_queries"]))
        self.total_queries = dict(state["total_queries"])
        self._has_episode = bool(state["has_episode"])
        self.np_random.bit_generator.state = state["rng"]


def step_envs(envs: Sequence[InstructionEvolutionEnv], actions: Sequence) -> list[tuple]:
    """Advance every env by one step with one batched instructor call and one batched reviewer call.
    Returns gymnasium step tuples (obs, reward, terminated, truncated, info) in order."""
    if not envs:
        return []
    first = envs[0]
    op_ids = [env.action_to_op(a) for env, a in zip(envs, actions, strict=True)]
    seeds = [env.request_seed() for env in envs]
    previous = [env.ep.instruction for env in envs]
    s = first.settings
    rewrites = evolve_detailed(first.instructor, first.opset, previous, op_ids, seeds, purpose="evolve",
                               max_tokens=s.max_tokens, temperature=s.temperature, min_words=s.min_words)
    batch = StepBatch(previous=previous, new=[r.text for r in rewrites], raw=[r.raw for r in rewrites],
                      op_ids=op_ids, archives=[list(env.ep.archive) for env in envs], seeds=seeds)
    result = first.reward_fn(batch)
    changed = batch.changed()
    for i, env in enumerate(envs):
        ep = env.ep
        if rewrites[i].text is not None:
            ep.instruction = rewrites[i].text
        if changed[i]:
            ep.archive.append(ep.instruction)
        ep.step += 1
        ep.last_op = op_ids[i]
        ep.ret += float(result.total[i])
        step_queries = {"instructor": 1, "reviewer": int(result.reviewer_queries[i])}
        for role, n in step_queries.items():
            ep.queries[role] += n
            env.total_queries[role] += n
    obs = first.encoder.encode([env.ep.instruction for env in envs], [env.ep.last_op for env in envs],
                               [env.ep.step for env in envs])
    out = []
    for i, env in enumerate(envs):
        ep = env.ep
        terminated = ep.step >= env.settings.episode_length
        info = {
            "instruction": ep.instruction,
            "previous_instruction": previous[i],
            "op_id": op_ids[i],
            "operator": env.opset[op_ids[i]].name,
            "rejected": rewrites[i].rejected,
            "changed": bool(changed[i]),
            "raw_output": rewrites[i].raw,
            "cleaning": list(rewrites[i].cleaning),  # kinds of clean_rewrite cleaning the reply needed
            "reward_terms": {name: float(v[i]) for name, v in result.terms.items()},
            "queries": {"instructor": 1, "reviewer": int(result.reviewer_queries[i])},
            "episode_queries": dict(ep.queries),
            "step": ep.step,
            "seed_id": ep.seed_id,
            "env_index": env.index,
            "episode_index": ep.index,  # (env_index, episode_index) names the episode, the SE's cluster
        }
        if terminated:
            info["episode"] = {"r": ep.ret, "l": ep.step, "t": round(time.perf_counter() - ep.started, 3)}
        out.append((obs[i], float(result.total[i]), terminated, False, info))
    return out


class EvolutionVecEnv(VecEnv):
    """N `InstructionEvolutionEnv`s stepped together (stable-baselines3 `VecEnv` API, auto-reset): each step
    sends the N rewrite prompts in one instructor `complete` call and the reviewer prompts in one call."""

    def __init__(self, envs: Sequence[InstructionEvolutionEnv]):
        if not envs:
            raise TeamsRLError("EvolutionVecEnv needs at least one env")
        self.envs = list(envs)
        self._actions = None
        super().__init__(len(self.envs), self.envs[0].observation_space, self.envs[0].action_space)

    @property
    def encoder(self) -> ObservationEncoder:
        return self.envs[0].encoder

    def _observe(self, indices: Sequence[int]) -> np.ndarray:
        envs = [self.envs[i] for i in indices]
        return self.encoder.encode([e.ep.instruction for e in envs], [e.ep.last_op for e in envs],
                                   [e.ep.step for e in envs])

    def reset(self) -> np.ndarray:
        for i, env in enumerate(self.envs):
            self.reset_infos[i] = env.begin_episode(seed=self._seeds[i], options=self._options[i] or None)
        self._reset_seeds()
        self._reset_options()
        return self._observe(range(self.num_envs))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        results = step_envs(self.envs, list(self._actions))
        self._actions = None
        obs = np.stack([r[0] for r in results]).astype(np.float32)
        rewards = np.array([r[1] for r in results], dtype=np.float32)
        dones = np.array([r[2] or r[3] for r in results], dtype=bool)
        infos = [r[4] for r in results]
        finished = [i for i in range(self.num_envs) if dones[i]]
        for i in finished:
            infos[i]["terminal_observation"] = obs[i]
            infos[i]["TimeLimit.truncated"] = bool(results[i][3])
            self.reset_infos[i] = self.envs[i].begin_episode()
        if finished:
            obs = obs.copy()
            obs[finished] = self._observe(finished)
        return obs, rewards, dones, infos

    def close(self) -> None:
        return None

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices=None) -> list:
        return [getattr(self.envs[i], attr_name) for i in self._indices(indices)]

    def set_attr(self, attr_name: str, value, indices=None) -> None:
        for i in self._indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list:
        return [getattr(self.envs[i], method_name)(*method_args, **method_kwargs) for i in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [isinstance(self.envs[i], wrapper_class) for i in self._indices(indices)]

    # -- checkpointing ------------------------------------------------------------------------------------
    def get_state(self) -> list[dict]:
        return [env.get_state() for env in self.envs]

    def set_state(self, states: list[dict]) -> np.ndarray:
        """Restore every env; returns the observations of the restored states."""
        if len(states) != self.num_envs:
            raise TeamsRLError(f"checkpoint has {len(states)} envs, this run has {self.num_envs}")
        for env, state in zip(self.envs, states, strict=True):
            env.set_state(state)
        return self._observe(range(self.num_envs))

    @property
    def total_queries(self) -> dict[str, int]:
        out = {"instructor": 0, "reviewer": 0}
        for env in self.envs:
            for role, n in env.total_queries.items():
                out[role] += n
        return out


def make_envs(n: int, instructor, opset: OperatorSet, seeds: Sequence, reward: RewardFunction,
              encoder: ObservationEncoder, settings: EnvSettings) -> list[InstructionEvolutionEnv]:
    """N envs sharing the instructor, reward and encoder; env i draws its seeds from (settings.seed, i)."""
    return [InstructionEvolutionEnv(instructor, opset, seeds, reward, encoder, settings, index=i) for i in range(n)]
