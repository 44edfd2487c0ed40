"""Policy training over the evolution MDP: the trainers (stable-baselines3 / sb3-contrib, or a baseline that
trains nothing), what each update records, and checkpoints that let a killed run continue exactly.

`PolicyTraining` holds one run: `update()` trains one update and returns its metrics row;
`save_checkpoint(folder)` / `restore(folder)` write and read `folder/checkpoints/update_NNNNNN/` (a loadable
agent folder plus the sb3 model, env state and RNG states).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from teams_rl.artifacts import write_json_atomic
from teams_rl.errors import TeamsRLError
from teams_rl.evol.cleaning import KINDS as CLEANING_KINDS
from teams_rl.evol.policy_settings import ACTIVATIONS, PolicySettings
from teams_rl.evol.reward_window import TRANSITIONS_KEY, transition_record

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
ROLES = ("instructor", "reviewer")


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch intra-op threads (None: leave as is)."""
    import torch

    old = torch.get_num_threads()
    change = n is not None and int(n) != old
    if change:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(old)


class ThreadedClient:
    """An LLM client whose `complete` runs with `threads` torch threads, while the tiny policy networks train
    on one thread (many small backward passes are an order of magnitude slower with thread contention)."""

    def __init__(self, client, threads: int | None):
        self._client = client
        self._threads = threads

    def complete(self, requests):
        with torch_threads(self._threads):
            return self._client.complete(requests)

    def __getattr__(self, name):
        return getattr(self._client, name)


# ------------------------------------------------------------------------------------------------ recording

class UpdateRecorder:
    """Collects the transitions of one update (from sb3's callback or the baseline loop)."""

    def __init__(self, n_ops: int):
        self.n_ops = n_ops
        self.clear()

    def clear(self) -> None:
        self.rewards: list[float] = []
        self.transitions: list[list] = []  # [env, episode, step, reward]: the SE's clusters (reward_window)
        self.ops: list[int] = []
        self.rejected = 0
        self.changed = 0
        self.cleaning: dict[str, int] = dict.fromkeys(CLEANING_KINDS, 0)
        self.terms: dict[str, list[float]] = {}
        self.returns: list[float] = []
        self.obs: list[np.ndarray] = []
        self.last: list[dict] = []

    def add(self, obs: np.ndarray, rewards, infos: list[dict]) -> None:
        self.obs.append(np.asarray(obs, dtype=np.float32).copy())
        for reward, info in zip(rewards, infos, strict=True):
            self.rewards.append(float(reward))
            self.transitions.append(transition_record(info, reward))
            self.ops.append(int(info["op_id"]))
            self.rejected += int(info["rejected"])
            self.changed += int(info["changed"])
            for kind in info.get("cleaning") or ():
                self.cleaning[kind] += 1
            for name, value in info["reward_terms"].items():
                self.terms.setdefault(name, []).append(value)
            if "episode" in info:
                self.returns.append(float(info["episode"]["r"]))
        self.last = infos

    def summary(self, names: list[str]) -> dict:
        n = max(len(self.rewards), 1)
        counts = np.bincount(np.asarray(self.ops, dtype=int), minlength=self.n_ops) if self.ops else np.zeros(self.n_ops)
        row = {
            "mean_reward": float(np.mean(self.rewards)) if self.rewards else 0.0,
            "reward_sd": float(np.std(self.rewards)) if self.rewards else 0.0,  # population sd of the transitions
            "transitions": len(self.rewards),
            TRANSITIONS_KEY: [list(t) for t in self.transitions],
            "episodes": len(self.returns),
            "mean_episode_return": float(np.mean(self.returns)) if self.returns else None,
            "rejected_frac": self.rejected / n,
            "changed_frac": self.changed / n,
            **{f"cleaning/{kind}": count / n for kind, count in self.cleaning.items()},  # of n transitions
        }
        for name, values in self.terms.items():
            row[f"reward/{name}"] = float(np.mean(values))
        rewards, ops = np.asarray(self.rewards, dtype=float), np.asarray(self.ops, dtype=int)
        for i, name in enumerate(names):
            row[f"action_frac/{name}"] = float(counts[i] / n)
            if counts[i]:  # which operator pays: its mean reward over this update's transitions that chose it
                row[f"op_reward/{name}"] = float(rewards[ops == i].mean())
        return row


def _make_callback(recorder: UpdateRecorder):
    from stable_baselines3.common.callbacks import BaseCallback

    class RecordTransitions(BaseCallback):
        """Feeds every transition sb3 collects into the recorder (obs as the policy saw them)."""

        def _on_step(self) -> bool:
            recorder.add(self.locals["obs_tensor"].cpu().numpy(), self.locals["rewards"], self.locals["infos"])
            return True

    return RecordTransitions()


