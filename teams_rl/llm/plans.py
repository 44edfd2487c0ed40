"""What a stage would send, for `dry_run`: requests per role and purpose, with a few representative requests.

A stage's `estimate(cfg)` returns `RequestPlan`s; `teams_rl.dry_run` turns them into tokens and USD (from the
prompts and `max_tokens`, or from a pilot that sends a few of the samples for real).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from teams_rl.llm.types import ChatRequest

CHARS_PER_TOKEN = 4  # the estimate used where no tokenizer is at hand (also the OpenAI backend's fallback)


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def prompt_tokens(request: ChatRequest) -> int:
    """Tokens of a request's messages (+4 per message for the chat format)."""
    return sum(estimate_tokens(content) + 4 for _, content in request.messages)


@dataclass
class RequestPlan:
    """`requests` requests of `role` for `purpose`; `samples` are real requests of that kind (their prompts
    give the token estimate, a pilot sends some of them); `extra_prompt_tokens` is added to every sample's
    prompt (e.g. the growth of an instruction over the evolution steps); `note` says what is assumed."""

    role: str
    purpose: str
    requests: int
    samples: list[ChatRequest] = field(default_factory=list)
    extra_prompt_tokens: float = 0.0
    note: str = ""

    @property
    def mean_prompt_tokens(self) -> float:
        if not self.samples:
            return 0.0
        return sum(prompt_tokens(r) for r in self.samples) / len(self.samples) + self.extra_prompt_tokens

    def max_completion_tokens(self, default_max_tokens: int | None) -> float:
        """Completion tokens per request, at most: the samples' `max_tokens` (or the role's default)."""
        values = [r.max_tokens or default_max_tokens or 0 for r in self.samples] or [default_max_tokens or 0]
        return sum(values) / len(values)
