"""Methods at an equal expert budget: the no-evolution mode, the budget cap (engine and stage), the method
configs, and the sweep's method table."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from teams_rl.errors import TeamsRLError
from teams_rl.evol.agents import Agent
from teams_rl.llm.accounting import Budget
from teams_rl.llm.client import LLMClient
from teams_rl.pipeline import fingerprints, plan
from tests.conftest import compose_config
from tests.generate_fakes import EvolFake
from tests.test_bad_inputs import GENERATE, manifests, run_cli_like
from tests.test_generation import OPS, SEEDS, generator

METHODS = ("teams_rl", "random_ops", "wizardlm", "no_evolution")


def capped_expert(max_queries: int) -> LLMClient:
    return LLMClient("expert", EvolFake(model="expert"), budget=Budget("expert", max_queries=max_queries))


# ------------------------------------------------------------------------------------------------ mode none

def test_mode_none_answers_each_seed_once_and_needs_no_policy(tmp_path):
    gen, expert, _ = generator(tmp_path, mode="none", agent=None, merge_input=False)
    gen.run(progress=False)
    records = gen.records()
    assert [r["id"] for r in records] == ["s1/0", "s2/0", "s3/0"]
    assert [r["instruction"] for r in records] == [s.instruction for s in SEEDS]
    assert records[1]["input"] == "Use four lines." and records[1]["operator"] == "none"
    assert all(r["output"].startswith("Here is a careful answer.") or "Sorry" in r["output"] for r in records)
    assert not any("drop_reason" in r for r in records)
    assert gen.calls() == {"calls/expert/answer": 3, "sent/expert/answer": 3}
    assert expert.account.by_purpose["answer"].queries == 3 and "evolve" not in expert.account.by_purpose
    # the answer prompt carries the seed's input, as the SFT template will
    assert any(p.endswith("Use four lines.") for p in expert.backend.prompts)


def test_mode_none_takes_no_forced_evolution_steps(tmp_path):
    with pytest.raises(TeamsRLError, match="generate.mode=none evolves nothing"):
        generator(tmp_path, mode="none", rules={"forced_breadth_steps": [1]})


# ------------------------------------------------------------------------------------------------ budget cap

def test_the_cap_ends_the_data_at_the_budget_with_seeds_in_order(tmp_path):
    # 3 steps: a seed costs at most 6 expert requests. s1 and s2 cost 6 each (3 evolutions + 3 answers); s3's
    # rewrites fail (no answers). With 13: s1 and s2 run together (6 + 6 <= 13); s3 (6 more) does not fit
    # beside them, so it starts alone afterwards; its first evolution is the 13th request, its second is refused.
    gen, expert, _ = generator(tmp_path, expert=capped_expert(13), on_budget="cap")
    gen.run(progress=False)  # a cap is no error: the data ends there
    assert gen.capped and gen.seeds_started() == 3
    assert gen.calls() == {"calls/expert/evolve": 7, "sent/expert/evolve": 7, "calls/expert/answer": 6,
                           "sent/expert/answer": 6}
    assert expert.account.total.queries == 13
    records = gen.records()
    assert [r["id"] for r in records] == ["s1/1", "s1/2", "s1/3", "s2/1", "s2/2", "s2/3", "s3/1"]
    assert records[-1]["drop_reason"] == "evolution_failed"  # the refused s3/2 is no record at all
    assert gen.budget_metrics() == {"budget_capped": True, "budget/max_expert_queries": 13,
                                    "budget/expert_queries": 13, "seeds_configured": 3}


def test_an_evolution_without_its_answer_is_dropped_as_budget_capped(tmp_path):
    # 10: s1 (6) runs; s2 does not fit beside it; s2 starts alone with 4 left: 3 evolutions + 1 answer
    gen, _, _ = generator(tmp_path, expert=capped_expert(10), on_budget="cap")
    gen.run(progress=False)
    reasons = {r["id"]: r.get("drop_reason") for r in gen.records()}
    assert reasons == {"s1/1": None, "s1/2": None, "s1/3": None, "s2/1": None, "s2/2": "budget_capped",
                       "s2/3": "budget_capped"}
    assert gen.seeds_started() == 2


def test_a_budget_that_holds_everything_is_not_capped(tmp_path):
    gen, _, _ = generator(tmp_path, expert=capped_expert(100), on_budget="cap")
    gen.run(progress=False)
    free, _, _ = generator(tmp_path / "free")
    free.run(progress=False)
    assert not gen.capped and gen.records() == free.records() and gen.seeds_started() == 3


def test_the_capped_data_does_not_depend_on_the_cache_or_on_a_resume(tmp_path):
    from teams_rl.llm.cache import RequestCache

    cache = RequestCache(tmp_path / "llm_cache.sqlite")
    warm = LLMClient("expert", EvolFake(model="expert"), cache=cache, budget=Budget("expert", max_queries=13))
    first, _, _ = generator(tmp_path / "a", expert=warm, on_budget="cap")
    first.run(progress=False)
    first.journal.close()
    # a fresh journal on a warm cache: every answer is a cache hit (the guard counts none), the cap still holds
    hits = LLMClient("expert", EvolFake(model="expert"), cache=cache, budget=Budget("expert", max_queries=13))
    cached, _, _ = generator(tmp_path / "b", expert=hits, on_budget="cap")
    cached.run(progress=False)
    assert cached.records() == first.records() and hits.backend.sent == 0 and cached.capped
    assert hits.account.total.cache_hits == 13
    # resumed on its own journal: nothing is sent and the same records come out
    again, expert, _ = generator(tmp_path / "a", expert=capped_expert(13), on_budget="cap")
    again.run(progress=False)
    assert again.records() == first.records() and expert.backend.sent == 0 and again.capped


def test_wizardlm_and_none_modes_under_the_cap(tmp_path):
    wiz = generator(tmp_path / "w", mode="wizardlm", steps=4, judge=True, expert=capped_expert(9),
                           on_budget="cap", agent=fixed_agent4())[0]
    wiz.run(progress=False)
    calls = wiz.calls()
    assert calls["calls/expert/evolve"] + calls["calls/expert/answer"] == 9 and wiz.capped
    assert calls["calls/reviewer/judge"] >= 1  # the reviewer's judgements are not expert queries
    none = generator(tmp_path / "n", mode="none", expert=capped_expert(2), on_budget="cap", agent=None)[0]
    none.run(progress=False)
    assert [r["id"] for r in none.records()] == ["s1/0", "s2/0"] and none.capped and none.seeds_started() == 2


def fixed_agent4():
    return Agent({"algorithm": "fixed", "operators": OPS, "episode_length": 4, "schedule": [1, 2, 3, 4]})


def test_a_cap_needs_an_expert_budget_and_the_stream_schedule(tmp_path):
    with pytest.raises(TeamsRLError, match="needs expert.budget.max_queries"):
        generator(tmp_path, on_budget="cap")
    with pytest.raises(TeamsRLError, match="needs generate.schedule=stream"):
        generator(tmp_path, expert=capped_expert(5), on_budget="cap", schedule="barrier")


# ------------------------------------------------------------------------------------------------ the stage

CAP = GENERATE + ["generate.on_budget=cap", "seeds.limit=6", "generate.holdout_fraction=0.25"]


def test_the_stage_commits_what_fit_and_says_it_was_capped(compose, tmp_path, capsys):
    code, line, artifacts = run_cli_like(compose, tmp_path, CAP + ["expert.budget.max_queries=14"], capsys)
    assert code == 0, line
    gen = next(m for m in manifests(artifacts) if m.parent.parent.name == "generate")
    metrics = json.loads(gen.read_text())["metrics"]
    assert metrics["budget_capped"] is True and metrics["budget/max_expert_queries"] == 14
    assert metrics["calls/expert/evolve"] + metrics["calls/expert/answer"] == 14
    assert metrics["seeds"] == 3 and metrics["seeds_configured"] == 6   # 3 steps: 6 per seed
    assert metrics["dataset/size"] == metrics["dataset/train"] + metrics["dataset/heldout"] > 0
    card = (gen.parent / "README.md").read_text()
    assert "it ended the data after 3 of 6 seeds" in card


def test_the_dry_run_estimate_of_a_capped_generation_is_the_cap(tmp_path):
    """Under generate.on_budget=cap the generation stops sending at the budget: the dry run's expert requests
    add up to the cap (in the uncapped plans' proportions), not the uncapped bound, and say so."""
    from teams_rl.stages.generate import STAGE

    def expert_plans(*extra):
        return [p for p in STAGE.estimate(compose_config(CAP + list(extra), tmp_path)) if p.role == "expert"]

    uncapped = expert_plans("generate.on_budget=stop", "expert.budget.max_queries=14")
    assert sum(p.requests for p in uncapped) == 36                                   # 6 seeds x 3 steps x 2
    capped = expert_plans("expert.budget.max_queries=14")
    assert [p.purpose for p in capped] == [p.purpose for p in uncapped]
    assert sum(p.requests for p in capped) == 14 and [p.requests for p in capped] == [7, 7]
    assert all("capped: 14 of 36 expert requests" in p.note for p in capped)
    assert [p.requests for p in expert_plans("expert.budget.max_queries=100")] == [18, 18]   # the bound fits


def test_the_budget_is_in_the_fingerprint_only_under_a_cap(tmp_path):
    def gen_fp(*extra):
        return fingerprints(cfg := compose_config(GENERATE + list(extra), tmp_path), plan(cfg))["generate"]

    assert gen_fp("expert.budget.max_queries=10") == gen_fp("expert.budget.max_queries=20")
    assert gen_fp("generate.on_budget=cap", "expert.budget.max_queries=10") != \
        gen_fp("generate.on_budget=cap", "expert.budget.max_queries=20")


@pytest.mark.parametrize("overrides, message", [
    (["generate.on_budget=cap"], "generate.on_budget=cap needs expert.budget.max_queries"),
    (["generate.on_budget=cap", "expert.budget.max_queries=5", "generate.schedule=barrier"],
     "needs generate.schedule=stream"),
    (["generate.on_budget=always"], "generate.on_budget must be one of stop, cap, got 'always'"),
    (["generate.mode=none", "generate.rules.forced_breadth_steps=[1]"], "generate.mode=none evolves nothing"),
])
def test_bad_budget_settings_stop_before_any_stage(compose, tmp_path, capsys, overrides, message):
    code, line, artifacts = run_cli_like(compose, tmp_path, GENERATE + overrides, capsys)
    assert code == 2 and line.startswith("error: ") and message in line, line
    assert not (artifacts.exists() and any(artifacts.glob("*/*"))), "a stage started"


# ------------------------------------------------------------------------------------------------ configs

def compose_method(experiment: str, method: str, tmp_path, *extra):
    return compose_config([f"+experiment={experiment}", f"+method={method}", *extra], tmp_path)


@pytest.mark.parametrize("experiment", ["budget_matched", "budget_matched_small"])
def test_the_methods_share_budget_target_evaluation_and_attacks(experiment, tmp_path):
    cfgs = {m: compose_method(experiment, m, tmp_path) for m in METHODS}
    fps = {m: fingerprints(c, plan(c)) for m, c in cfgs.items()}
    budget = {c.expert.budget.max_queries for c in cfgs.values()}
    assert len(budget) == 1 and None not in budget
    for m, c in cfgs.items():
        assert c.generate.on_budget == "cap" and c.generate.schedule == "stream", m
        assert c.target.model == cfgs["teams_rl"].target.model
        assert OmegaConf.to_container(c.evaluate) == OmegaConf.to_container(cfgs["teams_rl"].evaluate)
        assert OmegaConf.to_container(c.privacy) == OmegaConf.to_container(cfgs["teams_rl"].privacy)
        assert OmegaConf.to_container(c.seeds) == OmegaConf.to_container(cfgs["teams_rl"].seeds)
        assert c.experiment_name == experiment and c.method_name == m
    # one base-model evaluation for the whole sweep
    assert len({f["evaluate_base"] for f in fps.values()}) == 1
    assert len({f["generate"] for f in fps.values()}) == 4
    teams, rand, wiz, none = (cfgs[m] for m in METHODS)
    assert teams.generate.mode == rand.generate.mode == "teams_rl" and wiz.generate.mode == "wizardlm"
    assert none.generate.mode == "none" and "policy" not in plan(none)
    assert OmegaConf.to_container(teams.generate.rules) == OmegaConf.to_container(rand.generate.rules)
    assert teams.generate.rules.forced_breadth_steps and not wiz.generate.rules.forced_breadth_steps
    assert rand.rl.algorithm == wiz.rl.algorithm == "random" and teams.rl.algorithm != "random"
    assert (wiz.generate.episode_length, wiz.filters.elimination.no_info_gain) == (4, True)
    assert teams.generate.episode_length == 6 and not teams.filters.elimination.no_info_gain


def test_budget_matched_is_the_paper_scale(tmp_path):
    cfg = compose_method("budget_matched", "teams_rl", tmp_path)
    main = compose_config(["+experiment=llama7b"], tmp_path)
    assert cfg.target.model == main.target.model and cfg.expert.backend.model == main.expert.backend.model
    assert cfg.rl.algorithm == main.rl.algorithm and cfg.seeds.kind == "alpaca"
    assert fingerprints(cfg, plan(cfg))["evaluate_base"] == fingerprints(main, plan(main))["evaluate_base"]


def test_a_method_needs_the_budget_experiment(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(["method=teams_rl"], tmp_path)


# ------------------------------------------------------------------------------------------------ the sweep table

def method_sweep(root):
    from tests.report_fixtures import build_run

    sweep = root / "sweep"
    specs = {  # method: (generate mode, expert calls, reviewer calls, pairs, held out, seeds, capped, ARC)
        "teams_rl": ("teams_rl", {"calls/expert/evolve": 24, "calls/expert/answer": 24}, 24, 6, 4, True, 0.50),
        "random_ops": ("teams_rl", {"calls/expert/evolve": 24, "calls/expert/answer": 24}, 24, 6, 4, True, 0.45),
        "wizardlm": ("wizardlm", {"calls/expert/evolve": 28, "calls/expert/answer": 20,
                                  "calls/reviewer/judge": 20}, 9, 3, 7, True, 0.40),
        "no_evolution": ("none", {"calls/expert/answer": 48}, 48, 12, 48, False, 0.30),
    }
    for n, (method, (mode, calls, pairs, held, seeds, capped, arc)) in enumerate(specs.items()):
        extra = {**{k: 0 for k in ("calls/expert/evolve", "calls/expert/answer", "calls/reviewer/judge")},
                 **calls, "calls/total": sum(calls.values()), "dataset/heldout": held, "seeds": seeds,
                 "budget_capped": capped, "budget/max_expert_queries": 48,
                 "budget/expert_queries": sum(v for k, v in calls.items() if "/expert/" in k)}
        build_run(sweep, str(n), mode=mode, salt=method, size=pairs, generate=extra, stderr=0.05, mia_shift=0.1 * n,
                  tuned={"arc_challenge": arc, "hellaswag": 0.25, "mmlu": 0.3, "truthfulqa_mc2": 0.45},
                  overrides=["+experiment=budget_matched_small", f"+method={method}"])
    return sweep


def test_the_sweep_report_has_the_method_table_and_figure(tmp_path):
    import csv

    from teams_rl.report.collect import RunResults
    from teams_rl.report.sweep import aggregate_sweep

    sweep = method_sweep(tmp_path)
    md = aggregate_sweep(sweep, dpi=50).read_text()
    assert "## Methods at an equal expert budget" in md and "](figures/methods.png)" in md
    png = sweep / "report" / "figures" / "methods.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rows = {r[0]: r for r in csv.reader(open(sweep / "report" / "methods.csv"))}
    header = rows["method"]
    col = {name: header.index(name) for name in header}
    assert list(rows)[1:] == ["teams_rl", "random_ops", "wizardlm", "no_evolution"]
    assert rows["teams_rl"][col["expert queries (budget)"]] == "48 (48)"
    assert rows["wizardlm"][col["reviewer queries"]] == "20" and rows["teams_rl"][col["reviewer queries"]] == "0"
    assert rows["no_evolution"][col["capped"]] == "no" and rows["wizardlm"][col["capped"]] == "yes"
    assert rows["no_evolution"][col["pairs (held out)"]] == "48 (12)"
    assert rows["no_evolution"][col["seeds used"]] == "48"
    assert rows["teams_rl"][col["ARC (%)"]] == "50.00 ± 5.00" and rows["no_evolution"][col["ARC (%)"]] == "30.00 ± 5.00"
    # the average's error: four independent standard errors of 0.05 -> 0.05 * 2 / 4
    assert rows["teams_rl"][col["average (%)"]].endswith("± 2.50")
    pm = RunResults.from_run_dir(sweep / "2").metrics("privacy")
    auc_cell = rows["wizardlm"][col["MIA AUC (LOSS) [95% CI]"]]
    assert auc_cell == f"{pm['loss/auc']:.3f} [{pm['loss/auc_ci_low']:.3f}, {pm['loss/auc_ci_high']:.3f}]"
    assert rows["wizardlm"][col["MIA n (members + non-members)"]] == "30 + 30"


def test_the_mmlu_macro_score_gets_the_standard_error_of_its_subject_mean():
    import math

    from teams_rl.report.collect import benchmark_stderr
    from teams_rl.report.methods import _finetuned

    ev = {"finetuned/mmlu": 0.375, "finetuned/mmlu/acc": 0.4, "finetuned/mmlu/acc_macro": 0.375,
          "finetuned/mmlu/acc_stderr": 0.1, "finetuned/mmlu/a/acc": 0.5, "finetuned/mmlu/a/n": 5.0,
          "finetuned/mmlu/b/acc": 0.25, "finetuned/mmlu/b/n": 9.0}
    expected = math.sqrt(0.5 * 0.5 / 4 + 0.25 * 0.75 / 8) / 2
    assert benchmark_stderr(_finetuned(ev), "mmlu") == pytest.approx(expected)
    ev["finetuned/mmlu/acc"] = 0.375   # a micro mean equal to the headline: lm-eval's own stderr
    assert benchmark_stderr(_finetuned(ev), "mmlu") == pytest.approx(0.1)
    assert benchmark_stderr({"arc_challenge": 0.5}, "arc_challenge") is None


def test_the_method_table_flags_small_and_degenerate_attack_intervals():
    """Like a single run's privacy table: a method whose attack saw < 30 members per side, or whose bootstrap CI
    has zero width, gets a WARNING note; a method with enough members and a real interval gets none."""
    from teams_rl.report.methods import MethodRow, table

    tiny = MethodRow("wizardlm", 1, auc=(1.0, 1.0, 1.0), n_members=2, n_nonmembers=2)
    ample = MethodRow("teams_rl", 1, auc=(0.68, 0.57, 0.79), n_members=40, n_nonmembers=40)
    notes = [n for n in table([tiny, ample]).notes if n.startswith("WARNING")]
    assert len(notes) == 2 and all("(wizardlm)" in n for n in notes)
    assert "2 members / 2 non-members is too small" in notes[0] and "degenerate interval" in notes[1]


def test_a_capped_estimate_never_gives_a_plan_more_than_its_uncapped_count():
    """The cap is spread over the plans by largest remainder: [10, 10, 1] under a cap of 20 is [10, 9, 1] or
    [9, 10, 1] (never [9, 9, 2], which would plan two requests for a purpose that sends one)."""
    from teams_rl.evol.budget_cap import cap_plans
    from teams_rl.llm.plans import RequestPlan

    cfg = OmegaConf.create({"generate": {"on_budget": "cap"}, "expert": {"budget": {"max_queries": 20}}})
    plans = [RequestPlan("expert", p, n) for p, n in (("evolve", 10), ("answer", 10), ("heldout_answer", 1))]
    plans.insert(1, RequestPlan("instructor", "other", 5))
    counts = [p.requests for p in cap_plans(cfg, plans)]
    assert counts[1] == 5 and sum(counts) - 5 == 20
    assert all(n <= uncapped for n, uncapped in zip(counts, [10, 5, 10, 1], strict=True))
    assert counts[3] == 1
