"""Deterministic LLM backends for tests: real `complete` implementations whose answers follow rules.

They are instantiated from config like any backend, e.g.
`instructor.backend._target_=tests.fakes.RuleBackend`, and record every batch they receive.
"""

from __future__ import annotations

import re
import time

from teams_rl.llm.types import ChatRequest, Completion

JUDGE_PATTERN = re.compile(r"first instruction:\s*(.*?)\s*second instruction:\s*(.*?)\s*(?:answer|$)", re.I | re.S)


class RuleBackend:
    """Answers are a pure function of the last user message, so caches and reruns are checkable.

    - a judge prompt (mentions "Equal" and "Not Equal") gets "Not Equal" iff its two instructions differ;
    - any other prompt gets "<prefix> " + the prompt's last line (rewrites grow, answers echo).
    """

    instances: list[RuleBackend] = []

    def __init__(self, model: str = "rule", prefix: str = "Answer:", latency_s: float = 0.0, **_ignored):
        self.model_id = f"rule/{model}"
        self.prefix = prefix
        self.latency_s = latency_s
        self.batches: list[int] = []
        RuleBackend.instances.append(self)

    def respond(self, prompt: str) -> str:
        if "Not Equal" in prompt:
            match = JUDGE_PATTERN.search(prompt)
            if match:
                return "Equal" if match.group(1).strip() == match.group(2).strip() else "Not Equal"
            return "Not Equal"
        last = [line for line in prompt.strip().splitlines() if line.strip()][-1]
        return f"{self.prefix} {last.strip()}"

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        self.batches.append(len(requests))
        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for request in requests:
            prompt = request.messages[-1][1]
            text = self.respond(prompt)
            out.append(Completion(text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()),
                                  latency_s=self.latency_s, finish_reason="stop"))
        return out

    @property
    def queries(self) -> int:
        return sum(self.batches)


def rule_llm_overrides(roles=("instructor", "reviewer", "expert"), model: str = "rule") -> list[str]:
    """Hydra overrides that put every role on the RuleBackend (no model loaded, no network)."""
    out = []
    for role in roles:
        out += [f"~{role}.backend", f"+{role}.backend._target_=tests.fakes.RuleBackend",
                f"+{role}.backend.model={model}"]
    return out
