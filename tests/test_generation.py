"""The generation engine on its own (no stage, no pipeline): a fixed or random agent, the rule-based expert of
tests/generate_fakes.py behind a real LLMClient, and a journal in a temp folder. Each test takes milliseconds."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from teams_rl.evol.agents import Agent
from teams_rl.evol.filters import FilterSettings
from teams_rl.evol.generation import GenerationSettings, Generator, build_rules, split_holdout
from teams_rl.evol.journal import Journal
from teams_rl.evol.operators import load_operator_set
from teams_rl.evol.seeds import Seed
from teams_rl.llm.client import LLMClient
from tests.conftest import CONF_DIR
from tests.generate_fakes import EvolFake

OPS = ["breadth", "add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input"]
SEEDS = [Seed("s1", "Explain how vaccines train the immune system."),
         Seed("s2", "Write a short poem about the sea.", input="Use four lines."),
         Seed("s3", "Compute the Fibonacci numbers below 100.")]  # "Fibonacci": the fake's rewrites fail


def opset():
    library = OmegaConf.load(CONF_DIR / "operators" / "library.yaml")  # its templates interpolate operators.frames
    cfg = OmegaConf.create({"operators": OmegaConf.merge(library, {"name": "teams_rl", "ops": OPS})})
    return load_operator_set(cfg.operators)


def fixed_agent(schedule=(1, 2, 3)):
    return Agent({"algorithm": "fixed", "operators": OPS, "episode_length": len(schedule), "schedule": list(schedule)})


def generator(tmp_path, *, mode="teams_rl", steps=3, rules=None, agent=None, judge=False, expert=None, **gen):
    cfg = OmegaConf.create({"mode": mode, "episode_length": steps, "deterministic": True, "merge_input": True,
                            "rules": rules or {}, "evolve": {"max_tokens": 32}, "answer": {"max_tokens": 32}, **gen})
    ops = opset()
    expert = expert or LLMClient("expert", EvolFake(model="expert"))
    reviewer = LLMClient("reviewer", EvolFake(model="reviewer"))
    filters = FilterSettings.from_cfg({"elimination": {"no_info_gain": judge}})
    tmp_path.mkdir(parents=True, exist_ok=True)
    journal = Journal(tmp_path / "journal.jsonl")
    return Generator(GenerationSettings.from_config(cfg), build_rules(cfg, ops), filters, agent or fixed_agent(),
                     ops, SEEDS, journal, expert, lambda: reviewer), expert, reviewer


def test_chains_follow_the_schedule_with_lineage_and_count_calls(tmp_path):
    gen, expert, _ = generator(tmp_path)
    gen.run(progress=False)
    records = {r["id"]: r for r in gen.records()}
    assert list(records) == [f"{s.id}/{t}" for s in SEEDS for t in (1, 2, 3)]
    assert [records[f"s1/{t}"]["operator"] for t in (1, 2, 3)] == ["add_constraints", "deepening", "concretizing"]
    assert records["s1/1"]["parent_id"] == "s1" and records["s1/2"]["parent_id"] == "s1/1"
    assert records["s1/2"]["parent_instruction"] == records["s1/1"]["instruction"]
    assert records["s2/1"]["parent_instruction"] == "Write a short poem about the sea.\nUse four lines."
    # the Fibonacci seed's rewrites fail: no answer is asked for, the chain stays at the seed
    assert all(records[f"s3/{t}"].get("drop_reason") == "evolution_failed" for t in (1, 2, 3))
    assert {records[f"s3/{t}"]["parent_id"] for t in (1, 2, 3)} == {"s3"}
    assert gen.calls() == {"calls/expert/evolve": 9, "sent/expert/evolve": 9, "calls/expert/answer": 6,
                           "sent/expert/answer": 6}
    assert expert.account.by_purpose["evolve"].queries == 9 and expert.account.by_purpose["answer"].queries == 6


def test_a_rerun_on_the_journal_sends_nothing_and_gives_the_same_records(tmp_path):
    gen, _, _ = generator(tmp_path)
    gen.run(progress=False)
    before = gen.records()
    gen.journal.close()
    again, expert, _ = generator(tmp_path)
    again.run(progress=False)
    assert again.records() == before and expert.backend.sent == 0


def test_forced_breadth_bias_and_replacement_rules(tmp_path):
    rules = {"forced_breadth_steps": [2], "op_bias": {"deepening": 5.0}, "replace_breadth_with": "concretizing"}
    gen, _, _ = generator(tmp_path, rules=rules, agent=fixed_agent((0, 1, 0)))
    gen.run(progress=False)
    ops = {r["id"]: r["operator"] for r in gen.records()}
    # step 2 forced in-breadth; elsewhere the +5 bias makes deepening win over the schedule's choice
    assert [ops[f"s1/{t}"] for t in (1, 2, 3)] == ["deepening", "breadth", "deepening"]


def test_random_agent_choices_depend_only_on_seed_and_step(tmp_path):
    agent = Agent({"algorithm": "random", "operators": OPS, "episode_length": 3})
    first, _, _ = generator(tmp_path / "a", agent=agent)
    first.run(progress=False)
    # the same seeds in another order and on the other schedule choose the same operators
    second, _, _ = generator(tmp_path / "b", agent=agent, schedule="barrier")
    second.seeds = list(reversed(SEEDS))
    second.run(progress=False)
    ops = lambda g: {r["id"]: r["operator"] for r in g.records()}  # noqa: E731
    assert ops(first) == ops(second)


def test_wizardlm_mode_judges_every_answered_evolution_and_retries_from_the_parent(tmp_path):
    gen, _, reviewer = generator(tmp_path, mode="wizardlm", steps=4, judge=True, agent=fixed_agent((1, 2, 3, 4)))
    gen.run(progress=False)
    calls = gen.calls()
    assert calls["calls/expert/evolve"] == 12 and calls["calls/reviewer/judge"] == calls["calls/expert/answer"]
    assert reviewer.account.by_purpose["judge"].queries == calls["calls/reviewer/judge"]
    records = {r["id"]: r for r in gen.records()}
    assert records["s2/1"]["drop_reason"] == "rule2_sorry_short_answer"  # the fake apologises for poems
    assert records["s2/2"]["parent_id"] == "s2"  # the failed round is retried from its parent


def test_split_holdout_keeps_chains_together():
    records = [{"id": f"{s}/{t}", "seed_id": s} for s in "abcdefghij" for t in (1, 2, 3)]
    train, held = split_holdout(records, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert {r["seed_id"] for r in train}.isdisjoint(r["seed_id"] for r in held)
    assert split_holdout(records, 0.2, seed=0) == (train, held)
    assert split_holdout(records, 0.0, seed=0) == (records, [])


def test_operator_set_mismatch_is_one_line(tmp_path):
    from teams_rl.errors import TeamsRLError

    with pytest.raises(TeamsRLError, match="trained on operators") as err:
        generator(tmp_path, agent=Agent({"algorithm": "random", "operators": OPS[:4], "episode_length": 3}))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ schedules

def _records(tmp_path, **kwargs):
    gen, expert, _ = generator(tmp_path, **kwargs)
    gen.run(progress=False)
    return gen.records(), expert


@pytest.mark.parametrize("mode, judge", [("teams_rl", False), ("teams_rl", True), ("wizardlm", True)])
def test_stream_and_barrier_schedules_give_the_same_records(tmp_path, mode, judge):
    steps = 4 if mode == "wizardlm" else 3
    agent = Agent({"algorithm": "random", "operators": OPS, "episode_length": steps})
    stream, s_expert = _records(tmp_path / "stream", mode=mode, steps=steps, judge=judge, agent=agent)
    barrier, b_expert = _records(tmp_path / "barrier", mode=mode, steps=steps, judge=judge, agent=agent,
                                 schedule="barrier")
    assert stream == barrier
    assert s_expert.account.total.queries == b_expert.account.total.queries  # the same requests, once each


@pytest.mark.parametrize("mode", ["teams_rl", "wizardlm"])
def test_records_do_not_depend_on_which_request_returns_first(tmp_path, monkeypatch, mode):
    """The same generation against a real server whose latencies are shuffled (another seed of a lognormal):
    completions arrive in another order, the records are the same; and the barrier schedule agrees."""
    from teams_rl.llm.openai_backend import OpenAIBackend
    from tests.loopback_server import LoopbackServer, lognormal_latency

    monkeypatch.delenv("TEAMS_RL_NO_KEY", raising=False)
    agent = Agent({"algorithm": "random", "operators": OPS, "episode_length": 3})
    results, orders = [], []
    for latency_seed, schedule in ((1, "stream"), (2, "stream"), (1, "barrier")):
        with LoopbackServer(responder="evol", latency=lognormal_latency(0.01, 1.0, latency_seed)) as server:
            backend = OpenAIBackend("loopback-model", base_url=server.base_url, api_key_env="TEAMS_RL_NO_KEY",
                                    max_concurrency=8, progress=False)
            try:
                expert = LLMClient("expert", backend)
                records, _ = _records(tmp_path / f"{schedule}{latency_seed}", mode=mode, judge=mode == "wizardlm",
                                      agent=agent, expert=expert, schedule=schedule, steps=3)
            finally:
                backend.close()
            finished = sorted(server.records, key=lambda r: r.finished)
            orders.append([r.last_user_message for r in finished])
        results.append(records)
    assert results[0] == results[1] == results[2]
    assert orders[0] != orders[1]  # the completion order really differed


def test_a_failure_stops_new_requests_journals_the_rest_and_a_rerun_sends_only_what_is_missing(tmp_path):
    from teams_rl.llm.failures import LLMFailures
    from tests.generate_fakes import EvolFake

    class Broken(EvolFake):
        """Fails every answer about vaccines (a request that keeps failing after its retries)."""

        def respond(self, request):
            if request.purpose == "answer" and "vaccines" in request.messages[-1][1]:
                return None
            return super().respond(request)

    gen, expert, _ = generator(tmp_path, expert=LLMClient("expert", Broken(model="expert")))
    with pytest.raises(LLMFailures, match=r"generate: 1 of \d+ expert requests failed \(error 1; fake/expert\)"):
        gen.run(progress=False)
    gen.journal.close()
    journal = Journal(tmp_path / "journal.jsonl")
    assert journal.get("answer", "s1/1") is None  # the failure is not journaled
    assert journal.get("evolve", "s1/1") is not None and journal.get("answer", "s2/1") is not None
    journal.close()
    again, healthy, _ = generator(tmp_path)
    again.run(progress=False)
    clean, _ = _records(tmp_path / "clean")
    assert again.records() == clean
    # the rerun sent only what was missing: fewer requests than a full run
    assert 0 < healthy.backend.sent < 9 + 6


def test_paper_rules_force_in_breadth_at_steps_2_and_5_only(tmp_path):
    """The official loop is `for t in range(6)` with in-breadth forced at t == 1 and t == 4: 1-based steps 2, 5."""
    import json

    paper = OmegaConf.load(CONF_DIR / "generate" / "paper.yaml")
    agent = Agent({"algorithm": "random", "operators": OPS, "episode_length": 6})  # any policy: the rules decide
    gen, _, _ = generator(tmp_path, steps=6, rules=OmegaConf.to_container(paper.rules), agent=agent)
    gen.run(progress=False)
    evolved = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    evolved = [e for e in evolved if e["kind"] == "evolve"]
    assert len(evolved) == 6 * len(SEEDS)
    steps_in_breadth = {int(e["key"].rsplit("/", 1)[1]) for e in evolved if e["operator"] == "breadth"}
    assert steps_in_breadth == {2, 5}
    assert all(e["operator"] == "breadth" for e in evolved if e["key"].endswith(("/2", "/5")))
    # step 1 of every chain is an in-depth evolution of its seed
    assert all(e["operator"] != "breadth" for e in evolved if e["key"].endswith("/1"))
