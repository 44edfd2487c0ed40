"""The client layer around every backend: request cache, budget guard, per-purpose accounting."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from teams_rl.errors import BudgetExceeded
from teams_rl.llm.accounting import Budget, RoleAccount
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.client import LLMClient
from teams_rl.llm.types import ChatRequest
from tests.fakes import RuleBackend

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path):
    cache = RequestCache(tmp_path / "llm_cache.sqlite")
    yield cache
    cache.close()


def make_client(cache=None, backend=None, **kwargs) -> tuple[LLMClient, RuleBackend]:
    backend = backend or RuleBackend()
    return LLMClient("expert", backend, cache=cache, **kwargs), backend


def ask(text: str, **kwargs) -> ChatRequest:
    return ChatRequest.chat(text, **kwargs)


def test_a_repeated_request_is_a_free_cache_hit(cache):
    client, backend = make_client(cache)
    first = client.complete([ask("hello there", seed=1)])[0]
    second = client.complete([ask("hello there", seed=1)])[0]
    assert backend.queries == 1
    assert not first.cached and second.cached
    assert (second.text, second.prompt_tokens, second.completion_tokens) == (
        first.text, first.prompt_tokens, first.completion_tokens)
    total = client.account.summary()
    assert (total["queries"], total["cache_hits"]) == (1, 1)
    assert total["prompt_tokens"] == first.prompt_tokens  # a hit adds no tokens and no cost

    other, other_backend = make_client(cache)  # a later run sharing the cache file
    assert other.complete([ask("hello there", seed=1)])[0].cached and other_backend.queries == 0


def test_sampling_params_seed_messages_and_model_are_part_of_the_key(cache):
    client, backend = make_client(cache, sampling={"temperature": 0.7})
    base = ask("same prompt", seed=1)
    client.complete([base])
    variants = [ask("same prompt", seed=2), ask("same prompt", seed=1, temperature=0.0),
                ask("same prompt", seed=1, top_p=0.5), ask("same prompt", seed=1, max_tokens=8),
                ask("same prompt", seed=1, system="be terse"), ask("same prompt ", seed=1)]
    answers = client.complete(variants)
    assert backend.queries == 1 + len(variants) and not any(a.cached for a in answers)

    # the role default fills the unset field, so an explicit 0.7 is the same request; purpose is not in the key
    hits = client.complete([ask("same prompt", seed=1, temperature=0.7), ask("same prompt", seed=1, purpose="judge")])
    assert all(a.cached for a in hits) and backend.queries == 1 + len(variants)

    other_model, other_backend = make_client(cache, backend=RuleBackend(model="other"), sampling={"temperature": 0.7})
    assert not other_model.complete([base])[0].cached and other_backend.queries == 1


def test_identical_requests_in_one_batch_are_sent_once(cache):
    client, backend = make_client(cache)
    answers = client.complete([ask("dup"), ask("other"), ask("dup"), ask("dup")])
    assert backend.batches == [2]
    assert [a.text for a in answers] == ["Answer: dup", "Answer: other", "Answer: dup", "Answer: dup"]
    assert client.account.total.queries == 2
    assert len(cache) == 2


def test_failures_are_not_cached(cache):
    class FlakyBackend(RuleBackend):
        def complete(self, requests):
            out = super().complete(requests)
            if len(self.batches) == 1:
                out[0].text, out[0].error = "", "failed after 9 attempt(s): http_500"
            return out

    client, backend = make_client(cache, backend=FlakyBackend())
    first = client.complete([ask("a"), ask("b")])
    assert not first[0].ok and first[1].ok
    assert client.account.total.failures == 1 and len(cache) == 1
    again = client.complete([ask("a"), ask("b")])
    assert again[0].ok and not again[0].cached and again[1].cached
    assert backend.batches == [2, 1]


def test_the_cache_is_shared_safely_by_threads(cache):
    backend = RuleBackend()
    texts = [f"prompt {i}" for i in range(120)]
    errors: list[BaseException] = []

    def worker(offset: int):
        try:
            client = LLMClient("expert", backend, cache=cache, chunk_size=7)
            for start in range(0, 60, 20):  # overlapping slices; every thread writes and reads
                chunk = texts[offset + start: offset + start + 20]
                answers = client.complete([ask(t) for t in chunk])
                assert [a.text for a in answers] == [f"Answer: {t}" for t in chunk]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 20, 40, 60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(cache) == 120
    check, fresh = make_client(cache)
    assert all(a.cached for a in check.complete([ask(t) for t in texts])) and fresh.queries == 0


WORKER = """
import json, sys, time
from pathlib import Path
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.client import LLMClient
from teams_rl.llm.types import ChatRequest
from tests.fakes import RuleBackend

path, start, stop, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
client = LLMClient("expert", RuleBackend(), cache=RequestCache(path), chunk_size=5)
(gate / f"{start}.ready").touch()
deadline = time.monotonic() + 30
while len(list(gate.glob("*.ready"))) < 2 and time.monotonic() < deadline:  # start together
    time.sleep(0.005)
