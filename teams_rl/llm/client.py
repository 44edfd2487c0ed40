"""The client every stage uses: cache lookup, budget guard, backend call, accounting, failure budget.

Two ways to send requests, one code path underneath (`Scheduler`):
- `client.complete(requests)`: answer all, in order (the policy env, the judge, llm_check);
- a `Scheduler` shared by several clients: `submit(client, request, tag)` as work becomes ready and
  `wait()` for whatever finished, so a caller (the streaming generation engine) can send a chain's next
  request as soon as its previous one returns, with at most `max_concurrency` requests in flight per backend.

A backend either answers a batch synchronously (`complete(requests)`, e.g. the local `hf` backend, which
batches underneath) or also offers `submit(request) -> concurrent.futures.Future` (the OpenAI-compatible
backend); the scheduler runs batch backends in the caller's thread whenever nothing else has finished.
"""

from __future__ import annotations

import heapq
import itertools
import queue
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from teams_rl.errors import BudgetExceeded
from teams_rl.llm.accounting import Budget, RoleAccount
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.failures import FailureBudget
from teams_rl.llm.types import ChatRequest, Completion


class Backend(Protocol):
    """A model that answers a batch of chat requests. Failed requests come back with `error` set."""

    model_id: str

    def complete(self, requests: list[ChatRequest]) -> list[Completion]: ...


class LLMClient:
    """One role (instructor, reviewer, expert) bound to a backend, a shared cache and its own account.

    `failures` (set by the pipeline for the duration of a stage) is that stage's failure budget: a failed
    request is sent again while the budget allows, and `complete` raises `LLMFailures` once it is exceeded."""

    def __init__(self, role: str, backend: Backend, *, sampling: dict | None = None,
                 cache: RequestCache | None = None, account: RoleAccount | None = None,
                 budget: Budget | None = None, chunk_size: int | None = None):
        self.role = role
        self.backend = backend
        self.sampling = dict(sampling or {})
        self.cache = cache
        self.account = account or RoleAccount(role=role, model=backend.model_id)
        self.budget = budget or Budget(role=role)
        self.failures: FailureBudget | None = None
        # requests a batch backend gets at once (its own batch_size when it has one)
        self.chunk_size = int(chunk_size or getattr(backend, "batch_size", None) or 256)

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def where(self) -> str:
        """What to name in an error: the model and where it is served."""
        describe = getattr(self.backend, "describe", None)
        return describe() if callable(describe) else self.model_id

    @property
    def max_in_flight(self) -> int:
        return max(1, int(getattr(self.backend, "max_concurrency", None) or self.chunk_size))

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answer all requests in order. Cache hits cost nothing; identical requests are sent once; a budget
        stop keeps (and caches) every answer received before it and then raises `BudgetExceeded`; with a
        failure budget, a request that still fails past it raises `LLMFailures` (its siblings are cached)."""
        scheduler = Scheduler()
        for i, request in enumerate(requests):
            scheduler.submit(self, request, tag=i)
        results: list[Completion | None] = [None] * len(requests)
        while scheduler.busy:
            for tag, completion in scheduler.wait():
                results[tag] = completion
        budget_stops = [c for c in results if c is not None and c.error_kind == "budget"]
        if budget_stops:
            raise BudgetExceeded(budget_stops[0].error)
        if self.failures is not None and any(not c.ok for c in results):
            raise self.failures.error(kept=f"{sum(c.ok for c in results)} of {len(results)} answers of this "
                                           "batch cached")
        return results  # type: ignore[return-value]

    # -- the scheduler's side ---------------------------------------------------------------------------
    def prepare(self, request: ChatRequest) -> tuple[ChatRequest, str]:
        request = request.with_defaults(self.sampling)
        return request, request.cache_key(self.model_id)

    def lookup(self, request: ChatRequest, key: str) -> Completion | None:
        if self.cache is None:
            return None
        hit = self.cache.get_many([key]).get(key)
        if hit is not None:
            self.account.record(request.purpose, hits=1)
        return hit

    def settle(self, request: ChatRequest, key: str, answer: Completion) -> bool:
        """Book a sent request's answer; True when it should be sent again (failed, within the budget)."""
        if answer.error_kind == "budget":  # never sent
            return False
        self.account.record(request.purpose, sent=1, failures=0 if answer.ok else 1, truncated=int(answer.truncated),
                            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                            latencies=[answer.latency_s], failure_kind=None if answer.ok else answer.error_kind)
        if self.failures is not None:
            self.failures.record(self.role, self.where, answer)
        if answer.ok:
            if self.cache is not None:
                self.cache.put_many([(key, self.model_id, answer)])
            return False
        return self.failures is not None and not self.failures.exceeded()


@dataclass(order=True)
class _Ticket:
    priority: float
    seq: int
    client: LLMClient = field(compare=False)
    request: ChatRequest = field(compare=False)
    key: str = field(compare=False)
    tags: list = field(compare=False, default_factory=list)


