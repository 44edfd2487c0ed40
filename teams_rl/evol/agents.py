"""A trained (or baseline) operator-choosing policy, loadable from a policy artifact folder.

An agent folder holds `agent.json` and, for trained algorithms, stable-baselines3's `policy.zip`:

  agent.json: {format, algorithm (trpo|trpo_paper|ppo|a2c|random|fixed), action_space (discrete|box),
               operators [names, action-index order], operator_set, episode_length, obs {kind, n_ops,
               episode_length, dim}, obs_norm {mean, var, clip, epsilon} | null, action_bias [floats] | null
               (box: the bias used in training), schedule [op indices] (fixed), policy_file, update, seed}

`Agent.action_scores` gives one score per operator (higher = preferred); a generation driver adds its own
biases / forced operators to the scores and takes the argmax.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import numpy as np

from teams_rl.errors import TeamsRLError
from teams_rl.evol.observations import ObservationEncoder

AGENT_FILE = "agent.json"
POLICY_FILE = "policy.zip"
FORMAT = 1

# algorithm name -> (module, class); trpo_paper is TRPO with the paper's settings and a Box action space
SB3_ALGORITHMS = {
    "trpo": ("sb3_contrib", "TRPO"),
    "trpo_paper": ("sb3_contrib", "TRPO"),
    "ppo": ("stable_baselines3", "PPO"),
    "a2c": ("stable_baselines3", "A2C"),
}
BASELINES = ("random", "fixed")
ALGORITHMS = tuple(SB3_ALGORITHMS) + BASELINES


def algorithm_class(name: str):
    """The stable-baselines3 / sb3-contrib class that trains `name`."""
    if name not in SB3_ALGORITHMS:
        raise TeamsRLError(f"'{name}' is not a trainable algorithm (trainable: {', '.join(SB3_ALGORITHMS)})")
    module, cls = SB3_ALGORITHMS[name]
    return getattr(import_module(module), cls)


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    u = rng.random(shape)
    return -np.log(-np.log(np.clip(u, 1e-12, 1.0 - 1e-12)))


class Agent:
    """Scores operators for a batch of observations (see `action_scores`). `obs_encoder` builds the
    observations it expects from (instructions, last_ops, steps)."""

    def __init__(self, meta: dict, model=None):
        self.meta = dict(meta)
        self.algorithm = str(meta["algorithm"])
        if self.algorithm not in ALGORITHMS:
            raise TeamsRLError(f"agent.json: unknown algorithm '{self.algorithm}'")
        self.action_space = str(meta.get("action_space", "discrete"))
        self.operators: list[str] = list(meta["operators"])
        self.n_ops = len(self.operators)
        self.episode_length = int(meta["episode_length"])
        obs = meta.get("obs") or {"kind": "last_op"}
        self.obs_encoder = ObservationEncoder(obs["kind"], self.n_ops, self.episode_length)
        norm = meta.get("obs_norm")
        self._norm = None
        if norm:
            self._norm = (np.asarray(norm["mean"], dtype=np.float64), np.asarray(norm["var"], dtype=np.float64),
                          float(norm.get("clip", 10.0)), float(norm.get("epsilon", 1e-8)))
        bias = meta.get("action_bias")
        self.training_bias = None if bias is None else np.asarray(bias, dtype=np.float64)
        self.schedule = [int(i) for i in meta.get("schedule") or []]
        if self.algorithm == "fixed" and not self.schedule:
            raise TeamsRLError("agent.json: a fixed agent needs a non-empty schedule")
        self.model = model
        if self.algorithm in SB3_ALGORITHMS and model is None:
            raise TeamsRLError(f"a {self.algorithm} agent needs its trained policy ({POLICY_FILE})")

    # -- observations -------------------------------------------------------------------------------
    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Apply the training-time observation normalisation (identity when there was none)."""
        obs = np.asarray(obs, dtype=np.float32)
        if self._norm is None:
            return obs
        mean, var, clip, eps = self._norm
        return np.clip((obs - mean) / np.sqrt(var + eps), -clip, clip).astype(np.float32)

    def _distribution(self, obs: np.ndarray):
        import torch

        policy = self.model.policy
        with torch.no_grad():
            tensor = torch.as_tensor(self.normalize(obs), dtype=torch.float32, device=policy.device)
            return policy.get_distribution(tensor).distribution

    # -- scores ---------------------------------------------------------------------------------------
    def action_scores(self, obs: np.ndarray, step: int, deterministic: bool = True,
                      rng: np.random.Generator | None = None) -> np.ndarray:
        """Scores [N, n_ops] for raw observations [N, d] (from `obs_encoder.encode`) at episode step `step`
        (the number of steps already taken, 0 for the first action); argmax = the agent's choice.

        box policy: the Gaussian sample (the mean when deterministic) BEFORE any bias;
        discrete policy: log-probabilities (plus Gumbel noise when not deterministic, so argmax samples);
        random: i.i.d. uniform scores; fixed: one-hot of the schedule at `step`.
        """
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float32))
        n = obs.shape[0]
        if self.algorithm == "random":
            return (rng or np.random.default_rng()).random((n, self.n_ops))
        if self.algorithm == "fixed":
            scores = np.zeros((n, self.n_ops))
            scores[:, self.schedule[int(step) % len(self.schedule)]] = 1.0
            return scores
        dist = self._distribution(obs)
        if self.action_space == "box":
            mean = dist.mean.cpu().numpy().astype(np.float64)
            if deterministic:
                return mean
            std = dist.stddev.cpu().numpy().astype(np.float64)
            return mean + std * (rng or np.random.default_rng()).standard_normal(mean.shape)
        logp = dist.logits.cpu().numpy().astype(np.float64)  # torch normalises Categorical logits to log-probs
        if deterministic:
            return logp
        return logp + _gumbel(rng or np.random.default_rng(), logp.shape)

    def probabilities(self, obs: np.ndarray, step: int = 0, bias: np.ndarray | None = None, samples: int = 1024,
                      rng: np.random.Generator | None = None, normalized: bool = False) -> np.ndarray:
        """P(operator | obs) [N, n_ops] under stochastic action selection. For a box policy this is the
        probability that argmax(sample + bias) picks each operator (Monte Carlo, `samples` draws; `bias`
        defaults to the training bias). `normalized=True`: `obs` are already normalised (training rollouts)."""
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float32))
        n = obs.shape[0]
        if self.algorithm == "random":
            return np.full((n, self.n_ops), 1.0 / self.n_ops)
        if self.algorithm == "fixed":
            return self.action_scores(obs, step)
        if normalized:
            saved, self._norm = self._norm, None
            try:
                dist = self._distribution(obs)
            finally:
                self._norm = saved
        else:
            dist = self._distribution(obs)
        if self.action_space == "discrete":
            return dist.probs.cpu().numpy().astype(np.float64)
        rng = rng or np.random.default_rng(0)
        mean = dist.mean.cpu().numpy().astype(np.float64)
        std = dist.stddev.cpu().numpy().astype(np.float64)
        b = self.training_bias if bias is None else np.asarray(bias, dtype=np.float64)
        draws = mean[:, None, :] + std[:, None, :] * rng.standard_normal((n, samples, self.n_ops))
        if b is not None:
            draws = draws + b
        picks = draws.argmax(axis=-1)
        return np.stack([np.bincount(row, minlength=self.n_ops) / samples for row in picks])


