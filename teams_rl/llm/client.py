"""The client every stage uses: cache lookup, budget guard, backend call, accounting."""

from __future__ import annotations

from typing import Protocol

from teams_rl.llm.accounting import Budget, RoleAccount
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.types import ChatRequest, Completion


class Backend(Protocol):
    """A model that answers a batch of chat requests. Failed requests come back with `error` set."""

    model_id: str

    def complete(self, requests: list[ChatRequest]) -> list[Completion]: ...


class LLMClient:
    """One role (instructor, reviewer, expert) bound to a backend, a shared cache and its own account."""

    def __init__(self, role: str, backend: Backend, *, sampling: dict | None = None,
                 cache: RequestCache | None = None, account: RoleAccount | None = None,
                 budget: Budget | None = None, chunk_size: int | None = None):
        self.role = role
        self.backend = backend
        self.sampling = dict(sampling or {})
        self.cache = cache
        self.account = account or RoleAccount(role=role, model=backend.model_id)
        self.budget = budget or Budget(role=role)
        # Each chunk is a barrier (the budget is checked between chunks), so keep it well above the
        # backend's concurrency: a too-small chunk leaves the request engine idle while its tail finishes.
        self.chunk_size = chunk_size or max(256, 16 * int(getattr(backend, "max_concurrency", 16)))

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answer all requests in order. Cache hits cost nothing; misses are sent in chunks so that a
        budget stop keeps (and caches) every answer received before it."""
        requests = [r.with_defaults(self.sampling) for r in requests]
        keys = [r.cache_key(self.model_id) for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        hits = self.cache.get_many(list(dict.fromkeys(keys))) if self.cache is not None else {}
        misses: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in hits:
                results[i] = hits[key]
                self.account.record(requests[i].purpose, hits=1)
            else:
                misses.setdefault(key, []).append(i)  # identical requests in one batch are sent once

        pending = list(misses.items())
        while pending:
            n = self.budget.allowed(self.account, min(self.chunk_size, len(pending)))
            chunk, pending = pending[:n], pending[n:]
            answers = self.backend.complete([requests[idx[0]] for _, idx in chunk])
            for (_key, idx), answer in zip(chunk, answers, strict=True):
                self.account.record(
                    requests[idx[0]].purpose, sent=1, failures=0 if answer.ok else 1,
                    prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                    latencies=[answer.latency_s],
                )
                for i in idx:
                    results[i] = answer
            if self.cache is not None:
                self.cache.put_many([(key, self.model_id, a) for (key, _), a in zip(chunk, answers, strict=True)])
        return results  # type: ignore[return-value]
