"""The local transformers backend: batching, seeded sampling, token accounting, failures, SmolLM2."""

from __future__ import annotations

import os

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.client import LLMClient
from teams_rl.llm.hf_backend import HFBackend, split_generation
from teams_rl.llm.types import ChatRequest

PROMPTS = [
    "Hi",
    "Rewrite this instruction so that it needs two more reasoning steps: sort a list of numbers.",
    "What is two plus two?",
    "x",
    "Explain, in detail and with one worked example, why the sky looks blue during the day but red at sunset.",
    "Name a colour.",
]


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    b = HFBackend(tiny_llama_dir, batch_size=4, show_progress=False)
    yield b
    b.close()


def _requests(**kwargs):
    return [ChatRequest.chat(p, system="Be brief." if i % 2 else None, **kwargs) for i, p in enumerate(PROMPTS)]


def _with_batch_size(backend, size, requests):
    old, backend.batch_size = backend.batch_size, size
    try:
        return backend.complete(requests)
    finally:
        backend.batch_size = old


def test_greedy_batched_equals_unbatched(backend):
    requests = _requests(max_tokens=10, temperature=0.0)
    batched = _with_batch_size(backend, 4, requests)
    single = _with_batch_size(backend, 1, requests)
    assert len({len(r.message_dicts()[-1]["content"]) for r in requests}) == len(requests)  # mixed lengths
    assert all(a.ok and a.text for a in batched)
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.completion_tokens for a in batched] == [a.completion_tokens for a in single]
    assert len({a.text for a in batched}) > 1  # the answers depend on the prompt


def test_sampling_is_reproducible_per_seed(backend):
    first = backend.complete(_requests(max_tokens=12, temperature=1.0, top_p=0.95, seed=7))
    again = _with_batch_size(backend, 1, _requests(max_tokens=12, temperature=1.0, top_p=0.95, seed=7))
    other = backend.complete(_requests(max_tokens=12, temperature=1.0, top_p=0.95, seed=8))
    greedy = backend.complete(_requests(max_tokens=12, temperature=0.0))
    assert [a.text for a in first] == [a.text for a in again]  # same seed, any batch size
    assert all(a.text != b.text for a, b in zip(first, other, strict=True))
    assert all(a.text != b.text for a, b in zip(first, greedy, strict=True))


def test_token_counts_and_max_tokens(backend):
    requests = [ChatRequest.chat(p, max_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, [1, 3, 7, 12, 5, 2], strict=True)]
    answers = backend.complete(requests)
    tok = backend.tokenizer
    for request, answer in zip(requests, answers, strict=True):
        expected_prompt = tok.apply_chat_template(request.message_dicts(), add_generation_prompt=True, tokenize=False)
        assert answer.prompt_tokens == len(tok(expected_prompt, add_special_tokens=False)["input_ids"])
        assert answer.completion_tokens == request.max_tokens
        assert answer.finish_reason == "length"
        assert answer.latency_s > 0
    longer = backend.complete([ChatRequest.chat(PROMPTS[0], max_tokens=12, temperature=0.0)])[0]
    assert longer.text.startswith(answers[0].text)  # greedy: a shorter limit is a prefix of a longer one


def test_stops_at_eos_and_chat_end(tiny_llama_dir):
    b = HFBackend(tiny_llama_dir, show_progress=False)
    b.complete([ChatRequest.chat("warm up", max_tokens=1)])
    tok = b.tokenizer
    assert b._stop_ids == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    b.model.lm_head.weight.data.zero_()  # all logits equal: greedy picks token 0, which is EOS
    assert tok.eos_token_id == 0
    answer = b.complete([ChatRequest.chat("Hi", max_tokens=8, temperature=0.0)])[0]
    # it stopped at the first token, EOS: an empty answer is no result (greedy, so it is not sampled again)
    assert (answer.ok, answer.error_kind, answer.completion_tokens) == (False, "empty", 1)
    assert "answered nothing (1 token(s), stop)" in answer.error
    b.close()
    assert b.model is None


def test_generate_kwargs_apply_and_key_the_cache(tiny_llama_dir):
    b = HFBackend(tiny_llama_dir, generate_kwargs={"min_new_tokens": 3}, show_progress=False)
    assert b.model_id == f"hf/{tiny_llama_dir}?min_new_tokens=3"
    b.complete([ChatRequest.chat("warm up", max_tokens=1)])  # min_new_tokens is capped at max_tokens
    b.model.lm_head.weight.data.zero_()  # EOS (token 0) wins as soon as it is allowed
    answer = b.complete([ChatRequest.chat("Hi", max_tokens=8, temperature=0.0)])[0]
    assert answer.completion_tokens == 4 and "(4 token(s), stop)" in answer.error  # EOS only after 3 tokens
    b.close()


