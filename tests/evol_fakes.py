"""Deterministic test backends for the evolution MDP: an instructor that rewrites by rule per operator and
answers judge prompts like a reviewer, and a hashing embedder standing in for MiniLM.

`OperatorRuleBackend` recognises which operator template a prompt was rendered from (it reads the operator
library in conf/operators/library.yaml), so a test can decide which operators change the instruction: with
`changing_ops=["deepening"]`, only deepening changes it and the reviewer judge pays 1 for deepening alone.
Usable from Hydra: `instructor.backend._target_=tests.evol_fakes.OperatorRuleBackend`.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from teams_rl.llm.types import ChatRequest
from tests.fakes import FakeBackend, judge_pair

LIBRARY = Path(__file__).resolve().parent.parent / "conf" / "operators" / "library.yaml"

ADDITIONS = {
    "breadth": "Describe a rare regional variant instead.",
    "add_constraints": "Use at most 100 words.",
    "deepening": "Explain the underlying reasons in depth.",
    "concretizing": "Focus on a specific example from chemistry.",
    "increase_reasoning_steps": "Reason step by step before answering.",
    "complicate_input": "Use the data in this table: | a | b |.",
}


def operator_prefixes() -> dict[str, str]:
    """Operator name -> the rendered template text in front of the {instruction} slot."""
    cfg = OmegaConf.create({"operators": OmegaConf.load(LIBRARY)})
    library = OmegaConf.to_container(cfg.operators.library, resolve=True)
    return {name: spec["template"].split("{instruction}")[0] for name, spec in library.items()}


class OperatorRuleBackend(FakeBackend):
    """Rewrites by rule: an operator in `changing_ops` (default: all) appends its own sentence to the
    instruction, any other returns the instruction unchanged. `style="messy"` wraps answers the way chat
    models do ('Sure! Here is the rewritten prompt:\\n"..."'); `fail_ops` answer with an error. Judge
    prompts get "Not Equal" iff the two instructions differ (`judge_style` "plain" | "chatty")."""

    PREFIX = "oprule"
    instances: list[OperatorRuleBackend] = []

    def __init__(self, model: str = "oprule", changing_ops=None, style: str = "plain", fail_ops=(),
                 judge_style: str = "plain", **kwargs):
        super().__init__(model, **kwargs)
        self.changing = None if changing_ops is None else set(changing_ops)
        self.style = style
        self.fail_ops = set(fail_ops or ())
        self.judge_style = judge_style
        self.prefixes = operator_prefixes()
        OperatorRuleBackend.instances.append(self)

    def operator_of(self, prompt: str) -> tuple[str | None, str]:
        for name, prefix in self.prefixes.items():
            if prompt.startswith(prefix):
                return name, prompt[len(prefix):]
        return None, prompt

    def respond(self, request: ChatRequest) -> str | None:
        prompt = request.messages[-1][1]
        pair = judge_pair(prompt)
        if pair is not None:
            verdict = "Equal" if " ".join(pair[0].split()) == " ".join(pair[1].split()) else "Not Equal"
            return verdict if self.judge_style == "plain" else f"**{verdict}.** The second one differs in scope."
        name, instruction = self.operator_of(prompt)
        if name is None:
            return f"Answer: {prompt.splitlines()[-1]}"
        if name in self.fail_ops:
            return None
        if self.changing is None or name in self.changing:
            new = f"{instruction.strip()} {ADDITIONS.get(name, name)}"
        else:
            new = instruction.strip()
        if self.style == "messy":
            return f'Sure! Here is the rewritten prompt:\n\n"{new}"\n\nExplanation: I applied {name}.'
        return new


def hash_embed(texts, dim: int = 384) -> np.ndarray:
    """Bag-of-words hashing embedding (L2-normalised): same words -> same vector, disjoint words -> orthogonal."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[i, zlib.crc32(word.encode()) % dim] += 1.0
        norm = np.linalg.norm(out[i])
        if norm:
            out[i] /= norm
    return out


def rule_overrides(roles=("instructor", "reviewer"), **kwargs) -> list[str]:
    """Hydra overrides putting `roles` on the OperatorRuleBackend (kwargs become backend arguments)."""
    out = []
    for role in roles:
        out += [f"~{role}.backend", f"+{role}.backend._target_=tests.evol_fakes.OperatorRuleBackend"]
        for key, value in kwargs.items():
            if isinstance(value, (list, tuple)):
                value = "[" + ",".join(str(v) for v in value) + "]"
            out.append(f"+{role}.backend.{key}={value}")
    return out
