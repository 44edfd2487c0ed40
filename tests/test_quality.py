"""Dataset quality figures (teams_rl/evol/quality.py) on hand-made inputs with known values, and the generate
stage's `quality` section in stats.json, the dataset card and the logged metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.evol import quality as Q


def test_distinct_n_counts_unique_over_all_ngrams():
    texts = ["A b a b", "a c"]                      # unigrams a b a b a c; bigrams ab ba ab ac
    assert Q.distinct_n(texts, 1) == 0.5           # 3 unique of 6
    assert Q.distinct_n(texts, 2) == 0.75          # 3 unique of 4
    assert Q.distinct_n(["one"], 2) == 0.0         # no bigram at all
    assert Q.distinct_n(["x y z", "u v w"], 2) == 1.0


def test_self_bleu_is_100_for_identical_and_0_for_disjoint_sentences():
    assert Q.self_bleu(["the cat sat on the mat today"] * 4) == 100.0
    assert Q.self_bleu(["alpha beta gamma delta", "one two three four"]) == 0.0
    mixed = Q.self_bleu(["the cat sat on the mat today", "the cat sat on the mat today",
                         "one two three four five six"])
    assert 0.0 < mixed < 100.0
    assert Q.self_bleu(["alone"]) is None


def test_vendi_score_is_one_for_identical_and_n_for_orthogonal_embeddings():
    assert Q.vendi_score(np.tile([[0.3, 0.4, 0.5]], (6, 1))) == pytest.approx(1.0)
    assert Q.vendi_score(np.eye(5)) == pytest.approx(5.0)
    assert Q.vendi_score(2.0 * np.eye(5)) == pytest.approx(5.0)             # cosine: the scale does not matter
    # two orthogonal clusters of 3 identical vectors each: two effective items; n > d takes the d x d path
    two = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3)
    assert Q.vendi_score(two) == pytest.approx(2.0)
    assert Q.vendi_score(np.zeros((0, 3))) is None


def test_sample_indices_are_seeded_and_bounded():
    assert Q.sample_indices(5, 64, 0) == [0, 1, 2, 3, 4]
    a, b = Q.sample_indices(100, 8, 3), Q.sample_indices(100, 8, 3)
    assert a == b and len(set(a)) == 8 and a == sorted(a) and Q.sample_indices(100, 8, 4) != a


def test_group_figures_carry_their_n():
    texts = ["write a poem about the sea", "write a poem about the sea", "list three prime numbers"]
    fig = Q.group_figures(texts, np.array([[1.0, 0], [1.0, 0], [0, 1.0]]), [2.0, None, 4.0], sample_size=2, seed=0)
    assert fig["n"] == 3 and fig["self_bleu_n"] == 2 and fig["vendi_n"] == 3 and fig["ifd_n"] == 2
    assert fig["words_mean"] == pytest.approx(16 / 3, abs=1e-3) and fig["words_median"] == 6.0
    assert fig["ifd_mean"] == 3.0 and fig["ifd_median"] == 3.0
    assert fig["vendi"] == pytest.approx(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))), abs=1e-4)
    off = Q.group_figures(texts, None, [None] * 3, sample_size=64, seed=0)
    assert off["vendi"] is None and off["vendi_n"] == 0 and off["ifd_mean"] is None and off["ifd_n"] == 0


def test_groups_split_by_operator_and_step():
    recs = [{"operator": "breadth", "step": 1}, {"operator": "deepening", "step": 2},
            {"operator": "breadth", "step": 2}]
    assert Q.groups(recs) == {"overall": [0, 1, 2], "operator/breadth": [0, 2], "operator/deepening": [1],
                              "step/1": [0], "step/2": [1, 2]}


@pytest.mark.slow
def test_ifd_with_the_tiny_llama_is_positive_and_the_ratio_of_the_two_perplexities(tiny_llama_dir):
    import torch

    from teams_rl.models import load_causal_lm
    from teams_rl.sft.data import format_prompt

    model, tok = load_causal_lm(tiny_llama_dir)
    examples = [("Name a colour.", "", "Blue is a colour."), ("Add the numbers.", "2 and 3", "The sum is 5."),
                ("Say nothing.", "", "")]
    scores = Q.ifd_scores(model, tok, examples, batch_size=2)
    assert scores[2] is None                                            # nothing to score
    assert all(s is not None and np.isfinite(s) and s > 0 for s in scores[:2])
    assert Q.ifd_scores(model, tok, examples[:2], batch_size=1) == pytest.approx(scores[:2], rel=1e-5)

    def loss(context: list[int], answer: list[int]) -> float:   # mean NLL of the answer tokens, unbatched
        ids = torch.tensor([context + answer])
        labels = torch.tensor([[-100] * len(context) + answer])
        with torch.inference_mode():
            return float(model(input_ids=ids, labels=labels).loss)

    for (ins, inp, out), score in zip(examples[:2], scores[:2], strict=True):
        answer = tok(out, add_special_tokens=False)["input_ids"]
        expected = np.exp(loss(tok(format_prompt(ins, inp))["input_ids"], answer) - loss([tok.bos_token_id], answer))
        assert score == pytest.approx(expected, rel=1e-4)


def test_settings_resolve_the_expert_and_fail_closed(compose):
    s = Q.QualitySettings.from_cfg(compose([]))                         # the default expert is SmolLM2 (hf)
    assert s.enabled and s.ifd_model == "smollm2" and s.sample_size == 64
    from tests.generate_fakes import fake_llm_overrides

    fake = Q.QualitySettings.from_cfg(compose(fake_llm_overrides()))
    assert fake.ifd_model is None and "not a local hf model" in fake.ifd_note
    assert Q.QualitySettings.from_cfg(compose(["generate.quality.ifd_model=null"])).ifd_model is None
    assert Q.QualitySettings.from_cfg(compose(["generate.quality.ifd_model=tiny_llama"])).ifd_model == "tiny_llama"
    from teams_rl.stages import load_stage

    validate = load_stage("generate").validate
    for bad, message in (("generate.quality.sample_size=1", "sample_size"),
                         ("generate.quality.ifd_model=/no/such/model", "does not exist"),
                         ("generate.quality.batch_size=0", "batch_size"),
                         ("generate.quality.enabled=maybe", "enabled")):
        with pytest.raises(TeamsRLError, match=message):
            validate(compose([bad]))


@pytest.mark.slow
def test_generate_writes_the_quality_section_card_and_metrics(compose, tmp_path):
    from tests.test_generate import FIXED, _generate

    over = FIXED + ["seeds.limit=6", "generate.embedding_stats=true", "generate.quality.ifd_model=tiny_llama",
                    "generate.quality.sample_size=4", "generate.quality.ifd_sample=5"]
    _, m, folder, _ = _generate(compose, tmp_path, over)
    section = json.loads((folder / "stats.json").read_text())["quality"]
    groups = section["groups"]
    n = m["dataset/size"]
    assert groups["overall"]["n"] == n and groups["seeds"]["n"] == 6
    ops = {k for k in groups if k.startswith("operator/")}
    assert ops == {"operator/add_constraints", "operator/deepening", "operator/concretizing"}
    assert sum(groups[k]["n"] for k in ops) == n == sum(g["n"] for k, g in groups.items() if k.startswith("step/"))
    for name, fig in groups.items():
        assert fig["self_bleu_n"] == min(4, fig["n"]), name
        assert fig["vendi_n"] == fig["n"] and 1.0 - 1e-6 <= fig["vendi"] <= fig["n"] + 1e-6, name
        assert fig["ifd_mean"] is None if fig["ifd_n"] == 0 else fig["ifd_mean"] > 0, name
    assert groups["seeds"]["ifd_n"] == 0                                        # the tiny seeds have no answers
    assert groups["overall"]["ifd_n"] == min(5, n)                              # a seeded sample of the records
    assert sum(groups[k]["ifd_n"] for k in ops) == groups["overall"]["ifd_n"]
    assert section["settings"]["ifd_model"] == "tiny_llama"
    card = (folder / "README.md").read_text()
    assert "## Quality per operator and step" in card
    rows = [line.split(" | ")[0].strip("| ") for line in card.split("## Quality per operator and step")[1].splitlines()
            if line.startswith("| ")][1:]
    assert rows[:2] == ["seeds", "overall"] and set(rows[2:5]) == ops and rows[5:] == ["step/1", "step/2", "step/3"]
    logged = {}
    for line in (tmp_path / "run" / "metrics" / "generate.jsonl").read_text().splitlines():
        logged.update(json.loads(line))
    assert logged["generate/quality/overall/n"] == n
    assert logged["generate/quality/seeds/vendi"] == groups["seeds"]["vendi"]
    assert logged["generate/quality/operator/deepening/ifd_mean"] == groups["operator/deepening"]["ifd_mean"]


def test_report_renders_the_quality_table_with_n(tmp_path):
    from teams_rl.report.collect import RunResults
    from teams_rl.report.tables import quality_table
    from tests.report_fixtures import build_run

    run_dir = build_run(tmp_path, "fixture")
    old = quality_table([RunResults.from_run_dir(run_dir)])          # a generate artifact from before quality
    assert old.rows == [] and "no quality section" in old.notes[0]

    figures = {"n": 5, "distinct_1": 0.5, "distinct_2": 0.75, "self_bleu": 12.5, "self_bleu_n": 4, "vendi": 3.2,
               "vendi_n": 5, "words_mean": 9.4, "words_median": 9.0, "ifd_mean": 0.91, "ifd_median": 0.9, "ifd_n": 3}
    section = {"enabled": True, "groups": {"step/10": figures, "operator/breadth": figures, "seeds": figures,
                                           "step/2": figures, "overall": figures},
               "settings": {"self_bleu_sample": 4, "sample_seed": 0, "embedding_model": Q.EMBEDDING_MODEL,
                            "ifd_model": "smollm2", "ifd_note": None, "ifd_prompt": "Alpaca"}}
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    stats_path = tmp_path / manifest["stages"]["generate"]["folder"] / "stats.json"
    stats_path.write_text(json.dumps({**json.loads(stats_path.read_text()), "quality": section}))
    table = quality_table([RunResults.from_run_dir(run_dir)])
    assert [row[1] for row in table.rows] == ["seeds", "overall", "operator/breadth", "step/2", "step/10"]
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["data"] == "fixture" and row["n"] == "5" and row["distinct-2"] == "0.75"
    assert row["self-BLEU"] == "12.5 (n=4)" and row["Vendi"] == "3.2" and row["IFD (mean)"] == "0.91 (n=3)"
    assert "IFD under `smollm2`" in table.notes[0] and "| fixture | seeds | 5 |" in table.to_markdown()
