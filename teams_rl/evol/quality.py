"""Quality of a generated instruction dataset, per operator, per step, overall, and for the seeds (contrast).

Per group of kept records (every figure with the n it rests on):
  distinct-1/2   unique n-grams / all n-grams of the group's instructions (Li et al. 2016)
  self-BLEU      mean sentence BLEU (sacrebleu) of each instruction of a seeded sample against the rest of the
                 sample as references (Zhu et al. 2018, "Texygen"); 100 = identical, lower = more diverse
  Vendi          exp(entropy of the eigenvalues of K/n), K the cosine-similarity matrix of the instructions'
                 all-MiniLM-L6-v2 embeddings (Friedman & Dieng 2023, "The Vendi Score"): the effective number
                 of distinct instructions, from 1 (all alike) to n (all orthogonal)
  length         instruction words, mean and median
  IFD            PPL(answer | instruction) / PPL(answer) under a scorer causal LM (Li et al. 2023, "From
                 Quantity to Quality", the Cherry LLM paper): near or above 1, the instruction does not help
                 predict the answer; lower, it does. The conditional uses the Alpaca prompt the SFT trains on.

Settings: `generate.quality` (see conf/generate/default.yaml); Vendi needs `generate.embedding_stats`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from teams_rl import config as C
from teams_rl.errors import TeamsRLError

HF_BACKEND = "teams_rl.llm.hf_backend.HFBackend"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# (key in a group's figures, column title, key of the n it rests on)
COLUMNS = (("distinct_1", "distinct-1", "n"), ("distinct_2", "distinct-2", "n"),
           ("self_bleu", "self-BLEU", "self_bleu_n"), ("vendi", "Vendi", "vendi_n"),
           ("words_mean", "words (mean)", "n"), ("words_median", "words (median)", "n"),
           ("ifd_mean", "IFD (mean)", "ifd_n"), ("ifd_median", "IFD (median)", "ifd_n"))


# ------------------------------------------------------------------------------------------- the metrics

def word_lengths(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over lower-cased whitespace tokens (Li et al. 2016)."""
    grams: Counter = Counter()
    for text in texts:
        tokens = text.lower().split()
        grams.update(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return round(len(grams) / total, 4) if total else 0.0


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean sacrebleu sentence BLEU (0-100) of each text against all the others; None below two texts."""
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return None
    bleu = BLEU(effective_order=True)   # sentence level: no zero score for a missing 4-gram order
    scores = [bleu.sentence_score(t, list(texts[:i]) + list(texts[i + 1:])).score for i, t in enumerate(texts)]
    return round(float(np.mean(scores)), 3)


def vendi_score(vectors: np.ndarray) -> float | None:
    """Vendi score (Friedman & Dieng 2023): exp(-sum_i l_i log l_i) over the eigenvalues l_i of K/n, where
    K_ij = cos(e_i, e_j). The nonzero eigenvalues of X X^T / n equal those of X^T X / n (X the unit-norm
    rows), so the smaller of the two matrices is decomposed: O(n d^2) for n instructions of dimension d."""
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    if n == 0:
        return None
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    gram = (x.T @ x if n > x.shape[1] else x @ x.T) / n
    eig = np.linalg.eigvalsh(gram)
    eig = eig[eig > 1e-12]   # numerical zeros; 0 log 0 = 0
    return round(float(np.exp(-(eig * np.log(eig)).sum())), 4)


def sample_indices(n: int, size: int, seed: int) -> list[int]:
    """A seeded sample of min(n, size) indices, in their original order."""
    if n <= size:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=size, replace=False))


def ifd_scores(model, tokenizer, examples: Sequence[tuple[str, str, str]], *, batch_size: int = 8,
               max_length: int = 512, progress: bool = False) -> list[float | None]:
    """IFD = PPL(answer | Alpaca prompt) / PPL(answer) per (instruction, input, output); None for an empty answer.

    Both perplexities score the same answer tokens: after the prompt, and after the tokenizer's BOS token
    (EOS when it has none) standing for "no instruction". The answer keeps at most max_length / 2 tokens;
    a longer prompt loses its beginning."""
    from teams_rl.eval.mia import token_scores
    from teams_rl.sft.data import format_prompt

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    conditional, alone, index = [], [], []
    for i, (instruction, inp, output) in enumerate(examples):
        answer = tokenizer(output or "", add_special_tokens=False)["input_ids"][: max_length // 2]
        if not answer:
            continue
        prompt = tokenizer(format_prompt(instruction, inp))["input_ids"][-(max_length - len(answer)):]
        conditional.append((list(prompt) + list(answer), len(prompt)))
        alone.append(([start] + list(answer), 1))
        index.append(i)
    out: list[float | None] = [None] * len(examples)
    if not index:
        return out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = token_scores(model, conditional + alone, batch_size=batch_size, pad_id=pad, progress=progress,
                          desc="generate: IFD")
    for j, i in enumerate(index):  # PPL ratio = exp(NLL given the prompt - NLL alone)
        out[i] = float(np.exp(scores[j].nll - scores[len(index) + j].nll))
    return out


# ------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class QualitySettings:
    enabled: bool
    sample_size: int
    ifd_model: str | None        # a model name or path for `teams_rl.models.resolve_model`; None: no IFD
    ifd_note: str | None         # why there is no IFD
    ifd_sample: int | None       # records (and seeds) scored, a seeded sample; None: all
    cache_dir: str | None
    batch_size: int
    max_length: int
    device: str
    embeddings: bool             # Vendi needs the MiniLM embeddings (`generate.embedding_stats`)
    seed: int

    @classmethod
    def from_cfg(cls, cfg) -> QualitySettings:
        """`generate.quality`; `ifd_model: expert` = the expert's model when the expert is a local hf model."""
        key = "generate.quality"
        enabled = C.boolean(cfg, f"{key}.enabled", default=True)
        sample = C.integer(cfg, f"{key}.sample_size", minimum=2)
        batch = C.integer(cfg, f"{key}.batch_size", minimum=1)
        ifd_sample = C.integer(cfg, f"{key}.ifd_sample", minimum=1, optional=True)
        max_length = C.integer(cfg, f"{key}.max_length", minimum=16)
        device = str(C.get(cfg, f"{key}.device", "cpu"))
        cache = C.get(cfg, "paths.cache")
        raw, note = C.get(cfg, f"{key}.ifd_model"), None
        if raw is not None and not isinstance(raw, str):
            raise TeamsRLError(f"{key}.ifd_model must be a model name or path, 'expert' or null, got {raw!r}")
        if raw is None:
            note = f"{key}.ifd_model is null"
        elif raw == "expert":
            model = C.get(cfg, "expert.backend.model")
            if C.get(cfg, "expert.backend._target_") == HF_BACKEND and model:
                raw, cache = str(model), C.get(cfg, "expert.backend.cache_dir", cache)
            else:
                raw, note = None, (f"the expert ({model}) is not a local hf model; set {key}.ifd_model to a "
                                   "causal LM to score IFD")
        if enabled and raw is not None:
            from teams_rl.models import check_model

            check_model(raw, cache, key=f"{key}.ifd_model")
        return cls(enabled, sample, raw, note, ifd_sample, None if cache is None else str(cache), batch, max_length,
                   device,
                   C.boolean(cfg, "generate.embedding_stats", default=True), int(C.get(cfg, "seed", 0)))


# ------------------------------------------------------------------------------------------- measuring

def group_figures(texts: Sequence[str], vectors: np.ndarray | None, ifd: Sequence[float | None],
                  *, sample_size: int, seed: int) -> dict:
    """The figures of one group: its instructions, their embeddings (or None) and IFD values (None = unscored)."""
    lengths = np.asarray(word_lengths(texts), dtype=float)
    sample = [texts[i] for i in sample_indices(len(texts), sample_size, seed)]
    scored = np.asarray([v for v in ifd if v is not None], dtype=float)
    return {
        "n": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "self_bleu": self_bleu(sample),
        "self_bleu_n": len(sample),
        "vendi": None if vectors is None else vendi_score(vectors),
        "vendi_n": 0 if vectors is None else len(texts),
        "words_mean": round(float(lengths.mean()), 3) if len(texts) else None,
        "words_median": float(np.median(lengths)) if len(texts) else None,
        "ifd_mean": round(float(scored.mean()), 4) if len(scored) else None,
        "ifd_median": round(float(np.median(scored)), 4) if len(scored) else None,
        "ifd_n": len(scored),
    }


def groups(records: Sequence[dict]) -> dict[str, list[int]]:
    """Record indices of `overall`, `operator/<name>` (in order of first appearance) and `step/<k>`."""
    out: dict[str, list[int]] = {"overall": list(range(len(records)))}
    for i, rec in enumerate(records):
        out.setdefault(f"operator/{rec['operator']}", []).append(i)
    for step in sorted({int(r["step"]) for r in records}):
        out[f"step/{step}"] = [i for i, r in enumerate(records) if int(r["step"]) == step]
    return out


def _ifd(settings: QualitySettings, *example_sets: list[tuple[str, str, str]],
         progress: bool) -> list[list[float | None]]:
    """IFD for each set of (instruction, input, output): a seeded sample of at most `ifd_sample` of a set's
    answered examples is scored (a causal LM pass per example and per answer is the costliest figure here);
    None elsewhere. The scorer is loaded once, only when something is to be scored."""
    outs: list[list[float | None]] = [[None] * len(ex) for ex in example_sets]
    chosen = []
    for ex in example_sets:
        answered = [i for i, (_, _, output) in enumerate(ex) if output]
        if settings.ifd_sample is not None:
            answered = [answered[j] for j in sample_indices(len(answered), settings.ifd_sample, settings.seed)]
        chosen.append(answered)
    if settings.ifd_model is None or not any(chosen):
        return outs
    from teams_rl.models import load_causal_lm, pick_device

    try:
        model, tok = load_causal_lm(settings.ifd_model, device=pick_device(settings.device),
                                    cache_dir=settings.cache_dir)
    except OSError as err:
        raise TeamsRLError(f"generate.quality.ifd_model: cannot load '{settings.ifd_model}': "
                           f"{str(err).splitlines()[0]}") from err
    flat_examples = [ex[i] for ex, idx in zip(example_sets, chosen, strict=True) for i in idx]
    scores = iter(ifd_scores(model, tok, flat_examples, batch_size=settings.batch_size,
                             max_length=settings.max_length, progress=progress))
    for out, idx in zip(outs, chosen, strict=True):
        for i in idx:
            out[i] = next(scores)
    return outs


def measure(cfg, records: Sequence[dict], seeds: Sequence, seed_texts: Sequence[str],
            log: Callable[[dict], None] | None = None,
            embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> dict:
    """The `quality` section of stats.json for the kept `records` and the `seeds` (`seed_texts` = the seed
    instructions as evolved); `log` gets the flat figures (`quality/<group>/<metric>`)."""
    s = QualitySettings.from_cfg(cfg)
    if not s.enabled:
        return {"enabled": False}
    texts = [r["instruction"] for r in records]
    vectors = seed_vectors = None
    if s.embeddings:
        if embed is None:
            from teams_rl.evol.embeddings import encode as embed
        vectors, seed_vectors = np.asarray(embed(texts)), np.asarray(embed(list(seed_texts)))
    progress = bool(C.get(cfg, "generate.progress", True))
    rec_ifd, seed_ifd = _ifd(s, [(r["instruction"], r.get("input") or "", r.get("output") or "") for r in records],
                             [(x.instruction, x.input or "", x.output or "") for x in seeds], progress=progress)
    figures = {"seeds": group_figures(list(seed_texts), seed_vectors, seed_ifd, sample_size=s.sample_size,
                                      seed=s.seed)}
    for name, idx in groups(records).items():
        figures[name] = group_figures([texts[i] for i in idx], None if vectors is None else vectors[idx],
                                      [rec_ifd[i] for i in idx], sample_size=s.sample_size, seed=s.seed)
    section = {
        "enabled": True,
        "settings": {"self_bleu_sample": s.sample_size, "sample_seed": s.seed,
                     "embedding_model": EMBEDDING_MODEL if s.embeddings else None,
                     "ifd_model": s.ifd_model, "ifd_note": s.ifd_note, "ifd_sample": s.ifd_sample,
                     "ifd_prompt": "Alpaca (teams_rl.sft.data.format_prompt)"},
        "groups": figures,
    }
    if log is not None:
        log(flat(section))
    return section


def flat(section: dict) -> dict:
    """`quality/<group>/<metric>` for every figure that was measured (for wandb)."""
    return {f"quality/{group}/{k}": v for group, fig in (section.get("groups") or {}).items()
            for k, v in fig.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------------------------------- rendering

def ordered(figures: dict) -> list[tuple[str, dict]]:
    """Seeds, overall, the operators (as given), then the steps in numeric order (stats.json sorts its keys)."""
    def rank(name: str) -> tuple:
        kind, _, rest = name.partition("/")
        order = {"seeds": 0, "overall": 1, "operator": 2, "step": 3}.get(kind, 4)
        return (order, int(rest) if kind == "step" and rest.isdigit() else 0)

    return sorted(figures.items(), key=lambda kv: rank(kv[0]))


def table_rows(section: dict | None) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the quality table: one row per group, each figure followed by its n when the n
    differs from the group's."""
    columns = ["group", "n"] + [title for _, title, _ in COLUMNS]
    rows = []
    for group, fig in ordered((section or {}).get("groups") or {}):
        cells = [group, str(fig["n"])]
        for key, _, n_key in COLUMNS:
            value = fig.get(key)
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value:g}" + (f" (n={fig[n_key]})" if n_key != "n" and fig[n_key] != fig["n"] else ""))
        rows.append(cells)
    return columns, rows


def describe(section: dict | None) -> str:
    """One paragraph on how the figures were made (for the dataset card and the report)."""
    if not section:
        return "stats.json has no quality section (made before teams_rl measured it)."
    if not section.get("enabled"):
        return "Quality figures are off (`generate.quality.enabled=false`)."
    st = section["settings"]
    sample = f" on a seeded sample of up to {st['ifd_sample']} answered records (and seeds)" \
        if st.get("ifd_sample") else ""
    ifd = (f"IFD under `{st['ifd_model']}`{sample}" if st["ifd_model"] else f"no IFD ({st['ifd_note']})")
    vendi = f"Vendi over {st['embedding_model']} embeddings" if st["embedding_model"] else \
        "no Vendi (`generate.embedding_stats=false`)"
    return (f"Self-BLEU (sacrebleu) on a seeded sample of up to {st['self_bleu_sample']} instructions per group, "
            f"each against the rest; {vendi}; {ifd}, PPL(answer | Alpaca prompt) / PPL(answer), over the "
            "records with an answer. A figure's n is the group's unless given in brackets.")