def write_agent(folder: Path, meta: dict, model=None) -> None:
    """Write `agent.json` (and `policy.zip` when a model is given) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **meta}
    if model is not None:
        model.save(folder / POLICY_FILE)
        meta["policy_file"] = POLICY_FILE
    else:
        meta["policy_file"] = None
    tmp = folder / f".{AGENT_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(folder / AGENT_FILE)


def load_agent(policy_artifact_dir: str | Path) -> Agent:
    """The agent stored in a policy artifact folder (or one of its `checkpoints/update_*` folders)."""
    folder = Path(policy_artifact_dir)
    path = folder / AGENT_FILE
    if not path.is_file():
        raise TeamsRLError(f"no {AGENT_FILE} in {folder} (is it a finished policy artifact?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TeamsRLError(f"{path}: invalid JSON ({err.msg})") from None
    for key in ("algorithm", "operators", "episode_length"):
        if key not in meta:
            raise TeamsRLError(f"{path}: missing '{key}'")
    model = None
    if meta["algorithm"] in SB3_ALGORITHMS:
        policy_path = folder / (meta.get("policy_file") or POLICY_FILE)
        if not policy_path.is_file():
            raise TeamsRLError(f"{folder}: the {meta['algorithm']} agent's {policy_path.name} is missing")
        try:
            model = algorithm_class(meta["algorithm"]).load(policy_path, device="cpu")
        except Exception as err:  # a truncated or foreign zip: one line, not sb3's traceback
            raise TeamsRLError(f"{policy_path}: cannot load the {meta['algorithm']} policy "
                               f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None
    return Agent(meta, model=model)
