"""The generate stage end to end on the tiny seeds with a deterministic test backend (tests/generate_fakes.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, scaled_down
from tests.generate_fakes import fake_llm_overrides

# A policy stage that costs almost nothing: a fixed schedule, one tiny update, a reward without MiniLM.
FAST_POLICY = ["reward=reviewer_judge", "policy.updates=1", "policy.n_envs=1", "policy.steps_per_update=1",
               "policy.progress=false"]
FIXED = ["rl=fixed", "rl.schedule=[add_constraints,deepening,concretizing]"]
QUIET = ["generate.embedding_stats=false", "generate.progress=false"]
# Steps 1 and 3 in-depth (the fixed schedule), step 2 forced in-breadth; in-breadth never chosen elsewhere.
PAPER_RULES = ["generate.episode_length=3", "generate.rules.forced_breadth_steps=[2]",
               "generate.rules.replace_breadth_with=add_constraints", "filters.rouge_l.against_seeds=true"]


def _generate(compose, tmp_path, overrides, name="run"):
    from teams_rl.pipeline import run_pipeline

    cfg = compose(fake_llm_overrides() + FAST_POLICY + QUIET + ["stages=[generate]"] + overrides)
    metrics = run_pipeline(cfg, tmp_path / name)["generate"]
    manifest = json.loads((tmp_path / name / "run_manifest.json").read_text())
    folder = Path(manifest["stages"]["generate"]["folder"])
    return cfg, metrics, folder, json.loads((folder / "manifest.json").read_text())


def _journal(folder: Path, kind: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in rows if r["kind"] == kind}


@pytest.mark.slow
def test_generate_tiny_end_to_end(compose, tmp_path):
    import datasets

    cfg, m, folder, manifest = _generate(compose, tmp_path, FIXED + PAPER_RULES + ["seeds.limit=10"])

    # 10 seeds x 3 steps; injected failures (see generate_fakes): Fibonacci seed fails all 3 evolutions,
    # poem -> sorry answer, sentiment -> "given prompt", virus -> 3-word rewrite, "Solve for x" -> near-copy.
    assert m["evolutions"] == 30
    assert m["dropped/evolution_failed"] == 3
    assert m["dropped/rule2_sorry_short_answer"] == 1
    assert m["dropped/rule4_copied_prompt_words"] == 1
    assert m["dropped/alpaca_length"] == 1
    assert m["dropped/rouge_l_near_duplicate"] == 1
    assert m["dropped"] == 7 and m["dataset/size"] == 23
    assert m["dataset/train"] + m["dataset/heldout"] == 23 and m["dataset/heldout"] >= 1

    # query accounting: one evolve per step, one answer per successful evolution, no judge (rule 1 off)
    assert m["calls/expert/evolve"] == 30 and m["calls/expert/answer"] == 27 and m["calls/total"] == 57
    expert = manifest["llm"]["expert"]["by_purpose"]
    assert expert["evolve"]["queries"] == 30 and expert["answer"]["queries"] == 27
    assert "reviewer" not in manifest["llm"]

    # lineage and the generation rules
    evolved = _journal(folder, "evolve")
    seeds = {json.loads(x)["id"]: json.loads(x) for x in
             (REPO / "teams_rl/assets/seeds_tiny.jsonl").read_text().splitlines()[:10]}
    for rec in evolved.values():
        expected_op = {1: "add_constraints", 2: "breadth", 3: "concretizing"}[rec["step"]]
        assert rec["operator"] == expected_op
        if rec["parent_id"] in seeds:
            seed = seeds[rec["parent_id"]]
            assert rec["parent"] == (seed["instruction"] + ("\n" + seed["input"] if seed["input"] else ""))
        else:
            parent = evolved[rec["parent_id"]]
            assert parent["seed_id"] == rec["seed_id"] and parent["step"] < rec["step"]
            assert rec["parent"] == parent["instruction"]
    # a failed evolution leaves the chain at its parent: the Fibonacci seed's 3 steps all start from the seed
    assert [evolved[f"tiny-003/{s}"]["parent_id"] for s in (1, 2, 3)] == ["tiny-003"] * 3

    # outputs
    ds = datasets.load_from_disk(str(folder / "dataset"))
    assert set(ds) == {"train", "heldout"} and len(ds["train"]) == m["dataset/train"]
    assert set(ds["train"]["seed_id"]).isdisjoint(ds["heldout"]["seed_id"])
    assert set(ds["train"]["id"]).isdisjoint(ds["heldout"]["id"])
    alpaca = json.loads((folder / "alpaca.json").read_text())
    heldout = json.loads((folder / "heldout.json").read_text())
    assert len(alpaca) == m["dataset/train"] and len(heldout) == m["dataset/heldout"]
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in alpaca)
    assert {r["instruction"] for r in alpaca}.isdisjoint(r["instruction"] for r in heldout)
    dropped = [json.loads(x) for x in (folder / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == 7 and {d["id"] for d in dropped if d["drop_reason"] == "evolution_failed"} == \
        {"tiny-003/1", "tiny-003/2", "tiny-003/3"}
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["operator_mix"]["breadth"] == 9 and sum(stats["operator_mix"].values()) == 23
    card = (folder / "README.md").read_text()
    assert "| final records | 23 |" in card and "calls/expert/evolve | 30" in card
    assert (folder / "lengths.png").stat().st_size > 0 and (folder / "operators.png").stat().st_size > 0


def test_rules_choose_bias_forced_and_replaced():
    from teams_rl.evol.generation import Rules

    rules = Rules(frozenset({1, 4}), np.array([0.0, 0.7, 0, 0, 0, 0]), 1, (0,))
    assert rules.choose(np.array([0.0, 0, 0, 0, 0, 5.0]), step=1) == 0        # forced in-breadth
    assert rules.choose(np.array([0.5, 0.0, 0.6, 0, 0, 0]), step=2) == 1      # +0.7 bias wins
    assert rules.choose(np.array([3.0, 0.0, 0.6, 0, 0, 0]), step=3) == 1      # in-breadth replaced
    assert rules.choose(np.array([0.0, 0.0, 0.9, 0, 0, 0]), step=5) == 2


def test_replace_breadth_with_next_is_the_policys_own_next_choice(compose):
    """`replace_breadth_with: next` (the embedded default's rule): where in-breadth is not forced, a policy
    choice of in-breadth becomes its best other operator; on Gumbel-sampled scores that is a draw from the
    policy renormalised over the in-depth operators."""
    from teams_rl.errors import TeamsRLError
    from teams_rl.evol.generation import Rules, build_rules
    from teams_rl.evol.operators import load_operator_set

    opset = load_operator_set(compose().operators)
    rules = build_rules(OmegaConf.create({"episode_length": 3, "rules": {"forced_breadth_steps": [2],
                                                                        "replace_breadth_with": "next"}}), opset)
    assert rules.replace_breadth_with == Rules.NEXT
    logp = np.log([0.9, 0.01, 0.01, 0.02, 0.05, 0.01])
    assert rules.choose(logp, step=2) == 0                          # forced
    assert rules.choose(logp, step=1) == 4 == rules.choose(logp, step=3)   # its second choice
    assert rules.choose(np.log([0.1, 0.5, 0.1, 0.1, 0.1, 0.1]), step=1) == 1   # not in-breadth: kept
    rng = np.random.default_rng(0)
    draws = np.array([rules.choose(logp + rng.gumbel(size=6), step=1) for _ in range(4000)])
    assert 0 not in draws
    freq = np.bincount(draws, minlength=6)[1:] / len(draws)
    assert np.allclose(freq, np.array([0.01, 0.01, 0.02, 0.05, 0.01]) / 0.10, atol=0.03), freq
    with pytest.raises(TeamsRLError, match="replace_breadth_with=next needs an in-depth operator"):
        build_rules(OmegaConf.create({"episode_length": 3, "rules": {"replace_breadth_with": "next"}}),
                    load_operator_set(compose(["operators.ops=[breadth]"]).operators))


def test_replace_breadth_with_cycle_takes_the_in_depth_operators_in_turn(compose):
    """`replace_breadth_with: cycle`: a replaced in-breadth choice becomes in-depth operator (turn + step) mod
    n, whatever the scores, so consecutive seeds draw every in-depth operator at every replaced step."""
    from teams_rl.errors import TeamsRLError
    from teams_rl.evol.generation import Rules, build_rules
    from teams_rl.evol.operators import load_operator_set

    opset = load_operator_set(compose().operators)
    rules = build_rules(OmegaConf.create({"episode_length": 3, "rules": {"forced_breadth_steps": [2],
                                                                        "replace_breadth_with": "cycle"}}), opset)
    assert rules.replace_breadth_with == Rules.CYCLE and list(rules.depth) == [1, 2, 3, 4, 5]
    committed = np.log([0.998, 0.0001, 0.0001, 0.0001, 0.0017, 0.0001])   # `next` would draw index 4 ~85%
    assert rules.choose(committed, step=2, turn=7) == 0                      # forced
    assert [rules.choose(committed, step=1, turn=t) for t in range(6)] == [2, 3, 4, 5, 1, 2]
    assert [rules.choose(committed, step=3, turn=t) for t in range(5)] == [4, 5, 1, 2, 3]
    assert rules.choose(np.log([0.1, 0.5, 0.1, 0.1, 0.1, 0.1]), step=1, turn=3) == 1   # not in-breadth: kept
    with pytest.raises(TeamsRLError, match="replace_breadth_with=cycle needs an in-depth operator"):
        build_rules(OmegaConf.create({"episode_length": 3, "rules": {"replace_breadth_with": "cycle"}}),
                    load_operator_set(compose(["operators.ops=[breadth]"]).operators))


def test_cycle_draws_every_in_depth_operator_from_a_policy_that_only_picks_breadth(compose, tmp_path):
    """The engine end to end: a policy that always picks in-breadth, the default's rules (step 2 forced,
    `cycle` elsewhere): over 5 seeds each in-depth operator is evolved once at step 1 and once at step 3."""
    always_breadth = ["rl=fixed", "rl.schedule=[breadth,breadth,breadth]", "generate.episode_length=3",
                      "generate.rules.forced_breadth_steps=[2]", "generate.rules.replace_breadth_with=cycle"]
    _, m, folder, _ = _generate(compose, tmp_path, always_breadth + ["seeds.limit=5"])
    evolved = _journal(folder, "evolve")
    assert len(evolved) == 15
    by_step = {step: sorted(e["operator"] for k, e in evolved.items() if k.endswith(f"/{step}")) for step in (1, 2, 3)}
    depth = sorted(["add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input"])
    assert by_step[1] == depth == by_step[3]
    assert by_step[2] == ["breadth"] * 5


@pytest.mark.slow
def test_wizardlm_baseline_and_query_cost_table(compose, tmp_path):
    from teams_rl.report.costs import main as costs_main
    from teams_rl.report.costs import query_cost_table

    seeds = ["seeds.limit=6"]
    wizard_over = ["+experiment=wizardlm_baseline"] + seeds + fake_llm_overrides(equal_every=3)
    _, w, wfolder, wman = _generate(compose, tmp_path, wizard_over, "wizard")
    assert w["mode"] == "wizardlm" and w["episode_length"] == 4
    evolved, answers, judged = _journal(wfolder, "evolve"), _journal(wfolder, "answer"), _journal(wfolder, "judge")
    assert len(evolved) == 6 * 4 and w["calls/expert/evolve"] == 24
    ok = [k for k, e in evolved.items() if e["instruction"] is not None]
    assert set(answers) == set(ok) and w["calls/expert/answer"] == len(ok)
    assert set(judged) == set(ok) and w["calls/reviewer/judge"] == len(ok)
    # an evolution that failed elimination goes back to the pool: the next round retries from its parent
    elimination = {"evolution_failed", "rule1_no_information_gain", "rule2_sorry_short_answer",
                   "rule3_only_punctuation_stopwords", "rule4_copied_prompt_words"}
    dropped = [json.loads(x) for x in (wfolder / "dropped.jsonl").read_text().splitlines()]
    failed = {d["id"] for d in dropped if d["drop_reason"] in elimination}
    assert {k for k in ok if not judged[k]["not_equal"]} <= failed
    assert {k for k, e in evolved.items() if e["instruction"] is None} <= failed
    for seed in {e["seed_id"] for e in evolved.values()}:
        parent = seed
        for r in range(1, 5):
            key = f"{seed}/{r}"
            assert evolved[key]["parent_id"] == parent
            if key not in failed:
                parent = key
    assert w["dropped/rule1_no_information_gain"] == sum(1 for k in ok if not judged[k]["not_equal"])

    _, t, _, tman = _generate(compose, tmp_path, FIXED + seeds, "teams")
    table = query_cost_table(tman, wman)
    text = table.to_markdown()
    assert "calls: expert / evolve" in text and "5.73%" in text and "6.75%" in text

    def accounted(man, role, purpose):  # every request either reached the backend or the cache
        c = man["llm"].get(role, {}).get("by_purpose", {}).get(purpose, {})
        return c.get("queries", 0) + c.get("cache_hits", 0)

    for role, purpose in (("expert", "evolve"), ("expert", "answer"), ("reviewer", "judge")):
        row = table.row(f"calls: {role} / {purpose}")
        assert row.teams == accounted(tman, role, purpose)
        assert row.wizard == accounted(wman, role, purpose)
    assert table.row("calls: expert / evolve").teams == 6 * 3 and table.row("calls: expert / evolve").wizard == 24
    total = table.row("calls: all roles")
    assert total.teams == t["calls/total"] and total.wizard == w["calls/total"]
    assert total.ratio == pytest.approx(t["calls/total"] / w["calls/total"])
    size = table.row("dataset size (final instructions)")
    assert (size.teams, size.wizard) == (t["dataset/size"], w["dataset/size"])
    x = table.row("calls extrapolated to 52,002 seeds")
    assert x.teams == round(t["calls/total"] / 6 * 52002)
    md, csv_path = table.save(tmp_path / "report")
    assert md.read_text().count("\n|") >= len(table.rows) and csv_path.read_text().startswith("quantity,")
    # the CLI finds the newest TeaMs-RL / WizardLM pair on the same seeds and writes the same table
    assert costs_main(["--artifacts", str(tmp_path / "artifacts"), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "query_costs.csv").read_text() == csv_path.read_text()


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted_run(compose, tmp_path, monkeypatch):
    """Kill a real `python -m teams_rl` generation at a random point, restart it, compare with a run that was
    never interrupted; then a rerun of the finished generation sends zero requests."""
    from teams_rl.pipeline import run_pipeline

    overrides = (fake_llm_overrides(latency_s=0.05, batch_size=2) + FAST_POLICY + FIXED + PAPER_RULES + QUIET +
                 ["stages=[generate]", "seeds.limit=12"])
    # reference: uninterrupted, in-process
    ref_cfg = compose(overrides, artifacts=tmp_path / "ref")
    run_pipeline(ref_cfg, tmp_path / "ref_run")
    ref_folder = next((tmp_path / "ref" / "generate").glob("*/manifest.json")).parent

    # the killed run: the policy artifact first (in-process), then generate in a subprocess
    art = tmp_path / "killed"
    run_pipeline(compose([o for o in overrides if not o.startswith("stages=")] + ["stages=[policy]"],
                         artifacts=art), tmp_path / "pol_run")
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "EVOLFAKE_CALLS_FILE": str(calls), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "teams_rl", "logger=none", f"paths.artifacts={art}",
           f"hydra.run.dir={tmp_path / 'hydra'}"] + scaled_down(overrides) + overrides
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    kill_after = random.Random().randint(3, 40)  # journal lines; a full run writes 36 evolve + 33 answer
    journal = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((art / "generate").glob("*/journal.jsonl")) if (art / "generate").exists() else []
        if found:
            journal = found[0]
            if len(journal.read_bytes().split(b"\n")) > kill_after:
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"generation ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (journal.parent / "manifest.json").exists()
    partial = len(journal.read_text().splitlines())

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = journal.parent
    for name in ("alpaca.json", "heldout.json", "dropped.jsonl"):
        assert (folder / name).read_text() == (ref_folder / name).read_text(), name
    lines = [json.loads(x) for x in (folder / "journal.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["key"]) for r in lines]
    assert len(keys) == len(set(keys)) == 36 + 33  # no duplicate, none lost

    def strip(rows):
        return {(r["kind"], r["key"]): {k: v for k, v in r.items() if k != "cached"} for r in rows}

    ref_lines = [json.loads(x) for x in (ref_folder / "journal.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(ref_lines)
    sent = len(calls.read_text().splitlines())
    # both processes together asked for each request once, plus at most the batch (of 2) in flight at the kill
    assert 69 <= sent <= 69 + 6, (sent, partial)

    # a rerun of a finished generation (manifest removed, so the stage really runs again) sends nothing
    (folder / "manifest.json").unlink()
    before = len(calls.read_text().splitlines())
    monkeypatch.setenv("EVOLFAKE_CALLS_FILE", str(calls))
    run_pipeline(compose(overrides, artifacts=art), tmp_path / "rerun")
    assert len(calls.read_text().splitlines()) == before
    rerun = json.loads((folder / "manifest.json").read_text())
    assert rerun["llm"] == {} and rerun["metrics"]["calls/total"] == 69


def test_heldout_seeds_are_evolved_after_the_training_range_under_their_own_purposes(compose, tmp_path):
    """generate.heldout_seeds=N: every training seed's records are trained on; the N seeds right after the training
    range are evolved the same way and are the non-members, their requests counted as heldout_* purposes."""
    import datasets

    over = FIXED + ["seeds.limit=4", "generate.heldout_seeds=2", "filters=none", "generate.episode_length=2"]
    _, m, folder, _ = _generate(compose, tmp_path, over)
    split = datasets.load_from_disk(str(folder / "dataset"))
    train_seeds, held_seeds = set(split["train"]["seed_id"]), set(split["heldout"]["seed_id"])
    assert train_seeds == {"tiny-000", "tiny-001", "tiny-002", "tiny-003"} - {
        r["seed_id"] for r in map(json.loads, (folder / "dropped.jsonl").read_text().splitlines())}
    assert held_seeds == {"tiny-004", "tiny-005"} and m["heldout_seeds"] == 2
    assert m["calls/expert/evolve"] == 4 * 2 and m["calls/expert/heldout_evolve"] == 2 * 2
    assert m["calls/expert/heldout_answer"] == len(split["heldout"])


def test_heldout_seeds_need_a_bounded_range_and_exclude_a_holdout_fraction(compose, tmp_path):
    from teams_rl.errors import TeamsRLError
    from teams_rl.stages import load_stage

    validate = load_stage("generate").validate
    with pytest.raises(TeamsRLError, match="bounded training range"):
        validate(compose(["generate.heldout_seeds=2", "seeds.limit=null"]))
    with pytest.raises(TeamsRLError, match="set one of them"):
        validate(compose(["generate.heldout_seeds=2", "privacy.holdout_fraction=0.2"]))
    from teams_rl.evol.seeds import load_seeds

    shipped = len(load_seeds({"kind": "tiny", "start": 0, "stop": None, "limit": None}))
    with pytest.raises(TeamsRLError, match="only 0 seeds after"):
        validate(compose(["generate.heldout_seeds=2", f"seeds.limit={shipped}"]))
    with pytest.raises(TeamsRLError, match="only 1 seeds after"):
        validate(compose(["generate.heldout_seeds=2", f"seeds.limit={shipped - 1}"]))


@pytest.mark.slow
def test_policy_update_selects_a_kept_update_to_generate(compose, tmp_path):
    from teams_rl.evol.agents import load_agent

    over = ["rl=ppo", "policy.updates=3", "policy.steps_per_update=2", "policy.keep_updates=[1]", "generate.policy_update=1",
            "seeds.limit=3", "stages=[policy,generate]"]
    cfg, _, folder, manifest = _generate(compose, tmp_path, over)
    run_manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    policy_dir = Path(run_manifest["stages"]["policy"]["folder"])
    kept = sorted(p.name for p in (policy_dir / "checkpoints").glob("update_*"))
    assert kept == ["update_000001", "update_000003"]  # the rolling last one + the kept update 1
    assert load_agent(policy_dir / "checkpoints" / "update_000001").algorithm == "ppo"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics["policy_update"] == 1


def test_policy_update_must_be_kept_and_within_the_updates(compose):
    from teams_rl.errors import TeamsRLError
    from teams_rl.stages import load_stage

    validate = load_stage("generate").validate
    with pytest.raises(TeamsRLError, match="add it to policy.keep_updates"):
        validate(compose(["policy.updates=5", "generate.policy_update=2"]))
    with pytest.raises(TeamsRLError, match="trains 5 updates"):
        validate(compose(["policy.updates=5", "generate.policy_update=9", "policy.keep_updates=[9]"]))
    validate(compose(["policy.updates=5", "generate.policy_update=2", "policy.keep_updates=[2]"]))
    validate(compose(["policy.updates=5", "generate.policy_update=5"]))  # the final update needs no keeping
