"""Filters over generated (instruction, input, output) records; every dropped record is counted by reason.

- WizardLM's elimination rules (Evol-Instruct §3): 1 no information gain (judged by the reviewer LLM, see
  `teams_rl.stages.generate`; here only its verdicts are applied), 2 the answer says "sorry" and is short,
  3 the answer is only punctuation and stop words, 4 the instruction copies words of the evolving prompt;
- Stanford Alpaca's filters: instruction length in words, keyword blacklist, "Write a program", leading
  punctuation, leading non-ASCII character;
- exact duplicates (case- and whitespace-insensitive instruction + input);
- ROUGE-L near-duplicates (> threshold against an instruction kept earlier), `teams_rl.evol.dedup`.

Config: the `filters` group (`conf/filters/*.yaml`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol.elimination import TEMPLATE_WORDS, only_punctuation_or_stop_words, sorry_and_short

# Reasons, in the order they are checked; a record is counted under the first one it fails.
RULE1 = "rule1_no_information_gain"
RULE2 = "rule2_sorry_short_answer"
RULE3 = "rule3_only_punctuation_stopwords"
RULE4 = "rule4_copied_prompt_words"
ALPACA_LENGTH = "alpaca_length"
ALPACA_BLACKLIST = "alpaca_blacklist"
ALPACA_PROGRAM = "alpaca_write_a_program"
ALPACA_PUNCT = "alpaca_leading_punctuation"
ALPACA_NON_ASCII = "alpaca_leading_non_ascii"
EXACT_DUP = "exact_duplicate"
ROUGE_DUP = "rouge_l_near_duplicate"
TEXT_REASONS = (RULE2, RULE3, RULE4, ALPACA_LENGTH, ALPACA_BLACKLIST, ALPACA_PROGRAM, ALPACA_PUNCT, ALPACA_NON_ASCII)

ALPACA_BLACKLIST_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
                          "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


@dataclass(frozen=True)
class FilterSettings:
    """The `filters` config as plain values (see `conf/filters/default.yaml`)."""

    no_info_gain: bool = False
    judge_prompt: str | None = None
    judge_strict: bool = False
    judge_max_tokens: int = 8
    sorry_short: bool = True
    sorry_max_words: int = 80
    only_punct_stopwords: bool = True
    copied_prompt_words: bool = True
    prompt_words: tuple[str, ...] = TEMPLATE_WORDS
    alpaca: bool = True
    min_words: int = 4
    max_words: int = 150
    blacklist: tuple[str, ...] = ALPACA_BLACKLIST_WORDS
    drop_write_a_program: bool = True
    drop_leading_punctuation: bool = True
    drop_leading_non_ascii: bool = True
    exact_dedup: bool = True
    rouge_l: bool = True
    rouge_threshold: float = 0.7
    rouge_against_seeds: bool = False
    rouge_within_seed: bool = True

    @classmethod
    def from_cfg(cls, cfg: Any) -> FilterSettings:
        elim = C.get(cfg, "elimination", {})
        judge = C.get(elim, "judge", {})
        alpaca = C.get(cfg, "alpaca", {})
        rouge = C.get(cfg, "rouge_l", {})
        d = cls()
        root = {"filters": cfg}

        def num(key: str, default, kind):
            if C.get(cfg, key) is None:
                return default
            read = C.integer if kind is int else C.number
            return kind(read(root, f"filters.{key}"))
        settings = cls(
            no_info_gain=bool(C.get(elim, "no_info_gain", d.no_info_gain)),
            judge_prompt=C.get(judge, "prompt", None),
            judge_strict=bool(C.get(judge, "strict", d.judge_strict)),
            judge_max_tokens=num("elimination.judge.max_tokens", d.judge_max_tokens, int),
            sorry_short=bool(C.get(elim, "sorry_short", d.sorry_short)),
            sorry_max_words=num("elimination.sorry_max_words", d.sorry_max_words, int),
            only_punct_stopwords=bool(C.get(elim, "only_punct_stopwords", d.only_punct_stopwords)),
            copied_prompt_words=bool(C.get(elim, "copied_prompt_words", d.copied_prompt_words)),
            prompt_words=tuple(str(w).lower() for w in C.get(elim, "prompt_words", d.prompt_words)),
            alpaca=bool(C.get(alpaca, "enabled", d.alpaca)),
            min_words=num("alpaca.min_words", d.min_words, int),
            max_words=num("alpaca.max_words", d.max_words, int),
            blacklist=tuple(str(w).lower() for w in C.get(alpaca, "blacklist", d.blacklist)),
            drop_write_a_program=bool(C.get(alpaca, "drop_write_a_program", d.drop_write_a_program)),
            drop_leading_punctuation=bool(C.get(alpaca, "drop_leading_punctuation", d.drop_leading_punctuation)),
            drop_leading_non_ascii=bool(C.get(alpaca, "drop_leading_non_ascii", d.drop_leading_non_ascii)),
            exact_dedup=bool(C.get(cfg, "exact_dedup", d.exact_dedup)),
            rouge_l=bool(C.get(rouge, "enabled", d.rouge_l)),
            rouge_threshold=num("rouge_l.threshold", d.rouge_threshold, float),
            rouge_against_seeds=bool(C.get(rouge, "against_seeds", d.rouge_against_seeds)),
            rouge_within_seed=bool(C.get(rouge, "within_seed", d.rouge_within_seed)),
        )
        if settings.min_words < 0 or settings.max_words < settings.min_words:
            raise TeamsRLError(f"filters.alpaca: need 0 <= min_words <= max_words, got {settings.min_words}, "
                               f"{settings.max_words}")
        if not 0.0 < settings.rouge_threshold <= 1.0:
            raise TeamsRLError(f"filters.rouge_l.threshold must be in (0, 1], got {settings.rouge_threshold}")
        return settings


def _has_phrase(text_lower: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text_lower) is not None


class TextRules:
    """Rules 2-4 and the Alpaca filters: pure functions of one record's text, no LLM."""

    def __init__(self, settings: FilterSettings):
        self.s = settings

    def answer_reason(self, output: str) -> str | None:
        """Rules 2 and 3 (about the expert's answer)."""
        if self.s.sorry_short and sorry_and_short(output, self.s.sorry_max_words):
            return RULE2
        if self.s.only_punct_stopwords and only_punctuation_or_stop_words(output):
            return RULE3
        return None

    def copied_prompt_reason(self, instruction: str) -> str | None:
        """Rule 4 (the instruction copies the evolving prompt's words)."""
        lower = " ".join(instruction.lower().split())
        if self.s.copied_prompt_words and any(p in lower for p in self.s.prompt_words):
            return RULE4
        return None

    def instruction_reason(self, instruction: str) -> str | None:
        """Rule 4 and the Alpaca filters (about the instruction)."""
        if self.copied_prompt_reason(instruction):
            return RULE4
        if not self.s.alpaca:
            return None
        lower = instruction.lower()
        n_words = len(instruction.split())
        if n_words < self.s.min_words or n_words > self.s.max_words:
            return ALPACA_LENGTH
        if any(_has_phrase(lower, w) for w in self.s.blacklist):
            return ALPACA_BLACKLIST
        if self.s.drop_write_a_program and instruction.startswith("Write a program"):
            return ALPACA_PROGRAM
        first = instruction.lstrip()[:1]
        if self.s.drop_leading_punctuation and first and first in string.punctuation:
            return ALPACA_PUNCT
        if self.s.drop_leading_non_ascii and first and not first.isascii():
            return ALPACA_NON_ASCII
        return None

    def reason(self, instruction: str, output: str) -> str | None:
        return self.answer_reason(output) or self.instruction_reason(instruction)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class FilterReport:
    kept: list[dict]
    dropped: list[dict]                          # records with a "drop_reason" field
    counts: Counter = field(default_factory=Counter)

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def apply_filters(records: Sequence[dict], settings: FilterSettings, *, seed_texts: Sequence[str] = (),
                  progress: bool = False) -> FilterReport:
    """Filter answered records in order. A record may already carry a `drop_reason` (from rule 1, a failed
    evolution or answer); it is counted and passed through. Text rules come next, then exact and ROUGE-L
    duplicates against the records kept so far (and, with `rouge_l.against_seeds`, the seed instructions).

    Records need `instruction`, `input`, `output` and `seed_id`."""
    rules = TextRules(settings)
    counts: Counter = Counter()
    dropped: list[dict] = []
    survivors: list[dict] = []
    for rec in records:
        reason = rec.get("drop_reason") or rules.reason(rec["instruction"], rec.get("output") or "")
        if reason:
            counts[reason] += 1
            dropped.append({**rec, "drop_reason": reason})
        else:
            survivors.append(rec)

    if settings.exact_dedup:
        seen: set[str] = {normalise(t) for t in seed_texts} if settings.rouge_against_seeds else set()
        unique = []
        for rec in survivors:
            key = normalise(rec["instruction"] + "\n" + (rec.get("input") or ""))
            if key in seen:
                counts[EXACT_DUP] += 1
                dropped.append({**rec, "drop_reason": EXACT_DUP})
            else:
                seen.add(key)
                unique.append(rec)
        survivors = unique

    if settings.rouge_l and survivors:
        from teams_rl.evol.dedup import rouge_dedup

        groups = None if settings.rouge_within_seed else [rec["seed_id"] for rec in survivors]
        result = rouge_dedup([rec["instruction"] for rec in survivors], settings.rouge_threshold, groups=groups,
                             references=list(seed_texts) if settings.rouge_against_seeds else (),
                             progress=progress)
        kept = []
        for rec, keep, dup, score in zip(survivors, result.keep, result.duplicate_of, result.score, strict=True):
            if keep:
                kept.append(rec)
            else:
                counts[ROUGE_DUP] += 1
                dropped.append({**rec, "drop_reason": ROUGE_DUP, "rouge_l": round(score, 4),
                                "duplicate_of": survivors[dup]["id"] if dup is not None and dup >= 0 else "seed"})
        survivors = kept
    return FilterReport(kept=survivors, dropped=dropped, counts=counts)