def test_split_generation():
    assert split_generation([5, 6, 2, 7], {2}, 10) == ([5, 6], 3, "stop")
    assert split_generation([5, 6, 7, 8], {2}, 3) == ([5, 6, 7], 3, "length")
    assert split_generation([5, 6, 7, 2], {2}, 3) == ([5, 6, 7], 3, "length")  # stop beyond the limit
    assert split_generation([3, 1, 1], {2, 3}, 3) == ([], 1, "stop")


def test_client_cache_makes_second_call_free(backend, tmp_path, monkeypatch):
    cache = RequestCache(tmp_path / "cache.sqlite")
    client = LLMClient("instructor", backend, sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 6, "seed": 1},
                       cache=cache)
    requests = [ChatRequest.chat(p) for p in PROMPTS[:3]]
    first = client.complete(requests)
    calls = []
    original = backend.complete
    monkeypatch.setattr(backend, "complete", lambda reqs: calls.append(reqs) or original(reqs))
    second = client.complete(requests)
    cache.close()
    assert calls == []
    assert [a.text for a in second] == [a.text for a in first] and all(a.cached for a in second)
    total = client.account.summary()
    assert (total["queries"], total["cache_hits"], total["completion_tokens"]) == (3, 3, 18)


def test_failures_come_back_per_request(tiny_llama_dir, monkeypatch):
    import torch

    b = HFBackend(tiny_llama_dir, batch_size=4, max_input_tokens=60, show_progress=False)
    original = b._generate
    seen = []

    def flaky(rows):
        seen.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(r.index == 3 for r in rows):
            raise RuntimeError("boom")
        return original(rows)

    monkeypatch.setattr(b, "_generate", flaky)
    requests = _requests(max_tokens=4, temperature=0.0) + [ChatRequest.chat("word " * 100, max_tokens=4)]
    answers = b.complete(requests)
    assert b.batch_size == 2  # an OOM halves the batch size for the rest of the run
    assert seen[0] == 4 and max(seen[1:]) <= 2
    assert answers[3].error == "RuntimeError: boom" and answers[3].text == ""
    assert "max_input_tokens" in answers[6].error and answers[6].prompt_tokens > 60  # never sent
    assert all(answers[i].ok and answers[i].completion_tokens == 4 for i in (0, 1, 2, 4, 5))


def test_bad_model_path_fails_at_construction(tmp_path):
    with pytest.raises(TeamsRLError, match="does not exist"):
        HFBackend(str(tmp_path / "missing"))
    with pytest.raises(TeamsRLError, match="GGUF file"):
        HFBackend(str(tmp_path / "missing.gguf"))
    with pytest.raises(TeamsRLError, match="HF_HUB_OFFLINE=1"):  # conftest runs offline
        HFBackend("teams-rl-tests/not-a-cached-model")


def test_dtype_auto_takes_the_fast_one_and_names_it_in_the_model_id(tiny_llama_dir, monkeypatch):
    from teams_rl import fast_dtype

    for fast in ("float32", "bfloat16"):
        monkeypatch.setattr(fast_dtype, "cpu_choice", lambda cache_dir=None, fast=fast: {"dtype": fast})
        b = HFBackend(tiny_llama_dir, dtype="auto", device="cpu", show_progress=False)
        assert (b.device_used, b.dtype_used) == ("cpu", fast)
        assert b.model_id == f"hf/{tiny_llama_dir}" + ("?dtype=bfloat16" if fast == "bfloat16" else "")
    explicit = HFBackend(tiny_llama_dir, dtype="bfloat16", device="cpu", show_progress=False)
    assert explicit.dtype_used == "bfloat16"  # an explicit dtype is used as given
    answer = explicit.complete([ChatRequest.chat("Hi", max_tokens=3, temperature=0.0)])[0]
    assert answer.ok and str(next(explicit.model.parameters()).dtype) == "torch.bfloat16"
    with pytest.raises(TeamsRLError, match="backend.dtype must be one of auto, float32, bfloat16, float16"):
        HFBackend(tiny_llama_dir, dtype="fp32")


@pytest.mark.slow
def test_smollm2_answers_coherently():
    from teams_rl.models import smollm2_gguf_path

    b = HFBackend("smollm2", batch_size=2, show_progress=False)
    capital, rewrite = b.complete([
        ChatRequest.chat("What is the capital of France?", max_tokens=16, temperature=0.0),
        ChatRequest.chat("Rewrite the following instruction to make it more specific. "
                         "Instruction: Write a poem.", max_tokens=16, temperature=0.7, top_p=0.95, seed=0),
    ])
    b.close()
    assert "Paris" in capital.text and capital.finish_reason == "stop"
    assert rewrite.ok and len(rewrite.text.split()) >= 5
    # the GGUF file itself loads through the same backend and gives the same greedy answer
    gguf = HFBackend(str(smollm2_gguf_path()), show_progress=False)
    same = gguf.complete([ChatRequest.chat("What is the capital of France?", max_tokens=16, temperature=0.0)])[0]
    gguf.close()
    assert same.text == capital.text


