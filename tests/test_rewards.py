"""Reward terms: the reviewer judgement parser, the judge's batching, novelty, elimination rules, composition."""

from __future__ import annotations

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.evol.elimination import copies_template_words, only_punctuation_or_stop_words, sorry_and_short
from teams_rl.evol.rewards import (
    JUDGE_PROMPT,
    EliminationTerm,
    EmbeddingNoveltyTerm,
    Judge,
    StepBatch,
    build_reward,
    parse_judgement,
    reward_uses_reviewer,
)
from teams_rl.llm.client import LLMClient
from tests.evol_fakes import OperatorRuleBackend, hash_embed

# (reviewer answer, True = "Not Equal", False = "Equal", None = unparsable)
JUDGEMENTS = [
    ("Not Equal", True),
    ("Equal", False),
    ("not equal", True),
    ("EQUAL", False),
    ("Not Equal.", True),
    ("Equal.", False),
    ("  Not   Equal \n", True),
    ("**Not Equal**", True),
    ("Not-Equal", True),
    ("Answer: Not Equal", True),
    ("Answer: Equal", False),
    ("Unequal", True),
    ("The two instructions are not equal.", True),
    ("They are equal.", False),
    ("Not Equal. The second instruction adds a constraint, so they are not the same.", True),
    ("Equal. The second one is just a rephrasing of the same request.", False),
    ("They're different.", True),
    ("The same.", False),
    ("The second instruction is more specific, so they are not identical.", True),
    ("No, they are not equal.", True),
    ("No.", True),
    ("Yes.", False),
    ("These instructions aren't equal", True),
    ("Equal or Not Equal", None),
    ("The instructions are equal in depth but not equal in constraints", None),
    ("I cannot decide.", None),
    ("", None),
    ("...", None),
]


@pytest.mark.parametrize("answer, expected", JUDGEMENTS)
def test_parse_judgement_table(answer, expected):
    assert parse_judgement(answer) is expected


def test_strict_mode_is_the_official_exact_match():
    assert parse_judgement("Not Equal", strict=True) is True
    assert parse_judgement("Not Equal.", strict=True) is False
    assert parse_judgement(" not equal", strict=True) is False
    assert parse_judgement("Equal", strict=True) is False


def _batch(previous, new, raw=None, ops=None):
    return StepBatch(previous=list(previous), new=list(new), raw=list(raw or [n or "" for n in new]),
                     op_ids=list(ops or [1] * len(previous)), archives=[[p] for p in previous],
                     seeds=list(range(len(previous))))


class ScriptedReviewer:
    model_id = "scripted"

    def __init__(self, answers):
        self.answers = list(answers)
        self.batches = []

    def complete(self, requests):
        from teams_rl.llm.types import Completion

        self.batches.append(len(requests))
        return [Completion(text=self.answers.pop(0)) for _ in requests]


def test_judge_sends_only_changed_instructions_in_one_batch_and_counts_unparsable(caplog):
    reviewer = ScriptedReviewer(["Not Equal", "I am not sure"])
    judge = Judge(reviewer)
    batch = _batch(["a b c", "d e f", "g h i", "j k l"], ["a b c d", None, "g  h i", "j k l m"])
    verdict, queries, unparsable = judge(batch)
    assert reviewer.batches == [2]  # rows 1 (rejected) and 2 (same text) are "Equal" without a query
    assert verdict.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert queries.tolist() == [1, 0, 0, 1]
    assert unparsable == 1 and judge.unparsable_total == 1
    assert "not understood" in caplog.text
    assert judge(batch)[0] is verdict  # memoised: elimination and reviewer_judge share one call


def test_judge_prompt_slots_and_fake_reviewer_roundtrip():
    assert "{first}" in JUDGE_PROMPT and "{second}" in JUDGE_PROMPT and "Not Equal" in JUDGE_PROMPT
    with pytest.raises(TeamsRLError, match="no \\{second\\} slot"):
        Judge(None, prompt="Compare {first}.")
    client = LLMClient("reviewer", OperatorRuleBackend(judge_style="chatty"))
    verdict, _, unparsable = Judge(client)(_batch(["Cook rice.", "Cook pasta."], ["Cook rice today.", "Cook pasta."]))
    assert verdict.tolist() == [1.0, 0.0] and unparsable == 0
    assert client.account.by_purpose["judge"].queries == 1


def test_embedding_novelty_distance_to_previous_and_archive():
    term = EmbeddingNoveltyTerm(prev_weight=0.5, archive_weight=0.5, embed=hash_embed)
    batch = StepBatch(previous=["cook rice", "cook rice"], new=["cook rice", "bake bread"], raw=["", ""],
                      op_ids=[0, 0], archives=[["cook rice"], ["bake bread", "cook rice"]])
    value, _ = term.score(batch)
    assert value[0] == pytest.approx(0.0, abs=1e-6)  # unchanged: no novelty
    assert value[1] == pytest.approx(0.5, abs=1e-6)  # new vs previous: distance 1; but already in the archive
    rejected, _ = term.score(_batch(["x y"], [None]))
    assert rejected.tolist() == [0.0]


