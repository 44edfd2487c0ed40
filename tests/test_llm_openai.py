"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import pickle
import threading
import time
import uuid

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.llm.client import LLMClient
from teams_rl.llm.failures import LLMFailures
from teams_rl.llm.openai_backend import OpenAIBackend, _retry_after_s
from teams_rl.llm.types import ChatRequest
from tests.loopback_server import LoopbackServer

SECRET_ENV = "TEAMS_RL_TEST_OPENAI_KEY"


@pytest.fixture
def server():
    with LoopbackServer(hang_s=10, max_lifetime_s=120) as srv:
        yield srv


@pytest.fixture
def make_backend(server, monkeypatch):
    """Backends on the loopback server with a known key and fast backoff; closed after the test."""
    monkeypatch.setenv(SECRET_ENV, "sk-loopback-test-key")
    made = []

    def _make(**kwargs):
        options = {"model": "loopback-model", "base_url": server.base_url, "api_key_env": SECRET_ENV,
                   "max_concurrency": 8, "timeout_s": 5, "max_retries": 4, "backoff_base_s": 0.01,
                   "backoff_max_s": 0.05, "progress": False, **kwargs}
        backend = OpenAIBackend(**options)
        made.append(backend)
        return backend

    yield _make
    for backend in made:
        backend.close()


def prompts(n: int, tag: str = "q") -> list[ChatRequest]:
    return [ChatRequest.chat(f"{tag} number {i}", seed=i) for i in range(n)]


def assert_echoed(requests, answers):
    assert len(answers) == len(requests)
    for request, answer in zip(requests, answers, strict=True):
        assert answer.ok, answer.error
        assert answer.text == f"echo: {request.messages[-1][1]}"


