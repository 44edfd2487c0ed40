"""Rewards for one environment step, batched over N episodes, composed by weighted sum from `cfg.reward`.

Terms (`cfg.reward.terms.<name>`, each with a `weight`):
  reviewer_judge     the paper's reward: 1 when the reviewer LLM says the new instruction is "Not Equal" to
                     the previous one (same constraints/requirements, depth and breadth), else 0
  embedding_novelty  cosine distance (MiniLM) of the new instruction to the previous one and to every earlier
                     instruction of the episode
  elimination        WizardLM's four elimination rules as a shaped reward: the fraction of rules passed
`cfg.reward.query_cost` subtracts that much per LLM query the step spent (instructor + reviewer).
A rejected or failed rewrite (the instruction did not change) scores 0 in every term.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol.elimination import (
    copies_template_words,
    only_punctuation_or_stop_words,
    sorry_and_short,
)
from teams_rl.llm.types import ChatRequest

log = logging.getLogger(__name__)

# The reviewer prompt, after the equality test of WizardLM/TeaMs-RL (our wording). `{first}`/`{second}` are
# the previous and the new instruction.
JUDGE_PROMPT = (
    "Here are two instructions written for an AI assistant such as ChatGPT.\n"
    "Decide whether they are equal. Two instructions are equal when they have the same constraints and "
    "requirements and the same depth and breadth of inquiry; otherwise they are not equal.\n"
    "First instruction: {first}\n"
    "Second instruction: {second}\n"
    "Answer with exactly Equal or Not Equal, never both, and give no reasons."
)

# --------------------------------------------------------------------------------------------- batch

@dataclass
class StepBatch:
    """What the reward sees of one step of N episodes."""

    previous: list[str]              # instruction before the step
    new: list[str | None]            # cleaned rewrite; None = rejected/failed (the instruction stays)
    raw: list[str]                   # the instructor's raw answer
    op_ids: list[int]
    archives: list[list[str]]        # earlier instructions of each episode, `previous` included
    seeds: list[int] | None = None   # request seeds (reviewer requests reuse them)
    memo: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.previous)

    def changed(self) -> np.ndarray:
        """True where the step produced a new instruction different from the previous one."""
        return np.array([n is not None and _norm(n) != _norm(p) for p, n in zip(self.previous, self.new, strict=True)])


@dataclass
class RewardResult:
    total: np.ndarray                       # [N] the reward
    terms: dict[str, np.ndarray]            # [N] unweighted value of every term
    reviewer_queries: np.ndarray            # [N] reviewer requests this step spent per episode
    stats: dict[str, float] = field(default_factory=dict)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------------- judge

_VERDICT = re.compile(
    r"\b(not\s+(?:exactly\s+|quite\s+)?(?:equal|the\s+same|same|identical|equivalent)|unequal|different|differ|"
    r"equal|equivalent|the\s+same|same|identical)\b"
)
_LEADING = re.compile(r"^(yes|no)\b")


def parse_judgement(text: str | None, strict: bool = False) -> bool | None:
    """True for "Not Equal", False for "Equal", None when the answer cannot be read.

    strict=True is the official code's rule (the raw reply must be exactly "Not Equal"; anything else is
    "Equal"). The robust parser ignores case, punctuation, markdown and extra words, takes a verdict at the
    start of the answer first, and otherwise needs all verdicts in the answer to agree.
    """
    if strict:
        return text == "Not Equal"
    if not text:
        return None
    t = text.lower().replace("**", " ").replace("\u2019", "'")
    t = re.sub(r"\bequal\s+or\s+not\s+equal\b|\bnot\s+equal\s+or\s+equal\b", " ", t)  # an echo of the question
    t = re.sub(r"\bisn't\b|\baren't\b", " not ", t)
    t = re.sub(r"[^\w\s]", " ", t)
    t = " ".join(t.split())
    t = re.sub(r"^(answer|verdict|response|output|result)\s+", "", t)
    if not t:
        return None
    labels = [not _is_equal(m.group(1)) for m in _VERDICT.finditer(t)]
    first = _VERDICT.match(t)
    if first:
        return not _is_equal(first.group(1))
    lead = _LEADING.match(t)
    if lead and not labels:
        return lead.group(1) == "no"  # "Are they equal?" -> "No." means not equal
    if labels and all(v == labels[0] for v in labels):
        return labels[0]
    return None


def _is_equal(token: str) -> bool:
    return " ".join(token.split()) in ("equal", "equivalent", "same", "the same", "identical")


class Judge:
    """Asks the reviewer whether previous and new instruction are equal: one batched `complete` per step.
    Unchanged instructions (rejected rewrite or identical text) are not sent: they are "Equal"."""

    def __init__(self, client, prompt: str | None = None, strict: bool = False, max_tokens: int | None = None,
                 temperature: float | None = None, log_unparsable: int = 5):
        self.client = client
        self.prompt = prompt or JUDGE_PROMPT
        for slot in ("{first}", "{second}"):
            if slot not in self.prompt:
                raise TeamsRLError(f"reward: the reviewer prompt has no {slot} slot")
        self.strict = strict
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.log_unparsable = log_unparsable
        self.unparsable_total = 0
        self.judged_total = 0

    def render(self, first: str, second: str) -> str:
        return self.prompt.replace("{first}", first.strip()).replace("{second}", second.strip())

    def __call__(self, batch: StepBatch) -> tuple[np.ndarray, np.ndarray, int]:
        """(not_equal [N] in {0,1}, reviewer queries [N], unparsable answers this step); memoised per batch."""
        if "judge" in batch.memo:
            return batch.memo["judge"]
        n = len(batch)
        verdict = np.zeros(n, dtype=np.float32)
        queries = np.zeros(n, dtype=np.int64)
        todo = [i for i in np.flatnonzero(batch.changed())]
        unparsable = 0
        if todo:
            if self.client is None:
                raise TeamsRLError("reward: the reviewer judge needs a reviewer LLM (set reviewer=<role config>)")
            requests = [
                ChatRequest.chat(self.render(batch.previous[i], batch.new[i]), max_tokens=self.max_tokens,
                                 temperature=self.temperature, purpose="judge",
                                 seed=None if batch.seeds is None else int(batch.seeds[i]))
                for i in todo
            ]
            answers = self.client.complete(requests)
            for i, answer in zip(todo, answers, strict=True):
                queries[i] = 1
                parsed = parse_judgement(answer.text, self.strict) if answer.ok else None
                if parsed is None:
                    unparsable += 1
                    self.unparsable_total += 1
                    if self.unparsable_total <= self.log_unparsable:
                        log.warning("reviewer answer not understood (reward 0): %r%s", (answer.text or answer.error),
                                    "" if self.unparsable_total < self.log_unparsable else " (further ones only counted)")
                verdict[i] = 1.0 if parsed else 0.0
            self.judged_total += len(todo)
        batch.memo["judge"] = (verdict, queries, unparsable)
        return batch.memo["judge"]


# --------------------------------------------------------------------------------------------- terms

class ReviewerJudgeTerm:
    name = "reviewer_judge"
    uses_reviewer = True

    def __init__(self, judge: Judge):
        self.judge = judge

    def score(self, batch: StepBatch) -> tuple[np.ndarray, dict]:
        return self.judge(batch)[0], {}


class EmbeddingNoveltyTerm:
    """prev_weight * (1 - cos(new, previous)) + archive_weight * (1 - max cos(new, earlier instructions)),
    clipped to [0, 1] per part."""

    name = "embedding_novelty"
    uses_reviewer = False

    def __init__(self, prev_weight: float = 0.5, archive_weight: float = 0.5,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        self.prev_weight = float(prev_weight)
        self.archive_weight = float(archive_weight)
        self._embed = embed

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is not None:
            return np.asarray(self._embed(list(texts)), dtype=np.float32)
        from teams_rl.evol.embeddings import encode

        return encode(list(texts))

    def score(self, batch: StepBatch) -> tuple[np.ndarray, dict]:
        n = len(batch)
        out = np.zeros(n, dtype=np.float32)
        rows = [i for i in range(n) if batch.new[i] is not None]
        if not rows:
            return out, {}
        texts = [batch.new[i] for i in rows] + [batch.previous[i] for i in rows]
        for i in rows:
            texts.extend(batch.archives[i])
        vectors = self.embed(texts)
        new_vecs, prev_vecs = vectors[: len(rows)], vectors[len(rows): 2 * len(rows)]
        offset = 2 * len(rows)
        for k, i in enumerate(rows):
            arch = vectors[offset: offset + len(batch.archives[i])]
            offset += len(batch.archives[i])
            d_prev = float(np.clip(1.0 - new_vecs[k] @ prev_vecs[k], 0.0, 1.0))
            d_arch = float(np.clip(1.0 - (arch @ new_vecs[k]).max(), 0.0, 1.0)) if len(arch) else d_prev
            out[i] = self.prev_weight * d_prev + self.archive_weight * d_arch
        return out, {}


class EliminationTerm:
    """WizardLM's elimination rules as a shaped reward: the fraction of the four rules an evolution passes.

    1. information gain: the reviewer says Not Equal (`info_gain: judge`), or the MiniLM cosine similarity to
       the previous instruction is below `similarity_threshold` (`info_gain: embedding`);
    2. the instructor's answer is not an apology ("sorry") shorter than 80 words;
    3. the new instruction is not only punctuation and stop words;
    4. it does not copy the operator prompt's words ("given prompt", "rewritten prompt", ...).
    """

    name = "elimination"

    def __init__(self, judge: Judge | None = None, info_gain: str = "judge", similarity_threshold: float = 0.95,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        if info_gain not in ("judge", "embedding"):
            raise TeamsRLError(f"reward.terms.elimination.info_gain must be judge or embedding, got '{info_gain}'")
        self.judge = judge
        self.info_gain = info_gain
        self.similarity_threshold = float(similarity_threshold)
        self._novelty = EmbeddingNoveltyTerm(1.0, 0.0, embed=embed)

    @property
    def uses_reviewer(self) -> bool:
        return self.info_gain == "judge"

    def rules(self, batch: StepBatch) -> np.ndarray:
        """[N, 4] booleans: rule k passed."""
        n = len(batch)
        passed = np.zeros((n, 4), dtype=bool)
        if self.info_gain == "judge":
            gain = self.judge(batch)[0] > 0
        else:
            gain = self._novelty.score(batch)[0] > (1.0 - self.similarity_threshold)
        changed = batch.changed()
        for i in range(n):
            new = batch.new[i]
            passed[i, 0] = bool(gain[i]) and changed[i]
            passed[i, 1] = not sorry_and_short(batch.raw[i])
            passed[i, 2] = new is not None and not only_punctuation_or_stop_words(new)
            passed[i, 3] = new is not None and not copies_template_words(new)
        return passed

    def score(self, batch: StepBatch) -> tuple[np.ndarray, dict]:
        passed = self.rules(batch)
        value = passed.mean(axis=1).astype(np.float32)
        value[np.array([nw is None for nw in batch.new])] = 0.0
        stats = {f"elimination_fail_rule{k + 1}": float((~passed[:, k]).sum()) for k in range(4)}
        return value, stats


# --------------------------------------------------------------------------------------------- composite

TERMS = ("reviewer_judge", "embedding_novelty", "elimination")


class RewardFunction:
    """Weighted sum of terms minus `query_cost` per query spent (1 instructor query + reviewer queries)."""

    def __init__(self, terms: list[tuple[float, object]], query_cost: float = 0.0):
        if not terms:
            raise TeamsRLError("reward: no terms configured (set reward.terms, e.g. reward=embedding_novelty)")
        self.terms = terms
        self.query_cost = float(query_cost)
        self.totals: dict[str, float] = {}  # running sums of the per-step stats (e.g. judge_unparsable)

    @property
    def uses_reviewer(self) -> bool:
        return any(getattr(t, "uses_reviewer", False) for _, t in self.terms)

    def __call__(self, batch: StepBatch) -> RewardResult:
        n = len(batch)
        total = np.zeros(n, dtype=np.float64)
        values: dict[str, np.ndarray] = {}
        stats: dict[str, float] = {}
        for weight, term in self.terms:
            value, term_stats = term.score(batch)
            values[term.name] = np.asarray(value, dtype=np.float64)
            total += weight * values[term.name]
            stats.update(term_stats)
        reviewer_queries = np.zeros(n, dtype=np.int64)
        if "judge" in batch.memo:
            reviewer_queries = batch.memo["judge"][1]
            stats["judge_unparsable"] = float(batch.memo["judge"][2])
            stats["judged"] = float(reviewer_queries.sum())
        for k, v in stats.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        if self.query_cost:
            total -= self.query_cost * (1 + reviewer_queries)
        return RewardResult(total=total, terms=values, reviewer_queries=reviewer_queries, stats=stats)


def _weight(name: str, spec) -> float:
    """`reward.terms.<name>.weight` (default 1) as a number."""
    if not isinstance(spec, Mapping):
        raise TeamsRLError(f"reward.terms.{name} must be a mapping of settings, got {spec!r}")
    return C.number({"reward": {"terms": {name: dict(spec)}}}, f"reward.terms.{name}.weight", optional=True) \
        if spec.get("weight") is not None else 1.0


def reward_uses_reviewer(cfg_reward) -> bool:
    """Whether the configured reward queries the reviewer role (decides if the reviewer config matters)."""
    terms = dict(C.plain(cfg_reward) or {}).get("terms") or {}
    for name, spec in terms.items():
        spec = spec or {}
        if _weight(name, spec) == 0.0:
            continue
        if name == "reviewer_judge" or (name == "elimination" and spec.get("info_gain", "judge") == "judge"):
            return True
    return False


def build_reward(cfg_reward, reviewer=None, embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> RewardFunction:
    """The reward described by `cfg.reward`; `reviewer` is the reviewer LLMClient (or a callable returning
    it, called only when a term needs it); `embed` replaces MiniLM (tests)."""
    node = dict(C.plain(cfg_reward) or {})
    terms_cfg = node.get("terms") or {}
    if not isinstance(terms_cfg, Mapping):
        raise TeamsRLError("reward.terms must map term names to settings")
    unknown = sorted(set(terms_cfg) - set(TERMS))
    if unknown:
        raise TeamsRLError(f"unknown reward term(s) {', '.join(unknown)} (known: {', '.join(TERMS)})")
    judge_cfg = node.get("judge") or {}
    judge: Judge | None = None

    def get_judge() -> Judge:
        nonlocal judge
        if judge is None:
            client = reviewer() if callable(reviewer) and not hasattr(reviewer, "complete") else reviewer
            judge = Judge(client, prompt=judge_cfg.get("prompt"), strict=bool(judge_cfg.get("strict", False)),
                          max_tokens=judge_cfg.get("max_tokens"), temperature=judge_cfg.get("temperature"))
        return judge

    terms: list[tuple[float, object]] = []
    for name, spec in terms_cfg.items():
        spec = dict(spec or {})
        weight = _weight(name, spec)
        spec.pop("weight", None)
        if weight == 0.0:
            continue
        if name == "reviewer_judge":
            term = ReviewerJudgeTerm(get_judge())
        elif name == "embedding_novelty":
            term = EmbeddingNoveltyTerm(prev_weight=spec.get("prev_weight", 0.5),
                                        archive_weight=spec.get("archive_weight", 0.5), embed=embed)
        else:
            info_gain = spec.get("info_gain", "judge")
            term = EliminationTerm(judge=get_judge() if info_gain == "judge" else None, info_gain=info_gain,
                                   similarity_threshold=spec.get("similarity_threshold", 0.95), embed=embed)
        terms.append((weight, term))
    return RewardFunction(terms, query_cost=C.number({"reward": node}, "reward.query_cost", minimum=0.0, optional=True) or 0.0)