class Scheduler:
    """Requests of any number of clients, sent as they are submitted and returned as they finish.

    `submit(client, request, tag, priority)`: a cache hit is done at once; an identical request already in
    this scheduler is sent once and answers both tags; otherwise the request waits until its backend has a
    free slot (at most `client.max_in_flight` in flight), lowest `priority` first. `wait()` blocks until at
    least one request is done and returns every (tag, completion) done so far. A failed request that its
    client's failure budget allows is sent again instead of being returned."""

    def __init__(self):
        self._seq = itertools.count()
        self._done: queue.SimpleQueue = queue.SimpleQueue()   # (ticket, completion) from any thread
        self._pending: dict[int, list[_Ticket]] = {}           # per backend (id): heap of tickets
        self._backends: dict[int, LLMClient] = {}              # a client per backend, for its limits
        self._in_flight: dict[int, int] = {}
        self._by_key: dict[tuple[int, str], _Ticket] = {}      # tickets waiting or in flight
        self._ready: list[tuple[Hashable, Completion]] = []    # finished without a request (cache hits)

    @property
    def busy(self) -> bool:
        return bool(self._ready or self._by_key)

    def submit(self, client: LLMClient, request: ChatRequest, tag: Hashable, priority: float = 0.0) -> None:
        request, key = client.prepare(request)
        ident = (id(client), key)
        if ident in self._by_key:
            self._by_key[ident].tags.append(tag)
            return
        hit = client.lookup(request, key)
        if hit is not None:
            self._ready.append((tag, hit))
            return
        ticket = _Ticket(priority, next(self._seq), client, request, key, [tag])
        self._by_key[ident] = ticket
        backend = id(client.backend)
        self._backends.setdefault(backend, client)
        heapq.heappush(self._pending.setdefault(backend, []), ticket)
        self._dispatch_async()

    def wait(self) -> list[tuple[Hashable, Completion]]:
        """Block until something is done; return all (tag, completion) pairs done so far."""
        out, self._ready = self._ready, []
        while not out and self._by_key:
            self._dispatch_async()
            got = self._collect(block=False)
            if not got and not self._run_one_batch():
                got = self._collect(block=True)
            out.extend(got)
            out.extend(self._collect(block=False))
        return out

    # -- internals ------------------------------------------------------------------------------------------
    def _collect(self, block: bool) -> list[tuple[Hashable, Completion]]:
        out = []
        while True:
            try:
                ticket, completion = self._done.get(block=block)
            except queue.Empty:
                return out
            block = False
            out.extend(self._finish(ticket, completion))

    def _finish(self, ticket: _Ticket, completion: Completion) -> list[tuple[Hashable, Completion]]:
        backend = id(ticket.client.backend)
        if completion.ok and not completion.text.strip():  # whatever the backend: empty content is no answer
            completion = Completion.failed("empty", "the backend answered with empty content",
                                           prompt_tokens=completion.prompt_tokens, latency_s=completion.latency_s)
        self._in_flight[backend] -= 1
        if ticket.client.settle(ticket.request, ticket.key, completion):
            heapq.heappush(self._pending[backend], ticket)  # failed, within the failure budget: send again
            self._dispatch_async()
            return []
        del self._by_key[(id(ticket.client), ticket.key)]
        self._dispatch_async()
        return [(tag, completion) for tag in ticket.tags]

    def _take(self, backend: int, limit: int) -> list[_Ticket]:
        """Up to `limit` waiting tickets of `backend` that the role budgets allow; the others answered 'budget'."""
        heap, taken = self._pending.get(backend) or [], []
        while heap and len(taken) < limit:
            ticket = heapq.heappop(heap)
            client = ticket.client
            reserved = self._in_flight.get(backend, 0) + len(taken)
            refusal = client.budget.refusal(client.account, reserved)
            if refusal is not None:
                self._in_flight[backend] = self._in_flight.get(backend, 0) + 1
                self._done.put((ticket, Completion.failed("budget", refusal)))
                continue
            taken.append(ticket)
        self._in_flight[backend] = self._in_flight.get(backend, 0) + len(taken)
        return taken

    def _dispatch_async(self) -> None:
        """Fill every async backend's free slots."""
        for backend, client in self._backends.items():
            submit = getattr(client.backend, "submit", None)
            if submit is None:
                continue
            free = client.max_in_flight - self._in_flight.get(backend, 0)
            for ticket in self._take(backend, free) if free > 0 else []:
                future = submit(ticket.request)
                future.add_done_callback(lambda f, t=ticket: self._done.put((t, _result(f))))

    def _run_one_batch(self) -> bool:
        """Run one batch of the batch backend with the most urgent waiting request; False when none waits."""
        waiting = [(heap[0], b) for b, heap in self._pending.items()
                   if heap and getattr(self._backends[b].backend, "submit", None) is None]
        if not waiting:
            return False
        first, backend = min(waiting)
        client = self._backends[backend]
        batch = self._take(backend, client.chunk_size)
        if batch:
            answers = client.backend.complete([t.request for t in batch])
            for ticket, answer in zip(batch, answers, strict=True):
                self._done.put((ticket, answer))
        return True


def _result(future) -> Completion:
    try:
        return future.result()
    except Exception as err:  # a backend bug must not hang the scheduler
        return Completion.failed("error", f"{type(err).__name__}: {err}")