# ------------------------------------------------------------------------------------------------ trainers

class SB3Trainer:
    """One `learn` call per update: exactly one rollout of steps_per_update x n_envs, then one train step."""

    def __init__(self, s: PolicySettings, venv, recorder: UpdateRecorder):
        import torch

        from teams_rl.evol.agents import algorithm_class

        self.cls = algorithm_class(s.algorithm)
        self.venv = venv
        self.recorder = recorder
        self.rollout = s.rollout
        hyper = dict(s.hyperparams)
        if "batch_size" in hyper and hyper["batch_size"] is None:
            hyper["batch_size"] = self.rollout
        if s.algorithm == "a2c":
            hyper.pop("batch_size", None)
        policy_kwargs = dict(s.policy_kwargs)
        act = policy_kwargs.get("activation_fn")
        if isinstance(act, str):
            policy_kwargs["activation_fn"] = getattr(torch.nn, ACTIVATIONS[act.lower()])
        if s.action_space == "discrete":
            policy_kwargs.pop("log_std_init", None)
        self.kwargs = dict(n_steps=s.steps_per_update, seed=s.seed, device="cpu", verbose=0,
                           policy_kwargs=policy_kwargs, **hyper)
        try:
            self.model = self.cls("MlpPolicy", venv, **self.kwargs)
        except TypeError as err:
            raise TeamsRLError(f"rl.hyperparams: {err}") from None
        self.callback = _make_callback(recorder)

    def update(self) -> dict:
        self.model.learn(total_timesteps=self.rollout, reset_num_timesteps=False, callback=self.callback,
                         log_interval=None, progress_bar=False)
        logged = dict(self.model.logger.name_to_value)
        self.model.logger.name_to_value.clear()
        return {k: float(v) for k, v in logged.items() if k.startswith("train/") and np.isscalar(v)}

    def save(self, folder: Path) -> None:
        """Nothing beyond the agent folder: its policy.zip is the full sb3 model (optimizer included)."""

    def load(self, folder: Path) -> None:
        from teams_rl.evol.agents import POLICY_FILE

        self.model = self.cls.load(folder / POLICY_FILE, env=self.venv, device="cpu")

    def set_observation(self, obs: np.ndarray, original: np.ndarray | None = None) -> None:
        """Where the next rollout starts after a restore. sb3 keeps it in (private) attributes that `learn`
        only sets on a fresh start; this is the one place that touches them."""
        if original is not None:
            self.model._last_original_obs = original
        self.model._last_obs = obs

    @property
    def timesteps(self) -> int:
        return int(self.model.num_timesteps)