def test_answers_usage_sampling_fields_and_auth_header(server, make_backend):
    backend = make_backend()
    requests = [ChatRequest.chat("one two three", system="be brief", temperature=0.5, top_p=0.9, max_tokens=64,
                                 seed=7),
                ChatRequest.chat("only the prompt")]
    answers = backend.complete(requests)
    assert_echoed(requests, answers)
    assert (answers[0].prompt_tokens, answers[0].completion_tokens) == (5, 4)  # server usage: words
    assert answers[0].finish_reason == "stop" and answers[0].latency_s > 0
    bodies = {r.body["messages"][-1]["content"]: r.body for r in server.records}
    full = bodies["one two three"]
    assert full["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    assert (full["temperature"], full["top_p"], full["max_tokens"], full["seed"]) == (0.5, 0.9, 64, 7)
    assert full["model"] == "loopback-model"
    bare = bodies["only the prompt"]
    assert not {"temperature", "top_p", "max_tokens", "seed"} & set(bare)  # unset fields are not sent
    assert {r.headers["Authorization"] for r in server.records} == {"Bearer sk-loopback-test-key"}
    assert backend.stats.attempts == 2 and backend.stats.retries == 0


def test_usage_missing_falls_back_to_an_estimate(server, make_backend):
    server.omit_usage = True
    answer = make_backend().complete([ChatRequest.chat("x" * 40)])[0]
    assert answer.ok
    assert answer.prompt_tokens == 10 + 4  # 40 characters ~ 10 tokens, plus per-message overhead
    assert answer.completion_tokens == (len("echo: " + "x" * 40) + 3) // 4


def test_retry_after_seconds_on_429_is_honoured(server, make_backend):
    server.add_fault("429", times=1, retry_after="1")
    backend = make_backend()
    requests = prompts(4)
    t0 = time.monotonic()
    answers = backend.complete(requests)
    elapsed = time.monotonic() - t0
    assert_echoed(requests, answers)
    assert elapsed >= 1.0
    assert backend.stats.retries == 4 and backend.stats.reasons == {"rate_limit": 4}
    assert backend.stats.retry_wait_s == pytest.approx(4 * 1.0)  # each retry waited what Retry-After said
    for request in requests:
        first, second = [r for r in server.records if r.last_user_message == request.messages[-1][1]]
        assert (first.fault, second.fault) == ("429", None)
        assert second.started - first.finished >= 0.95  # the server's Retry-After, measured server-side


def test_retry_after_http_date_is_honoured(server, make_backend):
    server.add_fault("429", times=1, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    backend = make_backend()
    t0 = time.monotonic()
    answers = backend.complete(prompts(2))
    assert all(a.ok for a in answers)
    assert time.monotonic() - t0 >= 0.9  # the date has 1 s resolution: between 1 and 2 s from now
    assert backend.stats.retries == 2


def test_a_429_pauses_every_request_of_the_backend(server, make_backend):
    server.add_fault("429", times=1, match="limited", retry_after="1")
    backend = make_backend()
    first = threading.Thread(target=backend.complete, args=([ChatRequest.chat("limited")],))
    first.start()
    deadline = time.monotonic() + 10
    while backend.stats.retries < 1 and time.monotonic() < deadline:  # until the client has seen the 429
        time.sleep(0.005)
    assert backend.complete([ChatRequest.chat("later")])[0].ok  # from another thread, after the 429
    first.join()
    limited = next(r for r in server.records if r.fault == "429")
    later = next(r for r in server.records if r.last_user_message == "later")
    assert later.started - limited.finished >= 0.95


def test_a_request_backing_off_frees_its_slot(server, make_backend):
    server.add_fault("503", times=1, match="slow", retry_after="1")  # a 503 pauses only its own request
    backend = make_backend(max_concurrency=1)
    answers = backend.complete([ChatRequest.chat("slow"), ChatRequest.chat("quick")])
    assert all(a.ok for a in answers)
    order = [(r.last_user_message, r.fault) for r in server.records]
    assert order == [("slow", "503"), ("quick", None), ("slow", None)]
    assert answers[0].latency_s >= 1.0 > answers[1].latency_s


def test_request_starts_are_paced(server, make_backend):
    backend = make_backend(max_concurrency=10, max_requests_per_s=50)
    assert all(a.ok for a in backend.complete(prompts(10)))
    starts = sorted(r.started for r in server.records)
    assert starts[-1] - starts[0] >= 0.15  # 9 slots of 20 ms, minus scheduling jitter
    assert server.max_in_flight < 10  # paced, so the 10 slots were never all in use at once


def test_retry_after_parsing():
    assert _retry_after_s({"retry-after": "3"}) == 3.0
    assert _retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= _retry_after_s({"retry-after": future}) <= 30
    assert _retry_after_s({"retry-after": email.utils.formatdate(time.time() - 30, usegmt=True)}) == 0.0
    assert _retry_after_s({"retry-after": "soon"}) is None
    assert _retry_after_s({}) is None


@pytest.mark.parametrize(("kind", "reason"), [("500", "http_500"), ("503", "http_503"), ("malformed", "malformed"),
                                              ("no_choices", "malformed"), ("drop", "connection")])
def test_retries_recover_from_transient_faults(server, make_backend, kind, reason):
    server.add_fault(kind, times=2)
    backend = make_backend()
    requests = prompts(5, tag=kind)
    answers = backend.complete(requests)
    assert_echoed(requests, answers)
    assert backend.stats.retries == 10 and backend.stats.failures == 0
    assert backend.stats.reasons == {reason: 10}
    assert len(server.records) == 15


def test_retry_after_a_timeout(server, make_backend):
    server.add_fault("hang", times=1)
    backend = make_backend(timeout_s=0.5)
    requests = prompts(3)
    t0 = time.monotonic()
    answers = backend.complete(requests)
    assert_echoed(requests, answers)
    assert time.monotonic() - t0 >= 0.5
    assert backend.stats.reasons == {"timeout": 3} and backend.stats.retries == 3
    assert backend.stats.attempts == 6  # one timed-out attempt and one answered attempt per request


def test_persistent_failures_are_counted_and_nothing_is_lost(server, make_backend):
    server.add_fault("500", times=None, match="BROKEN")
    server.add_fault("400", times=None, match="REJECT")
    backend = make_backend(max_retries=2)
    client = LLMClient("expert", backend)
    # the broken requests go first: the server keeps answering the others after their first failure, so they
    # are requests it rejects, not an outage, and give up after max_retries
    texts = [f"BROKEN {i}" if i < 4 else f"fine {i}" for i in range(20)]
    texts[7] = "REJECT 7"
    answers = client.complete([ChatRequest.chat(t, purpose="answer") for t in texts])
    assert len(answers) == 20
    for text, answer in zip(texts, answers, strict=True):
        if text.startswith("fine"):
            assert answer.ok and answer.text == f"echo: {text}"
        else:
            assert not answer.ok and answer.text == ""
    broken = [a for t, a in zip(texts, answers, strict=True) if t.startswith("BROKEN")]
    assert all("failed after 3 attempt(s): http_500" in a.error for a in broken)
    assert answers[7].error.startswith("failed after 1 attempt(s): http_400")  # a client error is not retried
    total = client.account.summary()
    assert (total["queries"], total["failures"]) == (20, 5)
    assert backend.stats.failures == 5 and backend.stats.retries == 4 * 2
    assert sum(1 for r in server.records if r.last_user_message == "REJECT 7") == 1


def test_concurrency_never_exceeds_the_limit(server, make_backend):
    server.latency_s = 0.05
    backend = make_backend(max_concurrency=4)
    requests = prompts(40)
    t0 = time.monotonic()
    answers = backend.complete(requests)
    assert_echoed(requests, answers)
    assert server.max_in_flight == 4
    assert time.monotonic() - t0 >= 10 * 0.05  # 40 requests, 4 at a time, 50 ms each


def test_concurrency_limit_holds_across_calling_threads(server, make_backend):
    server.latency_s = 0.05
    backend = make_backend(max_concurrency=3)
    results = {}

    def call(tag):
        results[tag] = backend.complete(prompts(9, tag=tag))

    threads = [threading.Thread(target=call, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.max_in_flight == 3
    for tag, answers in results.items():
        assert_echoed(prompts(9, tag=tag), answers)


def test_works_from_a_thread_with_a_running_event_loop(server, make_backend):
    backend = make_backend()

    async def inside_a_loop():
        asyncio.get_running_loop()
        return backend.complete(prompts(3))

    assert_echoed(prompts(3), asyncio.run(inside_a_loop()))


def test_one_loop_per_lifetime_close_and_reuse(server, make_backend):
    backend = make_backend()
    backend.complete(prompts(2))
    runner = backend._runner
    backend.complete(prompts(2))
    assert backend._runner is runner and runner.thread.is_alive()
    backend.close()
    assert not runner.thread.is_alive() and backend._runner is None
    backend.close()  # idempotent
    assert_echoed(prompts(2), backend.complete(prompts(2)))  # starts again


def test_missing_key_for_openai_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(TeamsRLError) as info:
        OpenAIBackend("gpt-4-1106-preview")
    assert str(info.value) == ("environment variable OPENAI_API_KEY is not set "
                               "(needed by role model gpt-4-1106-preview)")


def test_missing_key_through_the_pipeline(monkeypatch, compose, tmp_path):
    from teams_rl.pipeline import run_pipeline

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = compose(["stages=[llm_check]", "expert=openai_gpt4", "llm_check.roles=[expert]"])
    with pytest.raises(TeamsRLError, match=r"^environment variable OPENAI_API_KEY is not set \(needed by role "
                                           r"model gpt-4-1106-preview\)$"):
        run_pipeline(cfg, run_dir=tmp_path / "run")


def test_local_server_without_a_key_sends_empty(server, make_backend, monkeypatch):
    monkeypatch.delenv("TEAMS_RL_UNSET_KEY", raising=False)
    backend = make_backend(api_key_env="TEAMS_RL_UNSET_KEY")
    assert backend.complete(prompts(1))[0].ok
    assert server.records[0].headers["Authorization"] == "Bearer EMPTY"


def test_key_is_not_in_repr_pickle_or_error_messages(server, make_backend, caplog):
    server.add_fault("401", times=None)
    backend = make_backend()
    key = "sk-loopback-test-key"
    with caplog.at_level(logging.DEBUG):
        answer = backend.complete(prompts(1))[0]
    assert answer.error.startswith("failed after 1 attempt(s): http_401")
    assert "Incorrect API key provided: ***" in answer.error and key not in answer.error
    assert key not in caplog.text and "http_401" in caplog.text
    assert key not in repr(backend) and key not in str(vars(backend))
    data = pickle.dumps(backend)
    assert key.encode() not in data
    clone = pickle.loads(data)  # reads the variable again
    server.reset()
    assert clone.complete(prompts(1))[0].ok
    assert server.records[0].headers["Authorization"] == f"Bearer {key}"
    clone.close()


def test_key_never_reaches_the_run_dir_or_artifacts(server, compose, tmp_path, monkeypatch, capsys, caplog):
    from teams_rl.pipeline import run_pipeline

    secret = f"sk-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_ENV, secret)
    server.add_fault("401", times=None, model="denied-model")  # its error message quotes the key
    overrides = ["stages=[llm_check]", "llm_check.requests_per_role=3"]
    for role, model in (("instructor", "loopback-a"), ("reviewer", "denied-model"), ("expert", "loopback-b")):
        overrides += [f"{role}=vllm_server", f"{role}.backend.base_url={server.base_url}",
                      f"{role}.backend.api_key_env={SECRET_ENV}", f"{role}.backend.model={model}",
                      f"{role}.backend.max_retries=1"]
    artifacts = tmp_path / "artifacts"
    cfg = compose(overrides, artifacts=artifacts)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMFailures) as err:
        run_pipeline(cfg, run_dir=run_dir)
    # the unreachable role stops the check with one line (exit code 4) naming it, and nothing is committed
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    assert "reviewer (denied-model at" in str(err.value) and "answered 0 of 3" in str(err.value)
    assert secret not in str(err.value)
    assert {r.headers["Authorization"] for r in server.records} == {f"Bearer {secret}"}  # the key was used
    files = [p for root in (run_dir, artifacts) for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.resolved.yaml", "run_manifest.json", "llm_check.md", "llm_cache.sqlite"} <= names
    assert "manifest.json" not in names
    report = next(p for p in files if p.name == "llm_check.md").read_text()
    assert "Incorrect API key provided: ***" in report  # the error was written, without the key
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    out = capsys.readouterr()
    assert secret not in out.out + out.err and secret not in caplog.text
