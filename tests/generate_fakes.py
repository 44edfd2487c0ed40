"""A deterministic expert/reviewer backend for the generate-stage tests, with failures injected by marker.

Answers are a pure function of the prompt (and the request seed), so reruns, resumes and caches are checkable:
- an operator prompt (it ends with "#Given Prompt#:" and the instruction) gets a rewrite:
    in-breadth ("Prompt Creator"): "Explain" + 7 pseudo-words (a new topic);
    in-depth: the instruction's first 4 words + 8 pseudo-words;
  unless the instruction contains one of the markers below;
- a judge prompt ("First instruction: ... Second instruction: ...") gets "Not Equal", or "Equal" when the
  second instruction hashes into `equal_every` (every k-th, deterministic);
- anything else is answered with a sentence that repeats the question.

`style` makes every answer of one bad kind: "echo" (rewrites only echo the template's marker), "verbose"
(rewrites of 300 words), "refusal" (every answer is a short apology); "normal" is the default.

Markers (substrings of the instruction being rewritten or answered):
  fail_evolve   the rewrite only echoes the template's marker (an unusable rewrite: an evolution failure)
  near_copy     the in-depth rewrite is the instruction plus one word (a ROUGE-L near-duplicate of it)
  copy_words    the in-depth rewrite mentions "the given prompt" (WizardLM rule 4)
  too_short     the in-depth rewrite has 3 words (Alpaca's length filter)
  sorry         the answer is a short apology (WizardLM rule 2)
"""

from __future__ import annotations

import hashlib
import os

from teams_rl.llm.types import ChatRequest
from tests.fakes import FakeBackend, judge_pair

GIVEN = "#Given Prompt#:"
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "du", "fa", "go", "hu", "ji", "pe", "so",
             "ty", "wa", "xe", "yo")


def pseudo_words(key: str, n: int) -> list[str]:
    digest = hashlib.sha256(key.encode()).digest()
    while len(digest) < 3 * n:
        digest += hashlib.sha256(digest).digest()
    return ["".join(SYLLABLES[b % len(SYLLABLES)] for b in digest[3 * i: 3 * i + 3]) for i in range(n)]


class EvolFake(FakeBackend):
    """Rule-based backend (see the module docstring). `calls_file` (or $EVOLFAKE_CALLS_FILE), when set, gets
    one line per request sent, so that a test can count the requests of a subprocess run."""

    def __init__(self, model: str = "evolfake", fail_evolve=("Fibonacci",), near_copy=("Solve for x",),
                 copy_words=("sentiment",), too_short=("virus",), sorry=("poem",), equal_every: int = 0,
                 latency_s: float = 0.0, calls_file: str | None = None, batch_size: int | None = None,
                 style: str = "normal", **_ignored):
        super().__init__(model, latency_s=latency_s, calls_file=calls_file or os.environ.get("EVOLFAKE_CALLS_FILE"),
                         batch_size=batch_size)
        self.fail_evolve = tuple(fail_evolve)
        self.near_copy = tuple(near_copy)
        self.copy_words = tuple(copy_words)
        self.too_short = tuple(too_short)
        self.sorry = tuple(sorry)
        self.equal_every = int(equal_every)
        self.style = style

    @staticmethod
    def _has(text: str, markers) -> bool:
        return any(m in text for m in markers)

    def rewrite(self, prompt: str, seed) -> str:
        instruction = prompt.rsplit(GIVEN, 1)[1].strip()
        key = f"{instruction}|{seed}"
        if self._has(instruction, self.fail_evolve) or self.style == "echo":
            return "#Rewritten Prompt#:"
        if self.style == "verbose":
            return "Explain " + " ".join(pseudo_words(key + "|verbose", 300)) + "."
        if "Prompt Creator" in prompt:
            return "Explain " + " ".join(pseudo_words(key + "|breadth", 7)) + "."
        if self._has(instruction, self.near_copy):
            return instruction + " now"
        if self._has(instruction, self.too_short):
            return "Compare " + " ".join(pseudo_words(key, 2)) + "."
        head = " ".join(instruction.split()[:4])
        tail = " ".join(pseudo_words(key, 8))
        if self._has(instruction, self.copy_words):
            return f"{head} {tail}, exactly as the given prompt says."
        return f"{head} {tail}."

    def judge(self, first: str, second: str) -> str:
        if first.strip() == second.strip():
            return "Equal"
        if self.equal_every and int(hashlib.sha256(second.encode()).hexdigest(), 16) % self.equal_every == 0:
            return "Equal"
        return "Not Equal"

    def respond(self, request: ChatRequest) -> str:
        prompt = request.messages[-1][1]
        if GIVEN in prompt:
            return self.rewrite(prompt, request.seed)
        pair = judge_pair(prompt)
        if pair is not None:
            return self.judge(*pair)
        if self._has(prompt, self.sorry) or self.style == "refusal":
            return "Sorry, I cannot help with that."
        return f"Here is a careful answer. {prompt.strip()} The key points are explained step by step above."


def fake_llm_overrides(roles=("instructor", "reviewer", "expert"), **kwargs) -> list[str]:
    """Hydra overrides putting `roles` on EvolFake; kwargs become backend arguments."""
    out = []
    for role in roles:
        out += [f"~{role}.backend", f"+{role}.backend._target_=tests.generate_fakes.EvolFake",
                f"+{role}.backend.model={role}"]
        for key, value in kwargs.items():
            out.append(f"+{role}.backend.{key}={value}")
    return out
