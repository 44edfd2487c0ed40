"""What the policy sees of an episode: the last operator (the paper), the step, nothing, or an embedding of the
instruction."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from teams_rl.errors import TeamsRLError

OBS_KINDS = ("last_op", "step", "none", "embedding")


class ObservationEncoder:
    """Turns episode states into policy observations.

    kind="last_op": a one-hot of the last operator applied, all zeros right after a reset (the paper's
    state; the policy never sees the text). kind="step": a one-hot of the steps taken so far (0 ..
    episode_length - 1). kind="none": one constant 1, so the policy is one distribution over operators for every
    state (a bandit; every transition informs the same choice). kind="embedding": the all-MiniLM-L6-v2 embedding (384-d,
    L2-normalised) of the current instruction followed by the step index divided by `episode_length`.
    `embed` replaces the MiniLM encoder (texts -> [N, d] array), e.g. in tests.
    """

    def __init__(self, kind: str, n_ops: int, episode_length: int,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None, embedding_dim: int | None = None):
        if kind not in OBS_KINDS:
            raise TeamsRLError(f"observation kind must be one of {', '.join(OBS_KINDS)}, got '{kind}'")
        if n_ops < 1 or episode_length < 1:
            raise TeamsRLError(f"observations need n_ops >= 1 and episode_length >= 1 (got {n_ops}, {episode_length})")
        self.kind = kind
        self.n_ops = int(n_ops)
        self.episode_length = int(episode_length)
        self._embed = embed
        if embedding_dim is None:
            from teams_rl.evol.embeddings import EMBEDDING_DIM

            embedding_dim = EMBEDDING_DIM
        self.embedding_dim = int(embedding_dim)

    @property
    def dim(self) -> int:
        return {"last_op": self.n_ops, "step": self.episode_length, "none": 1}.get(self.kind, self.embedding_dim + 1)

    @property
    def space(self):
        """The gymnasium Box of one observation."""
        from gymnasium import spaces

        if self.kind == "embedding":
            return spaces.Box(low=-1.0, high=1.0, shape=(self.dim,), dtype=np.float32)
        return spaces.Box(low=0.0, high=1.0, shape=(self.dim,), dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is not None:
            return np.asarray(self._embed(list(texts)), dtype=np.float32)
        from teams_rl.evol.embeddings import encode

        return encode(list(texts))

    def encode(self, instructions: Sequence[str], last_ops: Sequence[int | None], steps: Sequence[int]) -> np.ndarray:
        """Observations [N, dim] (float32) for N episode states. `last_ops[i]` is the index of the last
        operator applied in episode i, or None / -1 right after a reset; `steps[i]` the steps taken so far."""
        n = len(instructions)
        if len(last_ops) != n or len(steps) != n:
            raise ValueError(f"encode: {n} instructions, {len(last_ops)} last_ops, {len(steps)} steps")
        if self.kind == "last_op":
            obs = np.zeros((n, self.n_ops), dtype=np.float32)
            for i, op in enumerate(last_ops):
                if op is not None and int(op) >= 0:
                    obs[i, int(op)] = 1.0
            return obs
        if self.kind == "step":
            obs = np.zeros((n, self.dim), dtype=np.float32)
            obs[np.arange(n), np.clip(np.asarray(steps, dtype=int), 0, self.dim - 1)] = 1.0
            return obs
        if self.kind == "none":
            return np.ones((n, 1), dtype=np.float32)
        obs = np.zeros((n, self.dim), dtype=np.float32)
        if n:
            vectors = self.embed(instructions)
            if vectors.shape != (n, self.embedding_dim):
                raise ValueError(f"embedder returned shape {vectors.shape}, expected {(n, self.embedding_dim)}")
            obs[:, : self.embedding_dim] = np.clip(vectors, -1.0, 1.0)
            obs[:, -1] = np.clip(np.asarray(steps, dtype=np.float32) / self.episode_length, 0.0, 1.0)
        return obs

    def describe(self) -> dict:
        return {"kind": self.kind, "n_ops": self.n_ops, "episode_length": self.episode_length, "dim": self.dim}