class BaselineTrainer:
    """random / fixed: the agent picks operators, nothing is learned."""

    def __init__(self, s: PolicySettings, venv, recorder: UpdateRecorder, agent):
        self.venv = venv
        self.recorder = recorder
        self.agent = agent
        self.steps = s.steps_per_update
        self.rng = np.random.default_rng(s.seed)
        self.obs = None
        self.timesteps = 0

    def update(self) -> dict:
        if self.obs is None:
            self.obs = self.venv.reset()
        for _ in range(self.steps):
            step = self.venv.envs[0].ep.step
            actions = self.agent.action_scores(self.obs, step, deterministic=False, rng=self.rng).argmax(axis=1)
            before = self.obs
            self.obs, rewards, _, infos = self.venv.step(actions)
            self.recorder.add(before, rewards, infos)
            self.timesteps += self.venv.num_envs
        return {}

    def save(self, folder: Path) -> None:
        (folder / "baseline.json").write_text(json.dumps({"rng": self.rng.bit_generator.state,
                                                          "timesteps": self.timesteps,
                                                          "obs": None if self.obs is None else self.obs.tolist()}))

    def load(self, folder: Path) -> None:
        state = json.loads((folder / "baseline.json").read_text())
        self.rng.bit_generator.state = state["rng"]
        self.timesteps = int(state["timesteps"])
        if state.get("obs") is not None:
            self.obs = np.asarray(state["obs"], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ one run

def env_parts(s: PolicySettings, n_ops: int, reward_cfg, llm: Callable, llm_threads: int | None):
    """(reward, instructor client, observation encoder, EnvSettings) of the policy's evolution envs."""
    from teams_rl.evol.env import EnvSettings
    from teams_rl.evol.observations import ObservationEncoder
    from teams_rl.evol.rewards import build_reward

    reward = build_reward(reward_cfg, reviewer=lambda: ThreadedClient(llm("reviewer"), llm_threads))
    settings = EnvSettings(episode_length=s.episode_length, action_space=s.action_space,
                           action_bias=None if s.bias is None else list(s.bias),
                           carry_instruction=s.carry_instruction, max_tokens=s.max_tokens,
                           temperature=s.temperature, min_words=s.min_words, seed=s.seed)
    return (reward, ThreadedClient(llm("instructor"), llm_threads),
            ObservationEncoder(s.obs, n_ops, s.episode_length), settings)


class PolicyTraining:
    """One policy-training run: the batched env over the instructor, the reward, the trainer and its history.

    `llm(role)` returns the role's LLM client (only asked for the reviewer when the reward uses it);
    `llm_threads` is the torch thread count for LLM calls (the policy networks train on `s.torch_threads`)."""

    def __init__(self, s: PolicySettings, opset, seeds: list, reward_cfg, llm: Callable, llm_threads: int | None = None):
        from teams_rl.evol.env import EvolutionVecEnv, make_envs

        self.s = s
        self.opset = opset
        self.names = opset.names
        self.llm = llm
        self.reward, self.instructor, self.encoder, settings = env_parts(s, len(opset), reward_cfg, llm, llm_threads)
        self.raw_env = EvolutionVecEnv(make_envs(s.n_envs, self.instructor, opset, seeds, self.reward, self.encoder,
                                                 settings))
        self.venv = self.raw_env
        self.vecnorm = None
        if s.normalize_obs:
            from stable_baselines3.common.vec_env import VecNormalize

            self.vecnorm = VecNormalize(self.raw_env, norm_obs=True, norm_reward=False, clip_obs=s.obs_clip,
                                        gamma=float(s.hyperparams.get("gamma", 0.99)))
            self.venv = self.vecnorm
        self.recorder = UpdateRecorder(len(opset))
        self.history: list[dict] = []
        self.done = 0
        if s.trains:
            self.trainer = SB3Trainer(s, self.venv, self.recorder)
        else:
            from teams_rl.evol.agents import Agent

            self.trainer = BaselineTrainer(s, self.raw_env, self.recorder, Agent(self.agent_meta()))
        self.sent_before = {"instructor": 0, "reviewer": 0, "cache_hits_instructor": 0, "cache_hits_reviewer": 0}
        self.accounts_at_start = self._accounts()
        self.prob_rng = np.random.default_rng(s.seed + 1)

    # -- agent ----------------------------------------------------------------------------------------
    def agent_meta(self) -> dict:
        s = self.s
        norm = None
        if self.vecnorm is not None:
            rms = self.vecnorm.obs_rms
            norm = {"mean": rms.mean.tolist(), "var": rms.var.tolist(), "clip": float(self.vecnorm.clip_obs),
                    "epsilon": float(self.vecnorm.epsilon)}
        return {
            "algorithm": s.algorithm, "action_space": s.action_space, "operators": self.names,
            "operator_set": self.opset.name, "episode_length": s.episode_length,
            "obs": self.encoder.describe(), "obs_norm": norm,
            "action_bias": None if s.bias is None else list(s.bias),
            "schedule": list(s.schedule), "seed": s.seed, "update": self.done,
        }

    def agent(self):
        from teams_rl.evol.agents import Agent

        return Agent(self.agent_meta(), model=getattr(self.trainer, "model", None))

    @property
    def model(self):
        return getattr(self.trainer, "model", None)

    # -- accounting -----------------------------------------------------------------------------------
    def _accounts(self) -> dict:
        """(queries sent, cache hits) per role this run talks to, from the LLM layer's accounting."""
        roles = ["instructor"] + (["reviewer"] if self.reward.uses_reviewer else [])
        out = {}
        for role in roles:
            total = self.llm(role).account.total
            out[role] = (total.queries, total.cache_hits)
        return out

    def llm_counts(self) -> dict:
        now = self._accounts()
        out = {}
        for role in ROLES:
            sent, hits = now.get(role, (0, 0))
            sent0, hits0 = self.accounts_at_start.get(role, (0, 0))
            out[f"llm_queries/{role}"] = self.sent_before[role] + sent - sent0
            out[f"llm_cache_hits/{role}"] = self.sent_before[f"cache_hits_{role}"] + hits - hits0
        for role, n in self.raw_env.total_queries.items():
            out[f"requests/{role}"] = n
        return out

    # -- one update -----------------------------------------------------------------------------------
    def update(self) -> dict:
        t0 = time.perf_counter()
        self.recorder.clear()
        train = self.trainer.update()
        self.done += 1
        row = {"update": self.done, "timesteps": self.trainer.timesteps}
        row.update(self.recorder.summary(self.names))
        probs = self._probabilities()
        for i, name in enumerate(self.names):
            row[f"op_prob/{name}"] = float(probs.mean(axis=0)[i])
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
        row["entropy"] = float(ent.mean())
        row.update(self.llm_counts())
        row["judge_unparsable"] = int(self.reward.totals.get("judge_unparsable", 0))
        row.update(train)
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        return row

    def _probabilities(self) -> np.ndarray:
        """P(operator) under the current policy at the observations of this update."""
        obs = np.concatenate(self.recorder.obs) if self.recorder.obs else np.zeros((1, self.encoder.dim), np.float32)
        if self.s.algorithm == "fixed":  # the schedule is the policy: its choices are its probabilities
            return np.eye(len(self.names))[np.asarray(self.recorder.ops or [0], dtype=int)]
        # sb3 recorded the observations as the policy saw them (already normalised)
        return self.agent().probabilities(obs, samples=self.s.prob_samples, rng=self.prob_rng, normalized=True)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, out_dir: Path) -> Path:
        import torch

        from teams_rl.evol.agents import write_agent

        root = Path(out_dir) / CHECKPOINTS
        folder = root / f"update_{self.done:06d}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_agent(folder, self.agent_meta(), self.model)
        self.trainer.save(folder)
        if self.vecnorm is not None:
            self.vecnorm.save(str(folder / "vecnormalize.pkl"))
        counts = self.llm_counts()
        state = {
            "update": self.done, "env": self.raw_env.get_state(), "history": self.history,
            "judge_totals": self.reward.totals,
            "llm": {"instructor": counts["llm_queries/instructor"], "reviewer": counts["llm_queries/reviewer"],
                    "cache_hits_instructor": counts["llm_cache_hits/instructor"],
                    "cache_hits_reviewer": counts["llm_cache_hits/reviewer"]},
        }
        (folder / "state.json").write_text(json.dumps(state))
        with open(folder / "rng.pkl", "wb") as fh:
            pickle.dump({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                         "prob_rng": self.prob_rng.bit_generator.state}, fh)
        write_json_atomic(root / LATEST, {"update": self.done, "folder": folder.name})
        keep = self.s.keep_checkpoints
        if keep:  # the rolling window; updates named in policy.keep_updates are never pruned
            kept = {f"update_{u:06d}" for u in self.s.keep_updates}
            old = sorted(p for p in root.glob("update_*") if p.is_dir() and p != folder and p.name not in kept)
            for path in old[: max(0, len(old) - (int(keep) - 1))]:
                shutil.rmtree(path, ignore_errors=True)
        return folder

    def restore(self, out_dir: Path) -> bool:
        """Continue from the last checkpoint in `out_dir`, if any (True when restored)."""
        import torch

        latest = Path(out_dir) / CHECKPOINTS / LATEST
        if not latest.is_file():
            return False
        pointer = json.loads(latest.read_text())
        folder = Path(out_dir) / CHECKPOINTS / pointer["folder"]
        state = json.loads((folder / "state.json").read_text())
        self.trainer.load(folder)
        if self.vecnorm is not None:
            from stable_baselines3.common.vec_env import VecNormalize

            loaded = VecNormalize.load(str(folder / "vecnormalize.pkl"), self.raw_env)
            self.vecnorm.obs_rms, self.vecnorm.ret_rms = loaded.obs_rms, loaded.ret_rms
        obs = self.raw_env.set_state(state["env"])
        if isinstance(self.trainer, SB3Trainer):
            if self.vecnorm is not None:
                self.trainer.set_observation(self.vecnorm.normalize_obs(obs), original=obs)
            else:
                self.trainer.set_observation(obs)
        with open(folder / "rng.pkl", "rb") as fh:
            rng = pickle.load(fh)  # our own file, written by save_checkpoint
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.prob_rng.bit_generator.state = rng["prob_rng"]
        self.done = int(state["update"])
        self.history = list(state["history"])
        self.reward.totals = dict(state.get("judge_totals") or {})
        self.sent_before = dict(state["llm"])
        self.accounts_at_start = self._accounts()
        return True


def seed_pool(s: PolicySettings, seeds_cfg) -> list:
    """The seed instructions episodes start from: `policy.seed_instructions`, else the `seeds` group."""
    if s.seed_instructions:
        return [(f"policy-{i}", text) for i, text in enumerate(s.seed_instructions)]
    if seeds_cfg is None:
        raise TeamsRLError("no seed instructions: set the `seeds` group or policy.seed_instructions")
    from teams_rl.evol.seeds import load_seeds

    return load_seeds(seeds_cfg)


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    """`metrics.jsonl`, one row per update, replaced as a whole (a reader never sees half a file)."""
    tmp = Path(out_dir) / ".metrics.jsonl.tmp"
    with open(tmp, "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(Path(out_dir) / "metrics.jsonl")
