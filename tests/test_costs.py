"""The query/size claims from measurements: TeaMs-RL measured / WizardLM's measured per-seed cost x 52,002
seeds, with the measured and extrapolated parts labelled; one set of WizardLM constants."""

from __future__ import annotations

import pytest
import yaml

from teams_rl.errors import TeamsRLError
from teams_rl.report import costs
from teams_rl.report.paper import PaperResults
from tests.conftest import REPO
from tests.report_fixtures import build_run


def manifest(seeds: int, calls: dict, size: int, train: int | None = None, **metrics) -> dict:
    return {"metrics": {"seeds": seeds, "dataset/size": size, "dataset/train": size if train is None else train,
                        **calls, **metrics}, "config": {"seeds": {"kind": "tiny"}}}


TEAMS = manifest(2980, {"calls/expert/evolve": 17880, "calls/expert/answer": 17880,
                        "calls/expert/heldout_evolve": 600, "calls/expert/heldout_answer": 600},
                 size=18480, train=17880, heldout_seeds=100)
WIZARD = manifest(100, {"calls/expert/evolve": 400, "calls/expert/answer": 380, "calls/reviewer/judge": 380},
                  size=290)
POLICY = {"metrics": {"requests/instructor": 1200, "requests/reviewer": 1200, "llm_queries/instructor": 3}}


def test_one_set_of_wizardlm_constants_and_it_is_consistent(tmp_path):
    scale = PaperResults.load().scale()
    assert (scale.seeds, scale.rounds, scale.calls_per_round) == (52002, 4, 3)
    assert scale.wizard_queries == 52002 * 4 * 3 == 624024
    assert (scale.wizard_instructions, scale.query_ratio, scale.size_ratio) == (250000, 0.0573, 0.0675)
    assert not any(name.startswith("PAPER_WIZARD") for name in dir(costs))   # no second copy in the code
    data = yaml.safe_load((REPO / "teams_rl" / "assets" / "paper_results.yaml").read_text())
    data["queries"]["wizardlm_total_queries"]["value"] = 624000
    bad = tmp_path / "paper.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(TeamsRLError, match="wizardlm_total_queries=624,000 is not 52,002 seeds x 4 rounds x 3"):
        PaperResults.load(bad).scale()


def test_the_headline_ratios_are_measured_over_extrapolated():
    claims = costs.Claims.of(TEAMS, WIZARD, POLICY)
    # TeaMs-RL as measured: the non-member seeds' requests are evaluation, not the method
    assert (claims.teams.expert, claims.teams.policy, claims.teams.pairs) == (35760, 2400, 17880)
    assert claims.teams.other == {("expert", "heldout_evolve"): 600, ("expert", "heldout_answer"): 600}
    # WizardLM: 1,160 requests on 100 seeds (retries included) = 11.6 per seed -> x 52,002
    assert claims.wizard_queries_per_seed == pytest.approx(11.6)
    assert claims.wizard_queries_extrapolated == round(11.6 * 52002) == 603223
    assert claims.wizard_pairs_extrapolated == round(2.9 * 52002) == 150806
    assert claims.expert_query_ratio == pytest.approx(35760 / 603223)        # 5.93%
    assert claims.all_query_ratio == pytest.approx((35760 + 2400) / 603223)
    assert claims.size_ratio == pytest.approx(17880 / 150806)
    assert claims.per_seed_ratio == pytest.approx(12 / 11.6)


def test_the_tables_label_measured_and_extrapolated_parts():
    claims = costs.Claims.of(TEAMS, WIZARD, POLICY)
    parts, ratios = claims.parts_table(), claims.ratio_table()
    assert parts.columns == ["part", "measured: seeds", "measured: count", "measured: per seed",
                             "extrapolated to 52,002 seeds", "paper-side WizardLM constant"]
    wiz = parts.find("WizardLM baseline: queries (evolve + answer + judge, elimination retries included)")
    assert wiz[1:5] == [100, 1160, 11.6, 603223] and wiz[5].startswith("624,024 (52,002 x 4 rounds x 3 calls")
    assert parts.find("TeaMs-RL run: expert queries (evolve + answer)")[1:5] == [2980, 35760, 12.0,
                                                                               "not extrapolated"]
    assert parts.rows[-1][0].startswith("TeaMs-RL run: evaluation-only requests (expert/heldout_answer")
    assert ratios.columns[2] == "WizardLM (measured per seed x 52,002 seeds)"
    head = ratios.find("expert queries, TeaMs-RL / WizardLM")
    assert head[1:5] == [35760, 603223, "5.9282%", "5.73% (paper)"]
    assert ratios.find("dataset size, TeaMs-RL / WizardLM")[3:5] == ["11.8563%", "6.75% (secondary)"]
    md = ratios.to_markdown()
    assert "| expert queries, TeaMs-RL / WizardLM | 35,760 | 603,223 | 5.9282% | 5.73% (paper) |" in md


def test_a_generation_without_the_needed_metrics_is_one_line():
    with pytest.raises(TeamsRLError, match="the WizardLM manifest has no metric 'seeds'"):
        costs.Claims.of(TEAMS, {"metrics": {"dataset/size": 3}})


def test_the_cli_prints_the_claims_of_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    build_run(sweep, "0", overrides=["+experiment=queries_small"])
    build_run(sweep, "1", mode="wizardlm", overrides=["+experiment=queries_small_wizardlm"])
    assert costs.main(["--sweep", str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "## Query and size claims: TeaMs-RL measured / WizardLM extrapolated" in out
    assert "| expert queries, TeaMs-RL / WizardLM | 16 | 624,024 | 0.0026% | 5.73% (paper) |" in out
    assert "extrapolated to 52,002 seeds" in out and "## Same-seed control" in out
    assert (tmp_path / "out" / "query_claims.csv").is_file() and (tmp_path / "out" / "query_claim_parts.md").is_file()
    assert costs.main(["--sweep", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such sweep directory"
