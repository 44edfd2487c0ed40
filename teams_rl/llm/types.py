"""The request/response types shared by every backend."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request. Sampling fields left as None take the role's configured defaults."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    purpose: str = field(default="default", compare=False)  # accounting bucket: evolve, answer, judge, ...

    @classmethod
    def chat(cls, user: str, system: str | None = None, **kwargs) -> ChatRequest:
        messages = ((("system", system),) if system else ()) + (("user", user),)
        return cls(messages=messages, **kwargs)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def with_defaults(self, defaults: dict) -> ChatRequest:
        """Fill unset sampling fields from a role's `sampling` config."""
        values = {}
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            if getattr(self, name) is None and defaults.get(name) is not None:
                values[name] = defaults[name]
        if not values:
            return self
        return ChatRequest(
            messages=self.messages,
            purpose=self.purpose,
            **{n: values.get(n, getattr(self, n)) for n in ("max_tokens", "temperature", "top_p", "seed")},
        )

    def cache_key(self, model_id: str) -> str:
        """Hash of everything that determines the answer: model, messages, sampling parameters, seed."""
        payload = {
            "model": model_id,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# Why a request failed after its retries (`Completion.error_kind`): the backends map what they saw to these.
FAILURE_KINDS = ("connection", "timeout", "http_5xx", "rate_limit", "empty", "malformed", "http_4xx", "prompt_too_long",
                 "generation", "budget", "error")


@dataclass
class Completion:
    """A backend's answer. `error` is set (and `text` empty) when the request failed after all retries; a failed
    completion is never a result: the client does not cache it and the stages do not journal it.
    `error_kind` is one of FAILURE_KINDS. `finish_reason == "length"` marks a reply cut off at max_tokens: it
    is kept, and counted as `truncated`."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    error: str | None = None
    finish_reason: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def truncated(self) -> bool:
        return self.ok and self.finish_reason == "length"

    @classmethod
    def failed(cls, kind: str, message: str, **fields) -> Completion:
        return cls(text="", error=message, error_kind=kind, **fields)
