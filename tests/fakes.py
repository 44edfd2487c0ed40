"""Deterministic LLM backends for tests: real `complete` implementations whose answers follow rules.

They are instantiated from config like any backend, e.g. `instructor.backend._target_=tests.fakes.RuleBackend`,
and record every batch they receive. `FakeBackend` is what they share: the batch bookkeeping, an optional
latency and calls file, and `judge_pair`, which reads a reviewer prompt (the one prompt format every fake
must understand) back into its two instructions.
"""

from __future__ import annotations

import re
import time

from teams_rl.llm.types import ChatRequest, Completion

# The reviewer prompt of teams_rl.evol.rewards.JUDGE_PROMPT: "First instruction: ... Second instruction: ...
# Answer with exactly Equal or Not Equal ..."
JUDGE_PATTERN = re.compile(r"first instruction:\s*(.*?)\s*second instruction:\s*(.*?)\s*(?:answer with|$)", re.I | re.S)


def judge_pair(prompt: str) -> tuple[str, str] | None:
    """(first, second) instruction of a reviewer prompt (stripped); None for any other prompt."""
    match = JUDGE_PATTERN.search(prompt)
    return None if match is None else (match.group(1), match.group(2))


class FakeBackend:
    """Answers each request with `respond(request)` (a string, or None for a failed request) and records what
    it was sent: `batches` (sizes), `prompts` (last user messages), `sent` (requests). `calls_file`, when set,
    gets one line per request (its purpose), so a test can count the requests of a subprocess run."""

    def __init__(self, model: str = "fake", latency_s: float = 0.0, calls_file: str | None = None,
                 batch_size: int | None = None, **_ignored):
        self.model_id = f"{self.PREFIX}/{model}"
        if batch_size:
            self.batch_size = int(batch_size)  # the most requests one `complete` call gets
        self.latency_s = float(latency_s)
        self.calls_file = calls_file
        self.batches: list[int] = []
        self.prompts: list[str] = []

    PREFIX = "fake"

    def respond(self, request: ChatRequest) -> str | None:
        raise NotImplementedError  # each fake's rule

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        self.batches.append(len(requests))
        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for request in requests:
            prompt = request.messages[-1][1]
            self.prompts.append(prompt)
            text = self.respond(request)
            if text is None:
                out.append(Completion(text="", error=f"{self.model_id}: refused"))
            else:
                out.append(Completion(text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()),
                                      latency_s=self.latency_s, finish_reason="stop"))
        if self.calls_file:
            with open(self.calls_file, "a") as fh:
                fh.write("".join(f"{r.purpose}\n" for r in requests))
        return out

    @property
    def sent(self) -> int:
        return sum(self.batches)

    queries = sent


class RuleBackend(FakeBackend):
    """Answers are a pure function of the last user message, so caches and reruns are checkable.

    - a judge prompt gets "Not Equal" iff its two instructions differ;
    - any other prompt gets "<prefix> " + the prompt's last line (rewrites grow, answers echo).
    """

    PREFIX = "rule"
    instances: list[RuleBackend] = []

    def __init__(self, model: str = "rule", prefix: str = "Answer:", **kwargs):
        super().__init__(model, **kwargs)
        self.prefix = prefix
        RuleBackend.instances.append(self)

    def respond(self, request: ChatRequest) -> str:
        prompt = request.messages[-1][1]
        pair = judge_pair(prompt)
        if pair is not None:
            return "Equal" if pair[0] == pair[1] else "Not Equal"
        last = [line for line in prompt.strip().splitlines() if line.strip()][-1]
        return f"{self.prefix} {last.strip()}"


def rule_llm_overrides(roles=("instructor", "reviewer", "expert"), model: str = "rule") -> list[str]:
    """Hydra overrides that put every role on the RuleBackend (no model loaded, no network)."""
    out = []
    for role in roles:
        out += [f"~{role}.backend", f"+{role}.backend._target_=tests.fakes.RuleBackend",
                f"+{role}.backend.model={model}"]
    return out