def test_a_batch_prefix_shared_by_every_row_is_prefilled_once_with_the_same_answers(tiny_llama_dir):
    """Rows that start alike (a chat system prompt, a template's first words) but differ in length: the shared
    tokens are prefilled once, the tails after padding; the answers equal the plain left-padded batch's."""
    head = "Here is a task: "
    prompts = [f"{head}{topic}" for topic in ("cats", "the tax code of a small country", "volcanoes", "jazz", "rain")]
    requests = [ChatRequest.chat(p, max_tokens=6, temperature=t, seed=i)
                for i, p in enumerate(prompts) for t in (0.0, 0.8)]
    plain = HFBackend(tiny_llama_dir, show_progress=False, shared_prefix=False, batch_size=4)
    shared = HFBackend(tiny_llama_dir, show_progress=False, batch_size=4)  # on by default
    expected = [a.text for a in plain.complete(requests)]
    assert [a.text for a in shared.complete(requests)] == expected
    assert plain.shared_prefill_saved == 0
    ids = [shared._prompt_ids(r) for r in requests]
    head_tokens = min(len(os.path.commonprefix([a, b])) for a in ids for b in ids)
    # batches of 4, 4 and 2 rows: each prefills the shared tokens once instead of once per row
    assert head_tokens >= 8 and shared.shared_prefill_saved >= head_tokens * (3 + 3 + 1)


def test_prefix_reuse_gives_the_same_answers_and_skips_the_shared_prefill(tiny_llama_dir):
    """Operator prompts share a long template: with the prefix cache the template is prefilled once and reused
    across batches, and every answer (greedy and seeded sampling) equals the plain batched prefill's."""
    template = "You are a careful prompt rewriter. " * 12  # a long shared prefix, like an operator template
    prompts = [f"{template}Rewrite: {topic}" for topic in ("cats", "the tax code", "volcanoes", "jazz", "rain")]
    requests = [ChatRequest.chat(p, max_tokens=6, temperature=t, seed=i)
                for i, p in enumerate(prompts) for t in (0.0, 0.8)]
    plain = HFBackend(tiny_llama_dir, show_progress=False, prefix_cache=0, batch_size=4)
    reused = HFBackend(tiny_llama_dir, show_progress=False, prefix_cache=4, batch_size=4)
    expected = [a.text for a in plain.complete(requests)]
    assert [a.text for a in reused.complete(requests)] == expected
    assert reused.prefix.built >= 1 and reused.prefix.hits >= len(requests) - reused.prefix.built
    again = reused.complete(requests)  # another call: every prefix comes from the cache
    assert [a.text for a in again] == expected and reused.prefix.prefill_tokens_saved > 0


def test_length_chunks_cut_a_batch_where_padding_costs_more_than_a_chunk():
    from teams_rl.llm.chunks import length_chunks

    one_long = [80] * 95 + [136]
    # a 136-token row pads 95 others by 56 tokens (5,320) against one more chunk's 12 steps x 40 (480)
    assert length_chunks(one_long, [12] * 96, 96, 40.0) == [(0, 95), (95, 96)]
    assert length_chunks(one_long, [12] * 96, 96, None) == [(0, 96)]             # plain batching
    assert len(length_chunks([80] * 200, [12] * 200, 96, 40.0)) == 3               # equal rows: fewest chunks
    assert length_chunks([80, 81, 82, 83], [12] * 4, 96, 40.0) == [(0, 4)]       # a few tokens: not worth a cut
    assert length_chunks([10, 200], [32, 32], 96, 10_000.0) == [(0, 2)]          # a dear step: never cut
    assert length_chunks([], [], 8, 40.0) == []
    for lengths in ([5, 9, 30, 31, 90, 91, 92, 300], list(range(1, 50))):
        chunks = length_chunks(lengths, [8] * len(lengths), 4, 20.0)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a < b <= a + 4 for a, b in chunks) and all(x[1] == y[0] for x, y in zip(chunks[:-1], chunks[1:], strict=True))


def test_length_aware_chunks_give_the_same_answers_as_plain_batches(tiny_llama_dir):
    """Cutting a batch by prompt length changes which rows share a `generate` call, not what a row gets:
    greedy and seeded answers equal those of plain batches."""
    requests = _requests(max_tokens=8, temperature=0.0) + _requests(max_tokens=8, temperature=0.9, seed=3)
    plain = HFBackend(tiny_llama_dir, show_progress=False, batch_size=12)
    cut = HFBackend(tiny_llama_dir, show_progress=False, batch_size=12, chunk_step_tokens=1.0)
    assert [a.text for a in cut.complete(requests)] == [a.text for a in plain.complete(requests)]
    assert plain.chunks_run == 1 and cut.chunks_run > 1
    with pytest.raises(TeamsRLError, match="chunk_step_tokens"):
        HFBackend(tiny_llama_dir, chunk_step_tokens=-1)
