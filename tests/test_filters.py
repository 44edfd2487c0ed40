"""Filters: WizardLM elimination rules 2-4, Alpaca filters, exact and ROUGE-L near-duplicate removal."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from teams_rl.errors import TeamsRLError
from teams_rl.evol.dedup import lcs_length, naive_rouge_dedup, rouge_dedup, rouge_l_f1, rouge_tokenize
from teams_rl.evol.filters import (
    ALPACA_BLACKLIST,
    ALPACA_LENGTH,
    ALPACA_NON_ASCII,
    ALPACA_PROGRAM,
    ALPACA_PUNCT,
    EXACT_DUP,
    ROUGE_DUP,
    RULE2,
    RULE3,
    RULE4,
    FilterSettings,
    TextRules,
    apply_filters,
)
from tests.conftest import CONF_DIR

ANSWER = "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen inside chloroplasts."


def _settings(**overrides) -> FilterSettings:
    cfg = OmegaConf.load(CONF_DIR / "filters" / "default.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return FilterSettings.from_cfg(cfg)


def _rec(i, instruction, output=ANSWER, seed="s0", input=""):
    return {"id": f"r{i}", "seed_id": seed, "instruction": instruction, "input": input, "output": output}


@pytest.mark.parametrize("instruction, output, reason", [
    ("Explain how vaccines train the immune system.", "Sorry, I can't answer that.", RULE2),
    ("Explain how vaccines train the immune system.", "the, of and... to", RULE3),
    ("Explain how vaccines train the immune system.", "", RULE3),
    ("Rewrite the given prompt about vaccines in detail.", ANSWER, RULE4),
    ("Explain vaccines.", ANSWER, ALPACA_LENGTH),
    (" ".join(["word"] * 151), ANSWER, ALPACA_LENGTH),
    ("Draw a picture of the immune system for kids.", ANSWER, ALPACA_BLACKLIST),
    ("Describe the map of a medieval city in detail.", ANSWER, ALPACA_BLACKLIST),
    ("Write a program that sorts numbers in place.", ANSWER, ALPACA_PROGRAM),
    ("- Explain how vaccines train the immune system.", ANSWER, ALPACA_PUNCT),
    ("Ébauchez un plan de cours sur les vaccins.", ANSWER, ALPACA_NON_ASCII),
    ("Explain how vaccines train the immune system.", ANSWER, None),
    ("Explain why mapping genomes matters for medicine.", ANSWER, None),  # "mapping" is not "map"
    ("Explain how vaccines work. " + "Sorry is a word here. " * 20, "I am sorry " + "but here is a long answer " * 20,
     None),  # "sorry" in a long answer is not rule 2
])
def test_text_rules(instruction, output, reason):
    assert TextRules(_settings()).reason(instruction, output) == reason


def test_rules_can_be_switched_off():
    rules = TextRules(_settings(**{"alpaca.enabled": False, "elimination.sorry_short": False}))
    assert rules.reason("Explain vaccines.", "Sorry, no.") is None
    assert TextRules(_settings(**{"alpaca.max_words": 4})).reason("Explain how vaccines work today.", ANSWER) == ALPACA_LENGTH
    with pytest.raises(TeamsRLError, match="min_words"):
        _settings(**{"alpaca.min_words": 10, "alpaca.max_words": 5})
    with pytest.raises(TeamsRLError, match="threshold"):
        _settings(**{"rouge_l.threshold": 1.5})


def test_apply_filters_counts_every_drop_by_reason():
    records = [
        _rec(0, "Explain how vaccines train the immune system."),
        _rec(1, "explain how  vaccines train the immune SYSTEM."),                     # exact duplicate
        _rec(2, "Explain how vaccines train the immune system in young children."),   # ROUGE-L near-copy of 0
        _rec(3, "Write a limerick about a cat who learns to sail across the ocean."),
        _rec(4, "Explain vaccines."),                                                  # too short
        _rec(5, "Summarize the causes of the French Revolution.", output="Sorry, no."),
        {**_rec(6, ""), "drop_reason": "evolution_failed"},                           # passed through, counted
    ]
    report = apply_filters(records, _settings())
    assert [r["id"] for r in report.kept] == ["r0", "r3"]
    assert report.by_reason() == {EXACT_DUP: 1, ROUGE_DUP: 1, ALPACA_LENGTH: 1, RULE2: 1, "evolution_failed": 1}
    assert len(report.dropped) == 5
    near = next(d for d in report.dropped if d["drop_reason"] == ROUGE_DUP)
    assert near["duplicate_of"] == "r0" and near["rouge_l"] > 0.7


def test_rouge_within_seed_and_against_seeds():
    records = [_rec(0, "Explain how vaccines train the immune system.", seed="a"),
               _rec(1, "Explain how vaccines train the immune system of children.", seed="a"),
               _rec(2, "Explain how vaccines train the immune system of adults.", seed="b")]
    assert [r["id"] for r in apply_filters(records, _settings()).kept] == ["r0"]
    exempt = apply_filters(records, _settings(**{"rouge_l.within_seed": False}))
    assert [r["id"] for r in exempt.kept] == ["r0", "r1"]  # r2 is still a near-copy of r0 (another seed)
    against = apply_filters(records, _settings(**{"rouge_l.against_seeds": True, "rouge_l.within_seed": False}),
                            seed_texts=["EXPLAIN how vaccines train the immune system.",
                                        "Explain how vaccines train the immune system of kids!"])
    assert against.kept == [] and against.by_reason() == {EXACT_DUP: 1, ROUGE_DUP: 2}


def test_lcs_and_f1_match_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    vocab = "the a cat dog sat on mat and ran far away home".split()
    for _ in range(300):
        a = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 15)))
        b = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 15)))
        ta, tb = rouge_tokenize([a, b])
        ids = {t: i for i, t in enumerate(vocab)}
        lcs = lcs_length([ids[t] for t in ta], [ids[t] for t in tb])
        assert rouge_l_f1(lcs, len(ta), len(tb)) == scorer.score(a, b)["rougeL"].fmeasure


def test_rouge_dedup_drops_near_copies_keeps_distinct_and_equals_naive():
    base = ["Explain how vaccines train the immune system.",
            "Write a haiku about the first snow of winter.",
            "List three differences between Python lists and tuples.",
            "Describe the water cycle for a ten year old."]
    near = [t.replace(".", " in detail.") for t in base]          # near-copies (F1 > 0.7)
    distinct = ["Compose a formal letter declining a job offer politely.",
                "Calculate the area of a circle with radius four centimetres."]
    texts = base + near + distinct
    result = rouge_dedup(texts)
    assert result.keep == [True] * 4 + [False] * 4 + [True] * 2
    assert result.duplicate_of[4:8] == [0, 1, 2, 3]

    rng = random.Random(7)  # generated-like texts with many near-copies: identical decisions to the naive loop
    words = "explain write describe list the a of to how why poem story code data table water energy".split()
    corpus = []
    for _ in range(250):
        if corpus and rng.random() < 0.4:
            toks = rng.choice(corpus).split()
            toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
            corpus.append(" ".join(toks))
        else:
            corpus.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 18))))
    fast, naive = rouge_dedup(corpus), naive_rouge_dedup(corpus)
    assert fast.keep == naive.keep and fast.duplicate_of == naive.duplicate_of
    assert 0 < fast.dropped < len(corpus) and fast.pairs_scored < naive.pairs_scored / 10
