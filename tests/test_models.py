"""The named local models: the committed tiny tokenizer, the tiny Llama and `resolve_model`."""

from __future__ import annotations

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.models import build_tiny_llama, load_causal_lm, load_tiny_tokenizer, resolve_model


def test_tiny_tokenizer_round_trips_text():
    tok = load_tiny_tokenizer()
    for text in ["Write a story about a cat.", "Sort [3, 1, 2] in Python!\nThen explain  why.", "naïve café"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and max(ids) < len(tok)
        assert tok.decode(ids) == text


def test_tiny_tokenizer_has_chat_template_and_special_tokens():
    tok = load_tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
    assert tok(text, add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_build_tiny_llama_is_deterministic_per_seed():
    a, tok = build_tiny_llama(seed=3)
    b, _ = build_tiny_llama(seed=3)
    c, _ = build_tiny_llama(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all((sa[k] == sb[k]).all() for k in sa)
    assert any((sa[k] != sc[k]).any() for k in sa)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2
    assert sum(p.numel() for p in a.parameters()) < 400_000


def test_resolve_tiny_llama_writes_once_and_reuses(tmp_path):
    first = resolve_model("tiny_llama", cache_dir=tmp_path)
    weights = next(p for p in (tmp_path / "models" / "tiny_llama").iterdir() if p.suffix == ".safetensors")
    written = weights.stat().st_mtime_ns
    second = resolve_model("tiny_llama", cache_dir=tmp_path)  # reused: the weights are not written again
    assert first == second == str(tmp_path / "models" / "tiny_llama")
    assert weights.stat().st_mtime_ns == written
    model, tok = load_causal_lm(first)
    assert not model.training and tok.pad_token is not None
    reference, _ = build_tiny_llama(seed=0)
    assert all((v == reference.state_dict()[k]).all() for k, v in model.state_dict().items())


def test_resolve_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(TeamsRLError, match="does not exist") as err:
        resolve_model(str(tmp_path / "no_such_model"))
    assert "\n" not in str(err.value)


def test_resolve_rejects_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(TeamsRLError, match="no config.json") as err:
        resolve_model(str(tmp_path))
    assert "\n" not in str(err.value)
