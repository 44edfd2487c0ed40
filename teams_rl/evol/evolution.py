"""Apply operators to instructions with one batched LLM call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from teams_rl.evol.operators import OperatorSet, clean_rewrite_counted
from teams_rl.llm.types import ChatRequest, Completion


@dataclass
class Rewrite:
    """One operator application: the cleaned instruction (None when rejected or failed), the raw answer, the
    kinds of cleaning applied (`teams_rl.evol.cleaning.KINDS`) and why an answer was rejected."""

    text: str | None
    raw: str
    completion: Completion
    cleaning: tuple[str, ...] = ()
    rejected_as: str | None = None

    @property
    def rejected(self) -> bool:
        return self.text is None


def evolve_request(opset: OperatorSet, op: int, instruction: str, seed: int | None = None, purpose: str = "evolve", *,
                   max_tokens: int | None = None, temperature: float | None = None) -> ChatRequest:
    """The request that applies operator `op` to `instruction` (unset sampling fields: the role's defaults)."""
    return ChatRequest.chat(opset.render(int(op), instruction), max_tokens=max_tokens, temperature=temperature,
                            seed=None if seed is None else int(seed), purpose=purpose)


def to_rewrite(completion: Completion, min_words: int = 3, template: str | None = None,
               given: str | None = None) -> Rewrite:
    """The cleaned instruction inside an answer (None: the answer is no usable rewrite, or the request failed).
    `template`: the operator's template, so that lines the model copied from it are dropped; `given`: the
    instruction that was rewritten (an answer that only repeats it is no rewrite)."""
    if not completion.ok:
        return Rewrite(text=None, raw=completion.text or "", completion=completion)
    cleaned = clean_rewrite_counted(completion.text, min_words=min_words, template=template, given=given)
    return Rewrite(text=cleaned.text, raw=completion.text or "", completion=completion, cleaning=cleaned.actions,
                   rejected_as=cleaned.rejected)


def evolve_detailed(client, opset: OperatorSet, instructions: Sequence[str], op_ids: Sequence[int],
                    seeds: Sequence[int] | None = None, purpose: str = "evolve", *, max_tokens: int | None = None,
                    temperature: float | None = None, min_words: int = 3) -> list[Rewrite]:
    """Like `evolve`, but keeps the raw answer and the completion of every request."""
    if len(instructions) != len(op_ids):
        raise ValueError(f"{len(instructions)} instructions but {len(op_ids)} operator ids")
    if seeds is not None and len(seeds) != len(instructions):
        raise ValueError(f"{len(instructions)} instructions but {len(seeds)} seeds")
    if not instructions:
        return []
    requests = [evolve_request(opset, op, text, None if seeds is None else seeds[i], purpose, max_tokens=max_tokens,
                               temperature=temperature)
                for i, (text, op) in enumerate(zip(instructions, op_ids, strict=True))]
    return [to_rewrite(c, min_words, opset[int(op)].template, given)
            for c, op, given in zip(client.complete(requests), op_ids, instructions, strict=True)]


def evolve(client, opset: OperatorSet, instructions: list[str], op_ids: list[int], seeds: list[int] | None = None,
           purpose: str = "evolve", *, max_tokens: int | None = None, temperature: float | None = None,
           min_words: int = 3) -> list[str | None]:
    """Rewrite `instructions[i]` with operator `op_ids[i]`, all N in ONE `client.complete` call.

    Returns the cleaned new instructions in order; an entry is None when the request failed or the answer
    was rejected by `clean_rewrite` (the caller keeps the previous instruction). `seeds[i]` is the sampling
    seed of request i (also part of its cache key). Unset `max_tokens`/`temperature` take the role's defaults.
    """
    return [r.text for r in evolve_detailed(client, opset, instructions, op_ids, seeds, purpose,
                                            max_tokens=max_tokens, temperature=temperature, min_words=min_words)]
