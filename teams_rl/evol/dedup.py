"""ROUGE-L near-duplicate removal (Self-Instruct / Alpaca: drop an instruction whose ROUGE-L F1 against any
instruction kept before it exceeds 0.7), exact and fast.

The result is identical to the naive loop `naive_rouge_dedup` (score every new instruction against every kept
one with `rouge_score`), because:
- texts are tokenized once with rouge-score's own tokenizer (the tokens the scorer would use);
- a pair is only scored when an upper bound can exceed the threshold. ROUGE-L F1 = 2·LCS/(m+n), and the LCS of
  two token sequences is at most the size of their multiset intersection, which an inverted index over the
  kept instructions gives for all of them at once (numpy);
- the remaining candidates get their exact LCS (bit-parallel, Hyyrö 2004) and the F1 is computed with the
  same float operations as `rouge_score.scoring.fmeasure`, so threshold decisions agree bit for bit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_THRESHOLD = 0.7
_BOUND_SLACK = 1e-9  # the bound is compared with a tiny margin so that float rounding never prunes a pair


def rouge_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """rouge-score's tokenization without stemming (what `RougeScorer(["rougeL"], use_stemmer=False)` uses;
    `rouge_score.tokenize` is imported directly because `rouge_score.tokenizers` pulls in nltk, ~5 s)."""
    from rouge_score.tokenize import tokenize

    return [tokenize(t, None) for t in texts]


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two int sequences (bit-parallel, O(len(a)·len(b)/w))."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[int, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_f1(lcs: int, len_target: int, len_prediction: int) -> float:
    """ROUGE-L F1 from an LCS length, with rouge-score's exact float operations."""
    if not len_target or not len_prediction:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


