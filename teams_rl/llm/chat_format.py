"""How the `hf` backend turns a request's messages into the prompt text: `backend.chat_format`.

- `auto` (the default): the tokenizer's chat template when it has one, else `plain`;
- `tokenizer`: the tokenizer's chat template (an error at load when it has none);
- a named format: `plain` (one message per paragraph, for base models) or `vicuna_v1.1` (the conversation format
  WizardLM-13B-V1.2 and Vicuna were trained on: a system line, then `USER: ... ASSISTANT:`);
- a Jinja template given in the config, rendered like a HF chat template (`messages`, `add_generation_prompt`,
  `bos_token`, `eos_token`, `raise_exception`).

Every format other than the tokenizer's own template gets the tokenizer's BOS token in front (as the model saw
in training), unless the rendered text already starts with it. The format changes the prompt and therefore the
answer, so `format_id` names it in the backend's `model_id`, which is part of every request's cache key.
"""

from __future__ import annotations

import hashlib

from teams_rl.errors import TeamsRLError

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

# The named formats, written as chat templates. Vicuna v1.1 separates a user turn with a space and an assistant
# turn with the EOS text; a request's own system message replaces the default system line.
NAMED_FORMATS = {
    "plain": "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}",
    "vicuna_v1.1": (
        "{%- set system = namespace(text='" + VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
        "{%- for m in messages if m['role'] == 'system' %}{% set system.text = m['content'] %}{% endfor -%}"
        "{{ system.text + ' ' }}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{%- elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}"
        "{%- else %}{{ raise_exception('vicuna_v1.1 has no role ' + m['role']) }}{% endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif -%}"
    ),
}
TOKENIZER_FORMATS = ("auto", "tokenizer")


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_chat_format(value) -> str:
    """The configured format, checked: a known name or a Jinja template that compiles (else one error line)."""
    if value is None:
        return "auto"
    if not isinstance(value, str) or not value.strip():
        raise TeamsRLError(f"backend.chat_format must be a format name or a Jinja template, got {value!r}")
    if is_template(value):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(value)
        except TemplateSyntaxError as err:
            raise TeamsRLError(f"backend.chat_format: the Jinja template does not compile: {err.message} "
                               f"(line {err.lineno})") from None
        return value
    if value not in TOKENIZER_FORMATS and value not in NAMED_FORMATS:
        known = ", ".join([*TOKENIZER_FORMATS, *NAMED_FORMATS])
        raise TeamsRLError(f"backend.chat_format: unknown format '{value}' (known: {known}, or a Jinja template)")
    return value


def format_id(value: str) -> str | None:
    """How `model_id` names the format; None for the tokenizer's template (the default, no suffix)."""
    if value in TOKENIZER_FORMATS:
        return None
    if is_template(value):
        return "jinja:" + hashlib.sha256(value.encode()).hexdigest()[:12]
    return value


def resolve_template(value: str, tokenizer) -> str | None:
    """The template to render with, or None for the tokenizer's own."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if value == "tokenizer":
        if not has_own:
            raise TeamsRLError("backend.chat_format: tokenizer, but this tokenizer has no chat template; "
                               "choose plain, vicuna_v1.1 or give a Jinja template")
        return None
    if value == "auto":
        return None if has_own else NAMED_FORMATS["plain"]
    return NAMED_FORMATS.get(value, value)


def prompt_text(tokenizer, messages: list[dict], template: str | None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


def prompt_ids(tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """The token ids of the prompt; with a format other than the tokenizer's own, the BOS token first."""
    text = prompt_text(tokenizer, messages, template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if template is not None and bos_id is not None and not (bos and text.startswith(bos)):
        ids = [bos_id, *ids]
    return ids