texts = [f"prompt {i}" for i in range(start, stop)]
answers = client.complete([ChatRequest.chat(t) for t in texts])
assert [a.text for a in answers] == [f"Answer: {t}" for t in texts]
print(json.dumps(client.account.summary()))
"""


def test_the_cache_is_shared_safely_by_two_processes(tmp_path):
    path, gate = tmp_path / "shared.sqlite", tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(a), str(b), str(gate)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a, b in ((0, 300), (150, 450))]
    summaries = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    assert all(s["failures"] == 0 for s in summaries)
    assert sum(s["queries"] + s["cache_hits"] for s in summaries) == 600
    cache = RequestCache(path)
    try:
        assert len(cache) == 450
        client, backend = make_client(cache)
        answers = client.complete([ask(f"prompt {i}") for i in range(450)])
        assert all(a.cached for a in answers) and backend.queries == 0
    finally:
        cache.close()


@pytest.mark.parametrize("chunk_size", [2, 256])
def test_budget_stops_at_exactly_max_queries_and_resumes(cache, chunk_size):
    requests = [ask(f"item {i}", purpose="evolve") for i in range(8)]
    client, backend = make_client(cache, budget=Budget("expert", max_queries=5), chunk_size=chunk_size)
    with pytest.raises(BudgetExceeded, match="5 of max_queries=5"):
        client.complete(requests)
    assert backend.queries == 5 and client.account.total.queries == 5
    assert len(cache) == 5  # everything received before the stop is kept

    rerun, rerun_backend = make_client(cache, budget=Budget("expert", max_queries=10), chunk_size=chunk_size)
    answers = rerun.complete(requests)
    assert rerun_backend.queries == 3  # only the rest is sent
    assert [a.cached for a in answers] == [True] * 5 + [False] * 3
    assert [a.text for a in answers] == [f"Answer: item {i}" for i in range(8)]
    assert (rerun.account.total.queries, rerun.account.total.cache_hits) == (3, 5)


def test_budget_stops_on_max_usd(cache):
    # every request costs exactly $0.01: 10 prompt words at $1 per 1k prompt tokens, completions free
    requests = [ask(" ".join([f"w{i}"] * 10)) for i in range(10)]
    account = RoleAccount(role="expert", model="rule/rule", prompt_usd_per_1k=1.0)
    client, backend = make_client(cache, account=account, budget=Budget("expert", max_usd=0.03), chunk_size=2)
    with pytest.raises(BudgetExceeded, match=r"max_usd=0.03"):
        client.complete(requests)
    assert backend.queries == 4  # 2 + 2 sent; the check after $0.04 stops the third chunk
    assert client.account.total.usd == pytest.approx(0.04)
    assert len(cache) == 4


def test_accounting_per_purpose_tokens_and_cost(cache):
    account = RoleAccount(role="expert", model="rule/rule", prompt_usd_per_1k=0.01, completion_usd_per_1k=0.03)
    client, _ = make_client(cache, account=account)
    evolve = [ask("rewrite this instruction please", purpose="evolve"), ask("make it harder", purpose="evolve")]
    judge = [ask("first instruction: a second instruction: b Equal or Not Equal", purpose="judge")]
    answers = client.complete(evolve + judge)
    client.complete([ask("make it harder", purpose="answer")])  # a hit, booked under its own purpose

    prompt_words = [4, 3, 10]
    completion_words = [len(a.text.split()) for a in answers]
    assert [a.prompt_tokens for a in answers] == prompt_words
    assert answers[2].text == "Not Equal"
    summary = client.account.summary()
    by = summary["by_purpose"]
    assert set(by) == {"evolve", "judge", "answer"}
    assert (by["evolve"]["queries"], by["evolve"]["prompt_tokens"]) == (2, 7)
    assert by["evolve"]["completion_tokens"] == sum(completion_words[:2])
    assert (by["judge"]["queries"], by["judge"]["prompt_tokens"], by["judge"]["completion_tokens"]) == (1, 10, 2)
    assert (by["answer"]["queries"], by["answer"]["cache_hits"], by["answer"]["prompt_tokens"]) == (0, 1, 0)
    assert (summary["queries"], summary["cache_hits"], summary["failures"]) == (3, 1, 0)
    expected_usd = (sum(prompt_words) * 0.01 + sum(completion_words) * 0.03) / 1000
    assert summary["usd"] == pytest.approx(expected_usd)
    assert summary["latency_p50_s"] == 0.0


def test_accounting_takes_tokens_from_the_server_usage(tmp_path, monkeypatch):
    from teams_rl.llm.openai_backend import OpenAIBackend
    from tests.loopback_server import LoopbackServer

    monkeypatch.delenv("TEAMS_RL_UNSET_KEY", raising=False)
    with LoopbackServer(latency_s=0.01) as server:
        backend = OpenAIBackend("loopback-model", base_url=server.base_url, api_key_env="TEAMS_RL_UNSET_KEY",
                                progress=False)
        try:
            cache = RequestCache(tmp_path / "c.sqlite")
            client = LLMClient("expert", backend, cache=cache, sampling={"max_tokens": 3})
            answers = client.complete([ask("one two three four five", purpose="answer"),
                                       ask("six seven", purpose="judge")])
            assert [a.text for a in answers] == ["echo: one two", "echo: six seven"]
            assert [a.finish_reason for a in answers] == ["length", "stop"]
            by = client.account.summary()["by_purpose"]
            assert (by["answer"]["prompt_tokens"], by["answer"]["completion_tokens"]) == (5, 3)
            assert (by["judge"]["prompt_tokens"], by["judge"]["completion_tokens"]) == (2, 3)
            assert all(lat >= 0.01 for lat in client.account.latencies)
            assert client.complete([ask("six seven")])[0].cached and len(server.records) == 2
            cache.close()
        finally:
            backend.close()
