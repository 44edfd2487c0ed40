"""Operator sets from config, prompt rendering, and cleanup of messy rewrite outputs."""

from __future__ import annotations

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.evol.evolution import evolve
from teams_rl.evol.operators import Operator, OperatorSet, clean_rewrite, load_operator_set
from teams_rl.llm.client import LLMClient
from tests.evol_fakes import OperatorRuleBackend

PAPER_ORDER = ["breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning_steps",
               "complicate_input"]


def test_paper_set_has_the_official_index_order(compose):
    opset = load_operator_set(compose(["operators=teams_rl"]).operators)
    assert opset.names == PAPER_ORDER
    assert opset.index("complicate_input") == 5
    assert opset.breadth_indices == [0]
    assert opset.depth_indices == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("name, expected", [
    ("wizardlm", PAPER_ORDER[:5]),
    ("in_depth_only", PAPER_ORDER[1:5]),
    ("no_breadth", PAPER_ORDER[1:]),
])
def test_other_sets(compose, name, expected):
    opset = load_operator_set(compose([f"operators={name}"]).operators)
    assert opset.name == name and opset.names == expected
    assert opset.breadth_indices == ([0] if "breadth" in expected else [])


def test_rendering_puts_the_instruction_in_the_slot_with_the_teams_rl_rules(compose):
    opset = load_operator_set(compose(["operators=teams_rl"]).operators)
    for i, op in enumerate(opset.operators):
        prompt = opset.render(i, "  How to cook food?\n")
        assert prompt.rstrip().endswith("#Given Prompt#:\nHow to cook food?")
        assert "{instruction}" not in prompt and "${" not in prompt
        assert "2048 words" in prompt and "reveal your role" in prompt and "no explanation" in prompt
        assert ("10 to 20 words" in prompt) == (op.name in PAPER_ORDER[1:5])
    assert "Prompt Creator" in opset.render(0, "x") and "rarer" in opset.render(0, "x")
    assert "JSON" in opset.render(5, "x") and "table" in opset.render(5, "x")
    assert opset.render(1, "a") != opset.render(2, "a")
    with pytest.raises(IndexError):
        opset.render(6, "x")


def test_short_set_is_the_default_with_the_paper_operators_in_order(compose):
    """The embedded default's short wording: the same six operators and kinds, each one line around the slot,
    a fraction of the paraphrased official prompt; every preset of the paper keeps the long wording."""
    from tests.conftest import compose_config

    short = load_operator_set(compose_config([], scale=False).operators)
    paper = load_operator_set(compose(["operators=teams_rl"]).operators)
    assert short.name == "teams_rl_short" and short.names == PAPER_ORDER
    assert [op.kind for op in short.operators] == [op.kind for op in paper.operators]
    for i in range(len(PAPER_ORDER)):
        prompt = short.render(i, "How to cook food?")
        assert prompt.startswith('Here is a task: "How to cook food?"\n') and "${" not in prompt
        assert prompt.endswith(" Write only the new task, as a request to an assistant.")
        assert len(prompt.split()) < len(paper.render(i, "How to cook food?").split()) / 2.5
    assert len({short.render(i, "x") for i in range(6)}) == 6 and "rarer" in short.render(0, "x")
    for experiment in ("llama7b", "smoke", "wizardlm_baseline", "llama7b_wizardlm", "budget_matched_small"):
        assert compose_config([f"+experiment={experiment}"], scale=False).operators.name == "teams_rl", experiment