@pytest.mark.parametrize("raw, hit", [("I'm sorry, but I can't rewrite that.", True),
                                      ("Sorry! " + "word " * 90, False),
                                      ("Explain the sorry state of public transport in 50 words.", True),
                                      ("Explain photosynthesis.", False)])
def test_rule2_sorry_and_short(raw, hit):
    assert sorry_and_short(raw) is hit


@pytest.mark.parametrize("text, hit", [("the and of to", True), ("?!...", True), ("It is what it is.", True),
                                       ("Cook rice.", False), ("What is entropy?", False)])
def test_rule3_only_punctuation_or_stop_words(text, hit):
    assert only_punctuation_or_stop_words(text) is hit


@pytest.mark.parametrize("text, hit", [("Rewrite the given prompt with more detail.", True),
                                       ("#Rewritten Prompt# How to cook rice?", True),
                                       ("As a prompt creator I ask: what is AI?", True),
                                       ("How to cook rice for twenty people?", False)])
def test_rule4_copies_template_words(text, hit):
    assert copies_template_words(text) is hit


def test_elimination_is_the_fraction_of_rules_passed():
    reviewer = ScriptedReviewer(["Not Equal", "Not Equal", "Not Equal"])
    term = EliminationTerm(judge=Judge(reviewer))
    batch = _batch(["Cook rice.", "Cook rice.", "Cook rice.", "Cook rice."],
                   ["Cook rice for ten guests.", "Rewrite the given prompt: cook rice.", "Cook rice.", None],
                   raw=["Cook rice for ten guests.", "Rewrite the given prompt: cook rice.", "Sorry, I can't.", ""])
    value, stats = term.score(batch)
    assert value.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0])
    assert stats["elimination_fail_rule4"] == 2.0  # row 1 copies template words, row 3 has no instruction
    assert reviewer.batches == [2]


def test_elimination_without_reviewer_uses_embedding_similarity():
    term = EliminationTerm(info_gain="embedding", similarity_threshold=0.8, embed=hash_embed)
    assert not term.uses_reviewer
    value, _ = term.score(_batch(["cook rice now", "cook rice now"], ["bake sour bread", "cook rice now please"]))
    assert value[0] == pytest.approx(1.0)
    assert value[1] == pytest.approx(0.75)  # cosine 3/sqrt(12) = 0.87 >= 0.8: no information gain (rule 1)


def test_rewards_compose_by_weighted_sum_minus_query_cost():
    reviewer = ScriptedReviewer(["Not Equal"])
    cfg = {"terms": {"reviewer_judge": {"weight": 2.0}, "embedding_novelty": {"weight": 0.5, "prev_weight": 1.0,
                                                                              "archive_weight": 0.0}},
           "query_cost": 0.1}
    reward = build_reward(cfg, reviewer=reviewer, embed=hash_embed)
    assert reward.uses_reviewer and reward_uses_reviewer(cfg)
    result = reward(_batch(["cook rice", "cook rice"], ["bake bread", None]))
    assert result.terms["reviewer_judge"].tolist() == [1.0, 0.0]
    assert result.terms["embedding_novelty"].tolist() == pytest.approx([1.0, 0.0])
    assert result.total.tolist() == pytest.approx([2.0 + 0.5 - 0.2, -0.1])  # 2 queries vs 1 (rejected: no judge)
    assert result.reviewer_queries.tolist() == [1, 0]


def test_reward_config_errors_and_reviewer_detection(compose):
    with pytest.raises(TeamsRLError, match="unknown reward term"):
        build_reward({"terms": {"vibes": {"weight": 1}}})
    with pytest.raises(TeamsRLError, match="no terms configured"):
        build_reward({"terms": {}})
    assert not reward_uses_reviewer(compose().reward)  # the default (embedding_novelty) never asks the reviewer
    assert reward_uses_reviewer(compose(["reward=reviewer_judge"]).reward)
    assert reward_uses_reviewer(compose(["reward=elimination"]).reward)
    assert not reward_uses_reviewer(compose(["reward=elimination", "reward.terms.elimination.info_gain=embedding"]).reward)
    assert reward_uses_reviewer(compose(["reward=judge_novelty"]).reward)
    built = build_reward(compose(["reward=judge_novelty"]).reward, reviewer=lambda: ScriptedReviewer([]))
    assert [t.name for _, t in built.terms] == ["reviewer_judge", "embedding_novelty"]
    assert built.query_cost == pytest.approx(0.01)


def test_reviewer_judge_without_reviewer_fails_clearly():
    reward = build_reward({"terms": {"reviewer_judge": {}}}, reviewer=None)
    with pytest.raises(TeamsRLError, match="needs a reviewer LLM"):
        reward(_batch(["a b"], ["a b c"]))
    assert np.all(reward(_batch(["a b"], [None])).total == 0.0)  # nothing to judge, nothing asked
