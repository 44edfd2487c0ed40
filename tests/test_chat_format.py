"""`backend.chat_format` of the hf backend: the exact prompt a role sends in each format, the BOS token, a Jinja
template from the config, bad values, and the cache key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from teams_rl.errors import TeamsRLError
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.chat_format import VICUNA_SYSTEM
from teams_rl.llm.client import LLMClient
from teams_rl.llm.hf_backend import HFBackend
from teams_rl.llm.types import ChatRequest

JUDGE = ChatRequest.chat("Are these two instructions equal? First: sort a list. Second: sort a list of words.")
EXPERT = ChatRequest.chat("Name a colour.", system="Answer in one word.")


def sent_prompts(backend: HFBackend, requests: list[ChatRequest], role: str = "reviewer") -> list[list[int]]:
    """The token ids each request reaches the model with, sent through a role's client (sampling defaults,
    cache lookup) exactly as a stage sends it; the answers are generated for real."""
    seen = {}
    original = backend._generate

    def capture(rows):  # rows come sorted by length; `index` is the request's position
        seen.update((row.index, row.ids) for row in rows)
        return original(rows)

    backend._generate = capture
    try:
        answers = LLMClient(role, backend, sampling={"max_tokens": 2, "temperature": 0.0}).complete(requests)
    finally:
        backend._generate = original
    assert all(a.ok for a in answers)
    return [seen[i] for i in sorted(seen)]


@pytest.fixture(scope="module")
def backends(tiny_llama_dir):
    made = {}

    def get(chat_format):
        if chat_format not in made:
            made[chat_format] = HFBackend(tiny_llama_dir, chat_format=chat_format, show_progress=False, prefix_cache=0)
        return made[chat_format]

    yield get
    for b in made.values():
        b.close()


def test_vicuna_prompt_is_the_system_line_then_user_and_assistant_with_bos(backends):
    b = backends("vicuna_v1.1")
    judge, expert = sent_prompts(b, [JUDGE, EXPERT])
    tok = b.tokenizer
    expected_judge = (f"{VICUNA_SYSTEM} USER: Are these two instructions equal? First: sort a list. "
                      "Second: sort a list of words. ASSISTANT:")
    expected_expert = "Answer in one word. USER: Name a colour. ASSISTANT:"  # its own system line replaces the default
    assert judge[0] == tok.bos_token_id and judge[1] != tok.bos_token_id
    assert judge == [tok.bos_token_id, *tok(expected_judge, add_special_tokens=False)["input_ids"]]
    assert tok.decode(judge[1:]) == expected_judge
    assert expert == [tok.bos_token_id, *tok(expected_expert, add_special_tokens=False)["input_ids"]]
    turns = ChatRequest(messages=(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert b._prompt_ids(turns) == tok(tok.bos_token + f"{VICUNA_SYSTEM} USER: a ASSISTANT: b{tok.eos_token}USER: c "
                                       "ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert b.model_id.endswith("?chat_format=vicuna_v1.1") and "(local transformers" in b.describe()


def test_plain_and_tokenizer_formats(backends):
    plain = backends("plain")
    (ids,) = sent_prompts(plain, [EXPERT])
    tok = plain.tokenizer
    assert ids == [tok.bos_token_id, *tok("Answer in one word.\n\nName a colour.\n\n", add_special_tokens=False)["input_ids"]]
    for name in ("tokenizer", "auto"):  # the tokenizer's own template, which brings its own special tokens
        (own,) = sent_prompts(backends(name), [EXPERT])
        text = "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n" \
               "<|im_start|>assistant\n"
        assert own == tok(text, add_special_tokens=False)["input_ids"] and own[0] != tok.bos_token_id
        assert backends(name).model_id == f"hf/{backends(name).model_name}"  # the default: no suffix


def test_jinja_template_from_the_config(tiny_llama_dir):
    from hydra.utils import instantiate

    node = OmegaConf.create(f"""
_target_: teams_rl.llm.hf_backend.HFBackend
model: {tiny_llama_dir}
show_progress: false
chat_format: >-
  {{% for m in messages %}}[{{{{ m['role'] }}}}] {{{{ m['content'] }}}} {{% endfor %}}{{% if add_generation_prompt %}}[assistant]{{% endif %}}
""")
    b = instantiate(node)
    (ids,) = sent_prompts(b, [EXPERT], role="expert")
    tok = b.tokenizer
    text = "[system] Answer in one word. [user] Name a colour. [assistant]"
    assert ids == [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert "?chat_format=jinja:" in b.model_id
    # a template that writes the BOS itself gets no second one
    with_bos = HFBackend(tiny_llama_dir, show_progress=False,
                         chat_format="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (ids,) = sent_prompts(with_bos, [JUDGE])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert with_bos.model_id != b.model_id
    b.close()
    with_bos.close()


def test_bad_formats_fail_in_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(TeamsRLError, match=r"^backend.chat_format: unknown format 'vicuna' \(known: auto, tokenizer, "
                                           r"plain, vicuna_v1.1, or a Jinja template\)$"):
        HFBackend(tiny_llama_dir, chat_format="vicuna")
    with pytest.raises(TeamsRLError, match="the Jinja template does not compile"):
        HFBackend(tiny_llama_dir, chat_format="{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(TeamsRLError, match="must be a format name"):
        HFBackend(tiny_llama_dir, chat_format="")
    # `tokenizer` with a tokenizer that has no template fails at load, in one line
    from teams_rl.models import build_tiny_llama

    model, tok = build_tiny_llama()
    tok.chat_template = None
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    base = HFBackend(str(tmp_path / "base"), chat_format="tokenizer", show_progress=False)
    with pytest.raises(TeamsRLError, match="this tokenizer has no chat template"):
        base.complete([JUDGE])
    auto = HFBackend(str(tmp_path / "base"), show_progress=False)  # auto: plain text, with BOS
    (ids,) = sent_prompts(auto, [JUDGE])
    assert ids == [tok.bos_token_id, *tok(JUDGE.messages[0][1] + "\n\n", add_special_tokens=False)["input_ids"]]


def test_a_different_format_never_reuses_cached_answers(backends, tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    sampling = {"max_tokens": 2, "temperature": 0.0}
    first = LLMClient("reviewer", backends("vicuna_v1.1"), sampling=sampling, cache=cache)
    first.complete([JUDGE])
    again = LLMClient("reviewer", backends("vicuna_v1.1"), sampling=sampling, cache=cache).complete([JUDGE])
    other = LLMClient("reviewer", backends("plain"), sampling=sampling, cache=cache).complete([JUDGE])
    cache.close()
    assert again[0].cached and not other[0].cached
    assert len({backends(n).model_id for n in ("vicuna_v1.1", "plain", "auto")}) == 3