def test_echoes_of_a_short_template_and_of_the_given_instruction_are_no_rewrite():
    """A one-line template shares the slot's line with its own words: an output that repeats that line keeps only
    what is in the slot, lines of the template after the slot are dropped too, and an output that is only the
    instruction it was given is rejected as an echo (`given`)."""
    from teams_rl.evol.cleaning import clean_rewrite_counted
    from tests.conftest import compose_config

    short = load_operator_set(compose_config([], scale=False).operators)
    template, prompt = short.operators[1].template, short.render(1, "Name three planets.")
    echoed = clean_rewrite_counted(prompt, template=template, given="Name three planets.")
    assert echoed.text is None and echoed.rejected == "given_echo" and "template_echo" in echoed.actions
    framed = clean_rewrite_counted('Here is a task: "Name the three largest planets and their moons."', 3, template)
    assert framed.text == "Name the three largest planets and their moons." and framed.actions == ("template_echo",)
    tail = clean_rewrite_counted("Name the largest planet.\nWrite only the new task, as a request to an assistant.",
                                 3, template)
    assert tail.text == "Name the largest planet."
    assert clean_rewrite_counted("Name three planets!", given="name three planets.").rejected == "given_echo"
    assert clean_rewrite_counted("Name three planets and their moons.", given="Name three planets.").text


@pytest.mark.parametrize("reply", [
    'Here is a task: "Write a poem about cats',              # cut off at max_tokens: no closing quote
    "Here is a task: Write a poem about cats.",               # unquoted
    "Here  is a task:\u201cWrite a poem about cats, and dogs in the rain.\u201d",  # other spacing and quotes
    "Write a poem about cats, and",                           # the given instruction's first words only
])
def test_cut_off_and_unquoted_echoes_of_the_given_instruction_are_no_rewrite(reply):
    from teams_rl.evol.cleaning import clean_rewrite_counted
    from tests.conftest import compose_config

    template = load_operator_set(compose_config([], scale=False).operators).operators[1].template
    echoed = clean_rewrite_counted(reply, 3, template, given="Write a poem about cats, and dogs in the rain.")
    assert (echoed.text, echoed.rejected) == (None, "given_echo")


def test_a_cut_off_rewrite_in_the_template_frame_keeps_what_is_new():
    from teams_rl.evol.cleaning import clean_rewrite_counted
    from tests.conftest import compose_config

    template = load_operator_set(compose_config([], scale=False).operators).operators[1].template
    cut = clean_rewrite_counted('Here is a task: "Write a poem about cats in French', 3, template,
                                given="Write a poem about cats.")
    assert (cut.text, cut.actions) == ("Write a poem about cats in French", ("template_echo",))


def test_braces_in_templates_and_instructions_are_kept():
    op = Operator("json", "depth", 'Use {"key": 1} with:\n{instruction}')
    assert op.render('Parse {"a": [1, 2]}') == 'Use {"key": 1} with:\nParse {"a": [1, 2]}'


def test_unknown_operator_fails_at_config_time_with_one_line(compose):
    cfg = compose(["operators=teams_rl", "operators.ops=[breadth,make_it_funny]"])
    with pytest.raises(TeamsRLError, match=r"unknown operator 'make_it_funny' in set 'teams_rl'") as err:
        load_operator_set(cfg.operators)
    assert "\n" not in str(err.value)


def test_template_without_slot_fails_with_one_line(compose):
    cfg = compose(["+operators.library.shout={kind: depth, template: 'SHOUT IT'}", "operators.ops=[breadth,shout]"])
    with pytest.raises(TeamsRLError, match=r"operator 'shout': its template has no \{instruction\} slot"):
        load_operator_set(cfg.operators)


def test_bad_kind_duplicates_and_empty_sets_fail():
    with pytest.raises(TeamsRLError, match="kind must be one of"):
        Operator("x", "sideways", "{instruction}")
    op = Operator("x", "depth", "{instruction}")
    with pytest.raises(TeamsRLError, match="lists x more than once"):
        OperatorSet("s", (op, op))
    with pytest.raises(TeamsRLError, match="lists no operators"):
        load_operator_set({"name": "s", "ops": [], "library": {}})
    with pytest.raises(TeamsRLError, match="no operator set configured"):
        load_operator_set(None)


