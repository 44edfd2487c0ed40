"""WizardLM's elimination rules 2-4 as text tests (rule 1, "no information gain", needs the reviewer LLM and
lives with the judge in `teams_rl.evol.rewards`). Used by the `elimination` reward and by the filters."""

from __future__ import annotations

import re
import string

TEMPLATE_WORDS = ("given prompt", "rewritten prompt", "created prompt", "#given prompt#", "#rewritten prompt#",
                  "#created prompt#", "prompt rewriter", "prompt creator")

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just let me more most my myself no nor not now of off
on once only or other our ours ourselves out over own please same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves ok okay yes sure thanks
""".split())


def sorry_and_short(raw: str, max_words: int = 80) -> bool:
    """WizardLM rule 2: the answer apologises ("sorry") and is short."""
    return "sorry" in raw.lower() and len(raw.split()) < max_words


def only_punctuation_or_stop_words(text: str) -> bool:
    """WizardLM rule 3: nothing but punctuation and stop words."""
    words = [w for w in re.split(r"\s+", text.translate(str.maketrans("", "", string.punctuation)).lower()) if w]
    return all(w in STOP_WORDS for w in words)


def copies_template_words(text: str) -> bool:
    """WizardLM rule 4: the evolved instruction copies words of the evolving prompt ("given prompt", ...)."""
    low = " ".join(text.lower().split())
    return any(w in low for w in TEMPLATE_WORDS)
