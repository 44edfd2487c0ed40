"""One client layer for every LLM role: batched `complete`, request cache, accounting, budget guard."""

from teams_rl.llm.types import ChatRequest, Completion

__all__ = ["ChatRequest", "Completion"]