def test_a_user_set_is_a_dropped_yaml_file(tmp_path, compose):
    (tmp_path / "operators").mkdir()
    (tmp_path / "operators" / "mine.yaml").write_text(
        "defaults:\n  - library\n  - _self_\nname: mine\nops: [deepening, breadth, shorten]\n"
        "library:\n  shorten:\n    kind: depth\n    template: 'Make this shorter:\n\n      {instruction}'\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "operators=mine"])
    opset = load_operator_set(cfg.operators)
    assert opset.names == ["deepening", "breadth", "shorten"]
    assert opset.breadth_indices == [1]
    assert opset.render(2, "Write a poem.") == "Make this shorter:\nWrite a poem."


MESSY = [
    ("#Rewritten Prompt#:\nHow do you cook rice on a gas stove?", "How do you cook rice on a gas stove?"),
    ("Rewritten prompt: Explain photosynthesis in desert plants.", "Explain photosynthesis in desert plants."),
    ("Sure! Here is the rewritten prompt:\n\n\"Describe three ways to cook eggs.\"", "Describe three ways to cook eggs."),
    ("#Created Prompt#: What is the history of sourdough bread?", "What is the history of sourdough bread?"),
    ("Certainly. Here's a more complex version:\n'List five uses of baking soda in cleaning.'",
     "List five uses of baking soda in cleaning."),
    ("**Rewritten Prompt:** Compare TCP and UDP for video streaming.", "Compare TCP and UDP for video streaming."),
    ("#Given Prompt#:\nHow to cook food?\n#Rewritten Prompt#:\nHow to cook food for ten guests on a budget?",
     "How to cook food for ten guests on a budget?"),
    ("\u201cSummarise the causes of World War I in 100 words.\u201d", "Summarise the causes of World War I in 100 words."),
    ("New prompt: Write a haiku about autumn rain.\n\nExplanation: I added a form constraint.",
     "Write a haiku about autumn rain."),
    ("```\nSort this list in Python: [3, 1, 2]\n```", "Sort this list in Python: [3, 1, 2]"),
    ("As a Prompt Rewriter, I would ask: Explain recursion with a real-life example.",
     "Explain recursion with a real-life example."),
    ("Plan a 3-day trip to Kyoto for a family with two kids.", "Plan a 3-day trip to Kyoto for a family with two kids."),
    ('Explain what "overfitting" means in machine learning.', 'Explain what "overfitting" means in machine learning.'),
    ("Rewritten prompt:\nCompute the mean of the numbers.\nNote: I made it concrete.", "Compute the mean of the numbers."),
]


@pytest.mark.parametrize("raw, expected", MESSY)
def test_clean_rewrite_strips_markers_preambles_quotes_and_explanations(raw, expected):
    assert clean_rewrite(raw) == expected


@pytest.mark.parametrize("raw", ["", "   \n ", None, "#Rewritten Prompt#:", "Sure! Here is the rewritten prompt:",
                                 '""', "Ok.", "#Given Prompt#: How to cook food?", "Rewritten prompt: yes"])
def test_clean_rewrite_rejects_empty_or_too_short(raw):
    assert clean_rewrite(raw) is None


def test_min_words_is_configurable():
    assert clean_rewrite("Cook rice.", min_words=3) is None
    assert clean_rewrite("Cook rice.", min_words=2) == "Cook rice."


def test_evolve_is_one_batched_call_with_cleaned_outputs_and_none_on_failure(compose):
    opset = load_operator_set(compose().operators)
    backend = OperatorRuleBackend(style="messy", fail_ops=["concretizing"])
    client = LLMClient("instructor", backend)
    out = evolve(client, opset, ["How to cook food?", "Name a planet.", "Sort a list."], [2, 3, 0], seeds=[1, 2, 3])
    assert backend.batches == [3]
    assert out[0] == "How to cook food? Explain the underlying reasons in depth."
    assert out[1] is None  # the backend failed this request: the caller keeps the previous instruction
    assert out[2] == "Sort a list. Describe a rare regional variant instead."
    assert client.account.by_purpose["evolve"].queries == 3
    assert evolve(client, opset, [], []) == []
    with pytest.raises(ValueError):
        evolve(client, opset, ["a"], [0, 1])