@dataclass
class _Postings:
    """Growable (kept index, token count) arrays of one token."""

    ids: np.ndarray = field(default_factory=lambda: np.empty(8, dtype=np.int32))
    counts: np.ndarray = field(default_factory=lambda: np.empty(8, dtype=np.int32))
    size: int = 0

    def append(self, idx: int, count: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.resize(self.ids, 2 * self.size)
            self.counts = np.resize(self.counts, 2 * self.size)
        self.ids[self.size] = idx
        self.counts[self.size] = count
        self.size += 1


@dataclass
class DedupResult:
    keep: list[bool]                       # per input text
    duplicate_of: list[int | None]         # index of the kept text that made it a duplicate
    score: list[float]                     # the ROUGE-L F1 that dropped it (0.0 for kept texts)
    pairs_scored: int = 0                  # exact LCS computations done (the naive loop does ~n_kept each)

    @property
    def dropped(self) -> int:
        return sum(1 for k in self.keep if not k)


class RougeDeduper:
    """Incremental ROUGE-L near-duplicate index: `add(text)` keeps it unless it is too close to a kept one.

    `reference` texts (e.g. the seeds) can be indexed first with `index(text)`: they are compared against but
    never reported. `group` keys, when given, exempt pairs within the same group (e.g. one seed's chain).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._postings: dict[int, _Postings] = {}
        self._seqs: list[list[int]] = []
        self._lens = np.empty(1024, dtype=np.int32)
        self._groups: list[object] = []
        self.pairs_scored = 0

    def _encode(self, tokens: list[str]) -> list[int]:
        vocab = self._vocab
        return [vocab.setdefault(t, len(vocab)) for t in tokens]

    def _store(self, seq: list[int], group: object) -> int:
        idx = len(self._seqs)
        self._seqs.append(seq)
        self._groups.append(group)
        if idx == len(self._lens):
            self._lens = np.resize(self._lens, 2 * idx)
        self._lens[idx] = len(seq)
        for tok, count in Counter(seq).items():
            self._postings.setdefault(tok, _Postings()).append(idx, count)
        return idx

    def best_match(self, tokens: list[str], group: object = None) -> tuple[int | None, float]:
        """(index, F1) of the first stored text whose ROUGE-L F1 with `tokens` exceeds the threshold."""
        seq = self._encode(tokens)
        n_stored = len(self._seqs)
        if not seq or not n_stored:
            return None, 0.0
        overlap = np.zeros(n_stored, dtype=np.int32)
        for tok, count in Counter(seq).items():
            post = self._postings.get(tok)
            if post is not None and post.size:
                ids = post.ids[: post.size]
                overlap[ids] += np.minimum(post.counts[: post.size], count)
        m = len(seq)
        # F1 <= 2*overlap/(m+n) > threshold  <=>  2*overlap > threshold*(m+n)
        bound = 2.0 * overlap - self.threshold * (m + self._lens[:n_stored])
        candidates = np.flatnonzero(bound > -_BOUND_SLACK * (m + self._lens[:n_stored]))
        for idx in candidates.tolist():  # ascending = the order the naive loop meets them
            if group is not None and self._groups[idx] == group:
                continue
            other = self._seqs[idx]
            self.pairs_scored += 1
            # rouge_score.score(target=new, prediction=kept), as Self-Instruct calls it
            f1 = rouge_l_f1(lcs_length(seq, other), m, len(other))
            if f1 > self.threshold:
                return idx, f1
        return None, 0.0

    def index(self, tokens: list[str], group: object = None) -> int:
        return self._store(self._encode(tokens), group)

    def add(self, tokens: list[str], group: object = None) -> tuple[bool, int | None, float]:
        match, f1 = self.best_match(tokens, group)
        if match is not None:
            return False, match, f1
        self._store(self._encode(tokens), group)
        return True, None, 0.0


def rouge_dedup(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD, *,
                groups: Sequence[object] | None = None, references: Sequence[str] = (),
                progress: bool = False) -> DedupResult:
    """Greedy in-order ROUGE-L dedup: text i is dropped iff its F1 with a reference or an earlier *kept* text
    exceeds `threshold` (pairs sharing a non-None group are not compared). `duplicate_of` indexes `texts`
    (or is -1-r for reference r)."""
    deduper = RougeDeduper(threshold)
    for tokens in rouge_tokenize(references):
        deduper.index(tokens, group=None)
    n_refs = len(references)
    stored_to_text: list[int] = [-1 - r for r in range(n_refs)]
    keep, dup_of, scores = [], [], []
    tokenized = rouge_tokenize(texts)
    iterator = enumerate(tokenized)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(tokenized), desc="ROUGE-L dedup", unit="instr")
    for i, tokens in iterator:
        group = groups[i] if groups is not None else None
        kept, match, f1 = deduper.add(tokens, group)
        keep.append(kept)
        dup_of.append(None if kept else stored_to_text[match])
        scores.append(f1)
        if kept:
            stored_to_text.append(i)
    return DedupResult(keep, dup_of, scores, deduper.pairs_scored)


def naive_rouge_dedup(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD, *,
                      groups: Sequence[object] | None = None, references: Sequence[str] = ()) -> DedupResult:
    """The reference implementation: Self-Instruct's loop, `rouge_scorer` against every kept instruction."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_texts: list[tuple[int, str, object]] = [(-1 - r, t, None) for r, t in enumerate(references)]
    keep, dup_of, scores = [], [], []
    pairs = 0
    for i, text in enumerate(texts):
        group = groups[i] if groups is not None else None
        match = None
        for j, other, other_group in kept_texts:
            if group is not None and other_group == group:
                continue
            pairs += 1
            f1 = scorer.score(text, other)["rougeL"].fmeasure
            if f1 > threshold:
                match = (j, f1)
                break
        keep.append(match is None)
        dup_of.append(None if match is None else match[0])
        scores.append(0.0 if match is None else match[1])
        if match is None:
            kept_texts.append((i, text, group))
    return DedupResult(keep, dup_of, scores, pairs)
