"""Stage `policy`: learn which textual operator to apply next (the paper's RL step).

Rolls out `policy.n_envs` evolution episodes in one batched `EvolutionVecEnv` (instructor LLM rewrites,
reward from `cfg.reward`) and trains the `cfg.rl` algorithm (stable-baselines3 / sb3-contrib TRPO, PPO, A2C)
for `policy.updates` updates of `policy.steps_per_update` transitions per env; the baselines `random` and
`fixed` train nothing but roll out the same budget so their reward curves compare.

Artifact folder: agent.json + policy.zip (the agent, see `teams_rl.evol.agents`), metrics.jsonl (one row per
update), learning_curve.png, checkpoints/ (the last saved update: a loadable agent folder plus the sb3
model, env state and RNG states; a killed run resumes from it).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from teams_rl.artifacts import write_json_atomic
from teams_rl.errors import TeamsRLError

log = logging.getLogger(__name__)

VERSION = 1
RESUMABLE = True
INPUTS: list[str] = []

# policy.* keys that change how the run is carried out but not its result (kept out of the fingerprint)
MECHANICS = ("checkpoint_every", "keep_checkpoints", "progress", "torch_threads")
ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "gelu": "GELU", "leaky_relu": "LeakyReLU"}
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def _reward_uses_reviewer(cfg) -> bool:
    from teams_rl.evol.rewards import reward_uses_reviewer

    return reward_uses_reviewer(cfg.get("reward"))


def config_keys(cfg: DictConfig) -> list[str]:
    keys = [f"policy.{k}" for k in (cfg.get("policy") or {}) if k not in MECHANICS]
    keys += ["rl", "reward", "operators", "instructor"]
    if _reward_uses_reviewer(cfg):
        keys.append("reviewer")
    if not (cfg.get("policy") or {}).get("seed_instructions"):
        keys.append("seeds")
    return keys


# ------------------------------------------------------------------------------------------------ settings

def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _settings(cfg: DictConfig, names: list[str]) -> dict:
    """Validated policy + rl settings (one clear line per mistake, before anything is loaded)."""
    from teams_rl.evol.agents import ALGORITHMS
    from teams_rl.evol.observations import OBS_KINDS

    pol = _plain(cfg.get("policy"))
    rl = _plain(cfg.get("rl"))
    if not pol:
        raise TeamsRLError("no policy settings (the `policy` config group is missing)")
    if not rl:
        raise TeamsRLError("no rl algorithm configured (choose one with rl=trpo|trpo_paper|ppo|a2c|random|fixed)")
    algorithm = rl.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise TeamsRLError(f"rl.algorithm '{algorithm}' is unknown (choose one of: {', '.join(ALGORITHMS)})")
    for key in ("episode_length", "n_envs", "steps_per_update", "updates"):
        if not isinstance(pol.get(key), int) or pol[key] < 1:
            raise TeamsRLError(f"policy.{key} must be a positive integer, got {pol.get(key)!r}")
    if pol.get("obs") not in OBS_KINDS:
        raise TeamsRLError(f"policy.obs must be one of {', '.join(OBS_KINDS)}, got {pol.get('obs')!r}")
    action_space = rl.get("action_space", "discrete")
    if action_space not in ("discrete", "box"):
        raise TeamsRLError(f"rl.action_space must be discrete or box, got {action_space!r}")
    if algorithm in ("random", "fixed") and action_space != "discrete":
        raise TeamsRLError(f"rl.algorithm={algorithm} chooses operators directly: use rl.action_space=discrete")
    bias_cfg = rl.get("action_bias") or {}
    if bias_cfg and action_space != "box":
        raise TeamsRLError("rl.action_bias needs rl.action_space=box (a categorical policy has no bias vector)")
    library = set((_plain(cfg.operators) or {}).get("library") or {})
    bias = np.zeros(len(names))
    for name, value in bias_cfg.items():
        if name not in library and name not in names:
            raise TeamsRLError(f"rl.action_bias names unknown operator '{name}'")
        if name in names:
            bias[names.index(name)] = float(value)
        else:
            log.info("rl.action_bias: operator '%s' is not in this set; its bias is ignored", name)
    schedule = []
    if algorithm == "fixed":
        wanted = rl.get("schedule") or []
        if not wanted:
            raise TeamsRLError("rl=fixed needs rl.schedule: a list of operator names")
        for name in wanted:
            if name not in names:
                raise TeamsRLError(f"rl.schedule names '{name}', which is not in the operator set "
                                   f"({', '.join(names)})")
            schedule.append(names.index(name))
    seed_instructions = pol.get("seed_instructions")
    if seed_instructions is not None and (isinstance(seed_instructions, str) or not seed_instructions):
        raise TeamsRLError("policy.seed_instructions must be null or a non-empty list of instructions")
    return {
        "pol": pol, "rl": rl, "algorithm": algorithm, "action_space": action_space,
        "bias": bias if action_space == "box" else None, "schedule": schedule,
    }


def _seed_pool(cfg: DictConfig, pol: dict) -> list:
    if pol.get("seed_instructions"):
        return [(f"policy-{i}", str(text)) for i, text in enumerate(pol["seed_instructions"])]
    if cfg.get("seeds") is None:
        raise TeamsRLError("no seed instructions: set the `seeds` group or policy.seed_instructions")
    from teams_rl.evol.seeds import load_seeds

    return load_seeds(cfg.seeds)


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

    def __init__(self, client, threads: int):
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
        self.ops: list[int] = []
        self.rejected = 0
        self.changed = 0
        self.terms: dict[str, list[float]] = {}
        self.returns: list[float] = []
        self.obs: list[np.ndarray] = []
        self.last: list[dict] = []

    def add(self, obs: np.ndarray, rewards, infos: list[dict]) -> None:
        self.obs.append(np.asarray(obs, dtype=np.float32).copy())
        for reward, info in zip(rewards, infos, strict=True):
            self.rewards.append(float(reward))
            self.ops.append(int(info["op_id"]))
            self.rejected += int(info["rejected"])
            self.changed += int(info["changed"])
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
            "episodes": len(self.returns),
            "mean_episode_return": float(np.mean(self.returns)) if self.returns else None,
            "rejected_frac": self.rejected / n,
            "changed_frac": self.changed / n,
        }
        for name, values in self.terms.items():
            row[f"reward/{name}"] = float(np.mean(values))
        for i, name in enumerate(names):
            row[f"action_frac/{name}"] = float(counts[i] / n)
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

    def __init__(self, s: dict, venv, recorder: UpdateRecorder):
        import torch

        from teams_rl.evol.agents import algorithm_class

        rl, pol = s["rl"], s["pol"]
        self.cls = algorithm_class(s["algorithm"])
        self.venv = venv
        self.recorder = recorder
        self.rollout = pol["steps_per_update"] * pol["n_envs"]
        hyper = dict(rl.get("hyperparams") or {})
        if "batch_size" in hyper and hyper["batch_size"] is None:
            hyper["batch_size"] = self.rollout
        if s["algorithm"] == "a2c":
            hyper.pop("batch_size", None)
        policy_kwargs = dict(rl.get("policy_kwargs") or {})
        act = policy_kwargs.get("activation_fn")
        if isinstance(act, str):
            if act.lower() not in ACTIVATIONS:
                raise TeamsRLError(f"rl.policy_kwargs.activation_fn '{act}' is unknown ({', '.join(ACTIVATIONS)})")
            policy_kwargs["activation_fn"] = getattr(torch.nn, ACTIVATIONS[act.lower()])
        if s["action_space"] == "discrete":
            policy_kwargs.pop("log_std_init", None)
        self.kwargs = dict(n_steps=pol["steps_per_update"], seed=int(pol["seed"]), device="cpu", verbose=0,
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

    @property
    def timesteps(self) -> int:
        return int(self.model.num_timesteps)


class BaselineTrainer:
    """random / fixed: the agent picks operators, nothing is learned."""

    def __init__(self, s: dict, venv, recorder: UpdateRecorder, agent):
        self.venv = venv
        self.recorder = recorder
        self.agent = agent
        self.steps = s["pol"]["steps_per_update"]
        self.rng = np.random.default_rng(int(s["pol"]["seed"]))
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
                                                          "timesteps": self.timesteps}))

    def load(self, folder: Path) -> None:
        state = json.loads((folder / "baseline.json").read_text())
        self.rng.bit_generator.state = state["rng"]
        self.timesteps = int(state["timesteps"])


# ------------------------------------------------------------------------------------------------ the stage

class PolicyRun:
    """Everything one policy-training run holds; `run()` below drives it update by update."""

    def __init__(self, cfg: DictConfig, ctx, llm_threads: int | None = None):
        from teams_rl.evol.env import EnvSettings, EvolutionVecEnv, make_envs
        from teams_rl.evol.observations import ObservationEncoder
        from teams_rl.evol.operators import load_operator_set
        from teams_rl.evol.rewards import build_reward

        self.cfg, self.ctx = cfg, ctx
        self.opset = load_operator_set(cfg.get("operators"))
        self.names = self.opset.names
        self.s = s = _settings(cfg, self.names)
        pol = s["pol"]
        self.seeds = _seed_pool(cfg, pol)
        self.reward = build_reward(cfg.get("reward"), reviewer=lambda: ThreadedClient(ctx.llm("reviewer"), llm_threads))
        self.instructor = ThreadedClient(ctx.llm("instructor"), llm_threads)
        self.encoder = ObservationEncoder(pol["obs"], len(self.opset), pol["episode_length"])
        settings = EnvSettings(episode_length=pol["episode_length"], action_space=s["action_space"],
                               action_bias=None if s["bias"] is None else list(s["bias"]),
                               carry_instruction=bool(pol.get("carry_instruction")),
                               max_tokens=pol.get("max_tokens"), temperature=pol.get("temperature"),
                               min_words=int(pol.get("min_words") or 1), seed=int(pol["seed"]))
        self.raw_env = EvolutionVecEnv(make_envs(pol["n_envs"], self.instructor, self.opset, self.seeds,
                                                 self.reward, self.encoder, settings))
        self.venv = self.raw_env
        self.vecnorm = None
        if s["rl"].get("normalize_obs"):
            from stable_baselines3.common.vec_env import VecNormalize

            self.vecnorm = VecNormalize(self.raw_env, norm_obs=True, norm_reward=False,
                                        clip_obs=float(s["rl"].get("obs_clip", 5.0)),
                                        gamma=float((s["rl"].get("hyperparams") or {}).get("gamma", 0.99)))
            self.venv = self.vecnorm
        self.recorder = UpdateRecorder(len(self.opset))
        self.history: list[dict] = []
        self.done = 0
        if s["algorithm"] in ("random", "fixed"):
            from teams_rl.evol.agents import Agent

            self.trainer = BaselineTrainer(s, self.raw_env, self.recorder, Agent(self.agent_meta()))
        else:
            self.trainer = SB3Trainer(s, self.venv, self.recorder)
        self.sent_before = {"instructor": 0, "reviewer": 0, "cache_hits_instructor": 0, "cache_hits_reviewer": 0}
        self.accounts_at_start = self._accounts()
        self.prob_rng = np.random.default_rng(int(pol["seed"]) + 1)

    # -- agent ----------------------------------------------------------------------------------------
    def agent_meta(self) -> dict:
        s, pol = self.s, self.s["pol"]
        norm = None
        if self.vecnorm is not None:
            rms = self.vecnorm.obs_rms
            norm = {"mean": rms.mean.tolist(), "var": rms.var.tolist(), "clip": float(self.vecnorm.clip_obs),
                    "epsilon": float(self.vecnorm.epsilon)}
        return {
            "algorithm": s["algorithm"], "action_space": s["action_space"], "operators": self.names,
            "operator_set": self.opset.name, "episode_length": pol["episode_length"],
            "obs": self.encoder.describe(), "obs_norm": norm,
            "action_bias": None if s["bias"] is None else [float(b) for b in s["bias"]],
            "schedule": s["schedule"], "seed": int(pol["seed"]), "update": self.done,
        }

    def agent(self):
        from teams_rl.evol.agents import Agent

        return Agent(self.agent_meta(), model=getattr(self.trainer, "model", None))

    # -- accounting -----------------------------------------------------------------------------------
    def _accounts(self) -> dict:
        """(queries sent, cache hits) per role this stage talks to, from the LLM layer's accounting."""
        roles = ["instructor"] + (["reviewer"] if self.reward.uses_reviewer else [])
        out = {}
        for role in roles:
            total = self.ctx.llm(role).account.total
            out[role] = (total.queries, total.cache_hits)
        return out

    def llm_counts(self) -> dict:
        now = self._accounts()
        out = {}
        for role in ("instructor", "reviewer"):
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
        agent = self.agent()
        if self.s["algorithm"] == "fixed":  # the schedule is the policy: its choices are its probabilities
            return np.eye(len(self.names))[np.asarray(self.recorder.ops or [0], dtype=int)]
        # sb3 recorded the observations as the policy saw them (already normalised)
        return agent.probabilities(obs, samples=int(self.s["pol"].get("prob_samples") or 1024), rng=self.prob_rng,
                                   normalized=True)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, out_dir: Path) -> Path:
        import torch

        from teams_rl.evol.agents import write_agent

        root = out_dir / CHECKPOINTS
        folder = root / f"update_{self.done:06d}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_agent(folder, self.agent_meta(), getattr(self.trainer, "model", None))
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
            "baseline_obs": None if not isinstance(self.trainer, BaselineTrainer) or self.trainer.obs is None
            else self.trainer.obs.tolist(),
        }
        (folder / "state.json").write_text(json.dumps(state))
        with open(folder / "rng.pkl", "wb") as fh:
            pickle.dump({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                         "prob_rng": self.prob_rng.bit_generator.state}, fh)
        write_json_atomic(root / LATEST, {"update": self.done, "folder": folder.name})
        keep = self.s["pol"].get("keep_checkpoints")
        if keep:
            old = sorted(p for p in root.glob("update_*") if p.is_dir() and p != folder)
            for path in old[: max(0, len(old) - (int(keep) - 1))]:
                shutil.rmtree(path, ignore_errors=True)
        return folder

    def restore(self, out_dir: Path) -> bool:
        """Continue from the last checkpoint in `out_dir`, if any (True when restored)."""
        import torch

        latest = out_dir / CHECKPOINTS / LATEST
        if not latest.is_file():
            return False
        pointer = json.loads(latest.read_text())
        folder = out_dir / CHECKPOINTS / pointer["folder"]
        state = json.loads((folder / "state.json").read_text())
        self.trainer.load(folder)
        if self.vecnorm is not None:
            from stable_baselines3.common.vec_env import VecNormalize

            loaded = VecNormalize.load(str(folder / "vecnormalize.pkl"), self.raw_env)
            self.vecnorm.obs_rms, self.vecnorm.ret_rms = loaded.obs_rms, loaded.ret_rms
        obs = self.raw_env.set_state(state["env"])
        if isinstance(self.trainer, SB3Trainer):
            model = self.trainer.model
            if self.vecnorm is not None:
                model._last_original_obs = obs
                obs = self.vecnorm.normalize_obs(obs)
            model._last_obs = obs
        elif state.get("baseline_obs") is not None:
            self.trainer.obs = np.asarray(state["baseline_obs"], dtype=np.float32)
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


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    tmp = out_dir / ".metrics.jsonl.tmp"
    with open(tmp, "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(out_dir / "metrics.jsonl")


def plot_learning_curve(history: list[dict], names: list[str], path: Path, title: str) -> None:
    """Mean reward per update (and a moving average) above the policy's operator probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [row["update"] for row in history]
    rewards = np.array([row["mean_reward"] for row in history], dtype=float)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.plot(updates, rewards, marker="o", ms=3, lw=1, label="mean reward per step")
    if len(rewards) >= 5:
        k = max(2, len(rewards) // 10)
        smooth = np.convolve(rewards, np.ones(k) / k, mode="valid")
        ax1.plot(updates[k - 1:], smooth, lw=2, label=f"moving average ({k})")
    ax1.set_ylabel("reward")
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)
    probs = np.array([[row.get(f"op_prob/{n}", 0.0) for n in names] for row in history], dtype=float)
    ax2.stackplot(updates, probs.T, labels=names, alpha=0.85)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("update")
    ax2.set_ylabel("P(operator)")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_row(ctx, row: dict) -> None:
    ctx.log({k: v for k, v in row.items() if v is not None and k != "update"}, step=row["update"])


def run(cfg: DictConfig, ctx) -> dict:
    import torch

    out_dir = Path(ctx.out_dir)
    llm_threads = torch.get_num_threads()
    with torch_threads((cfg.policy or {}).get("torch_threads", 1)):
        return _train(cfg, ctx, out_dir, llm_threads)


def _train(cfg: DictConfig, ctx, out_dir: Path, llm_threads: int) -> dict:
    from tqdm.auto import tqdm

    from teams_rl.evol.agents import write_agent

    runner = PolicyRun(cfg, ctx, llm_threads)
    pol = runner.s["pol"]
    if runner.restore(out_dir):
        log.info("policy: resuming after update %d of %d", runner.done, pol["updates"])
        _write_metrics(out_dir, runner.history)
    every = max(1, int(pol.get("checkpoint_every") or 1))
    title = f"{runner.s['algorithm']} on {runner.opset.name} ({pol['n_envs']} envs x {pol['steps_per_update']} steps/update)"
    with tqdm(total=pol["updates"], initial=runner.done, desc=f"policy {runner.s['algorithm']}", unit="update",
              disable=not pol.get("progress", True)) as bar:
        while runner.done < pol["updates"]:
            row = runner.update()
            runner.history.append(row)
            if runner.done % every == 0 or runner.done == pol["updates"]:
                runner.save_checkpoint(out_dir)
            _write_metrics(out_dir, runner.history)
            _log_row(ctx, row)
            bar.set_postfix(reward=f"{row['mean_reward']:.3f}", entropy=f"{row['entropy']:.2f}")
            bar.update(1)

    write_agent(out_dir, runner.agent_meta(), getattr(runner.trainer, "model", None))
    plot = out_dir / "learning_curve.png"
    if runner.history:
        plot_learning_curve(runner.history, runner.names, plot, title)
        ctx.tracker.log_image("policy/learning_curve", plot)
    last = runner.history[-1] if runner.history else {}
    first = runner.history[0] if runner.history else {}
    metrics = {
        "algorithm": runner.s["algorithm"],
        "operator_set": runner.opset.name,
        "updates": runner.done,
        "timesteps": last.get("timesteps", 0),
        "first_mean_reward": first.get("mean_reward"),
        "final_mean_reward": last.get("mean_reward"),
        "mean_reward": float(np.mean([r["mean_reward"] for r in runner.history])) if runner.history else None,
        "final_entropy": last.get("entropy"),
        "judge_unparsable": last.get("judge_unparsable", 0),
        "rejected_frac": float(np.mean([r["rejected_frac"] for r in runner.history])) if runner.history else None,
    }
    for key in ("llm_queries/instructor", "llm_queries/reviewer", "requests/instructor", "requests/reviewer"):
        metrics[key] = last.get(key, 0)
    for name in runner.names:
        metrics[f"op_prob/{name}"] = last.get(f"op_prob/{name}")
    return metrics
