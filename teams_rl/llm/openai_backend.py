"""Any OpenAI-compatible chat endpoint (OpenAI, Azure, vLLM, llama.cpp server) through the official async client.

`complete` is synchronous; inside, one asyncio loop in a worker thread (one per backend, kept for its
lifetime with one `AsyncOpenAI` client) sends the requests concurrently, at most `max_concurrency` at a
time and at most `max_requests_per_s` new ones a second (set it below your API tier's rate limit; the
default, 2000, only spreads bursts). Every request gets `timeout_s` per attempt and up to `max_retries` retries on rate limits (429),
server errors (5xx, 408, 409), connection errors, timeouts and malformed responses, waiting as the
server's `Retry-After` says or else an exponential backoff with full jitter. The openai client's own
retries are off, so every retry happens (and is counted in `stats`) here. A reply with empty or
whitespace-only content is a server fault (kind `empty`), retried up to `empty_retries` times.

Outages are waited out: while the backend has had no success since a request's first failure, connection
errors, timeouts and 5xx keep being retried (beyond `max_retries`) until the backend has been failing
continuously for `max_outage_s` (logged with a countdown); then the outage is declared and every such failure
gives up at once. A request that fails while others succeed (a request the server keeps rejecting) gives up
after `max_retries`. A request that still fails comes back as `Completion(error=..., error_kind=...)` in its
place; nothing raises and nothing is dropped (the client layer decides what a failure costs the stage).

Requests go through the SDK's generic `post` on the `/chat/completions` route with the SDK's aiohttp
transport, and the JSON answer is parsed here: the SDK's typed `chat.completions.create` over its default
httpx transport costs about 3x more CPU per request (request transformation, pydantic models, the httpx
connection pool), which caps a 2-core machine far below what a server with 64 parallel slots can take.
Authentication, headers, status errors (`RateLimitError`, `InternalServerError`, `APITimeoutError`, ...)
and connection pooling stay the SDK's.

The API key is read from the environment variable named by `api_key_env` when the backend is built and
kept only in a private wrapper (shown as ***, not picklable) and in the SDK client. It never appears in
repr, errors or logs (error text quoting it is scrubbed), and a pickled backend reads the variable again.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from teams_rl.errors import TeamsRLError
from teams_rl.llm.types import ChatRequest, Completion

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
LOCAL_SERVER_KEY = "EMPTY"  # what vLLM / llama.cpp servers accept when they were started without a key
RETRYABLE_STATUS = frozenset({408, 409, 429})
OUTAGE_REASONS = ("connection", "timeout")  # plus every http_5xx: the server (or its gateway) is down
MAX_ERROR_CHARS = 500
TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # distinct classes before Python 3.11


class _Secret:
    """A string that never shows itself in repr/str and refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        return text.replace(self._value, "***") if len(self._value) >= 4 and self._value != LOCAL_SERVER_KEY else text

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an API key is not picklable")


class MalformedResponse(Exception):
    """The server answered 200 but the body is not a usable chat completion."""


@dataclass
class RequestStats:
    """What the backend did on the wire, for tests and diagnostics (the client layer does the accounting)."""

    requests: int = 0  # requests handed to `complete`
    attempts: int = 0  # HTTP attempts, first tries and retries
    retries: int = 0
    failures: int = 0  # requests that came back with `error` set
    retry_wait_s: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # failed attempts by reason

    def as_dict(self) -> dict:
        return asdict(self)


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread; `run` blocks the caller until a coroutine ends."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, cleanup=None) -> None:
        if self.loop.is_closed():
            return
        if cleanup is not None and self.thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cleanup, self.loop).result(timeout=10)
            except Exception as err:  # closing must never fail the caller
                log.debug("closing the HTTP client failed: %s", type(err).__name__)
        elif cleanup is not None:
            cleanup.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def _is_openai_host(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "").endswith("api.openai.com")


def _retry_after_s(headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` given as seconds or as an HTTP date."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _estimate_tokens(text: str) -> int:
    """A rough token count (~4 characters a token) for servers that send no usage."""
    return (len(text) + 3) // 4


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server; see the module docstring."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 16, timeout_s: float = 120, max_retries: int = 8,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 60.0, max_retry_after_s: float = 300.0,
                 max_requests_per_s: float | None = 2000.0, progress: bool = True, max_outage_s: float = 300.0,
                 empty_retries: int = 3, **_ignored):
        if int(max_concurrency) < 1:
            raise TeamsRLError(f"max_concurrency must be >= 1 for model {model} (got {max_concurrency})")
        self.model = str(model)
        self.model_id = self.model
        self.base_url = str(base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self._base_url_given = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_requests_per_s = float(max_requests_per_s) if max_requests_per_s else None
        self.progress = bool(progress)
        self.max_outage_s = float(max_outage_s)
        self.empty_retries = int(empty_retries)
        self._last_success = time.monotonic()   # the start of the current run of failures is after this
        self._failing_since: float | None = None  # first failure since the last success (None: healthy)
        self._last_countdown_log = 0.0
        self.stats = RequestStats()
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if _is_openai_host(self.base_url):
                raise TeamsRLError(f"environment variable {api_key_env} is not set (needed by role model {self.model})")
            key = LOCAL_SERVER_KEY
        self._secret = _Secret(key)
        self._lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self._response_type = None
        self._paused_until = 0.0  # monotonic time before which no request is sent (after a 429 Retry-After)
        self._next_start = 0.0  # monotonic time of the next free start slot
        self._min_interval_s = 1.0 / self.max_requests_per_s if self.max_requests_per_s else 0.0
        self._finalizer = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _kwargs(self) -> dict:
        return {"model": self.model, "base_url": self._base_url_given, "api_key_env": self.api_key_env,
                "max_concurrency": self.max_concurrency, "timeout_s": self.timeout_s,
                "max_retries": self.max_retries, "backoff_base_s": self.backoff_base_s,
                "backoff_max_s": self.backoff_max_s, "max_retry_after_s": self.max_retry_after_s,
                "max_requests_per_s": self.max_requests_per_s, "progress": self.progress,
                "max_outage_s": self.max_outage_s, "empty_retries": self.empty_retries}

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def __repr__(self) -> str:
        return (f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, "
                f"max_concurrency={self.max_concurrency})")

    def __getstate__(self) -> dict:
        return self._kwargs()  # never the key, the client or the loop; unpickling reads the variable again

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _ensure_started(self) -> _LoopThread:
        with self._lock:
            if self._runner is None:
                import openai  # noqa: F401  (the slow first import happens here, not inside the loop)

                self._runner = _LoopThread(name=f"openai-backend-{self.model}")
                self._runner.run(self._open())
                self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._client)
            return self._runner

    async def _open(self) -> None:
        import httpx2
        import openai

        limits = httpx2.Limits(max_connections=max(1000, self.max_concurrency),
                               max_keepalive_connections=max(100, self.max_concurrency))
        self._client = openai.AsyncOpenAI(
            api_key=self._secret.reveal(),
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,  # our retries are the only ones, so they are all counted
            http_client=openai.DefaultAioHttpClient(limits=limits, timeout=self.timeout_s),
        )
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._response_type = httpx2.Response  # `post` hands back the raw response; `_to_completion` parses it

    def close(self) -> None:
        """Close the HTTP client and stop the worker loop; a later `complete` starts them again."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._runner = self._client = self._semaphore = self._finalizer = None

    # ---- requests ----------------------------------------------------------------------------------
    def submit(self, request: ChatRequest):
        """Send one request now; a `concurrent.futures.Future` of its Completion (the streaming interface)."""
        runner = self._ensure_started()
        self.stats.requests += 1
        return asyncio.run_coroutine_threadsafe(self._complete_one(request), runner.loop)

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        requests = list(requests)
        if not requests:
            return []
        return self._ensure_started().run(self._complete_all(requests))

    async def _complete_all(self, requests: list[ChatRequest]) -> list[Completion]:
        from tqdm.auto import tqdm

        self.stats.requests += len(requests)
        with tqdm(total=len(requests), desc=f"{self.model} requests", unit="req", leave=False,
                  disable=not self.progress or len(requests) < 64) as bar:

            async def one(request: ChatRequest) -> Completion:
                try:
                    return await self._complete_one(request)
                finally:
                    bar.update(1)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _params(self, request: ChatRequest) -> dict:
        params = {"model": self.model, "messages": request.message_dicts()}
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            value = getattr(request, name)
            if value is not None:
                params[name] = value
        return params

    async def _complete_one(self, request: ChatRequest) -> Completion:
        params = self._params(request)
        started = None
        attempt = empties = 0
        first_failure = None
        while True:
            async with self._semaphore:  # a slot is held while a request is on the wire, not while it backs off
                await self._wait_for_turn()
                started = started or time.perf_counter()
                self.stats.attempts += 1
                try:
                    response = await asyncio.wait_for(
                        self._client.post("/chat/completions", body=params, cast_to=self._response_type),
                        self.timeout_s,
                    )
                    completion = self._to_completion(response.content, request, time.perf_counter() - started)
                    if completion.text.strip():
                        self._healthy()
                        return completion
                    reason, retryable, wait_s = "empty", True, None
                    message = f"empty: the server answered 200 with no content ({completion.finish_reason})"
                    empties += 1
                except Exception as err:  # every failure becomes a retry or an error completion
                    reason, retryable, wait_s = self._classify(err)
                    message = self._describe(reason, err)
            self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
            now = time.monotonic()
            outage = _is_outage(reason)
            if outage:
                first_failure = first_failure or now
                self._failing_since = self._failing_since or now
            if not retryable or self._give_up(reason, attempt, empties, first_failure, now):
                self.stats.failures += 1
                log.warning("%s: request failed after %d attempt(s): %s", self.model, attempt + 1, message)
                return Completion.failed(_kind(reason), f"failed after {attempt + 1} attempt(s): {message}",
                                         latency_s=time.perf_counter() - started)
            if wait_s is None:  # exponential backoff with full jitter
                wait_s = random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt, 30)))
            elif reason == "rate_limit":  # the limit is the account's: every request of this backend waits
                self._paused_until = max(self._paused_until, time.monotonic() + wait_s)
            self.stats.retries += 1
            self.stats.retry_wait_s += wait_s
            self._log_retry(attempt, wait_s, message, outage, now)
            attempt += 1
            await asyncio.sleep(wait_s)

    def _healthy(self) -> None:
        self._last_success = time.monotonic()
        self._failing_since = None

    def _give_up(self, reason: str, attempt: int, empties: int, first_failure: float | None, now: float) -> bool:
        """After a retryable failure: stop retrying this request?"""
        if reason == "empty":
            return empties > self.empty_retries
        if not _is_outage(reason):
            return attempt >= self.max_retries
        if self._failing_since is not None and now - self._failing_since >= self.max_outage_s:
            return True  # the outage has lasted max_outage_s: fail closed, at once
        # retries left, or no success since this request first failed (an outage that may still end)
        return attempt >= self.max_retries and self._last_success > (first_failure or now)

    def _log_retry(self, attempt: int, wait_s: float, message: str, outage: bool, now: float) -> None:
        if outage and self._failing_since is not None and now - self._failing_since > 1.0:
            if now - self._last_countdown_log >= 10.0:  # one line every 10 s while the server is down
                self._last_countdown_log = now
                left = self.max_outage_s - (now - self._failing_since)
                log.warning("%s: failing for %.0f s (%s); retrying, %.0f s left before giving up (max_outage_s=%g)",
                            self.describe(), now - self._failing_since, message, max(0.0, left), self.max_outage_s)
            return
        log.info("%s: retry %d in %.2f s after %s", self.model, attempt + 1, wait_s, message)

    async def _wait_for_turn(self) -> None:
        """Start no request before a 429's Retry-After has passed, and at most `max_requests_per_s` a second.

        Pacing starts also keeps a burst of simultaneous starts (the first `max_concurrency` requests of a
        batch) from interleaving on the event loop: interleaved, they all finish sending at the end of the
        burst, come back together and stay in lockstep, each waiting for the whole burst's CPU work.
        """
        while True:
            now = time.monotonic()
            slot = max(now, self._next_start, self._paused_until)
            self._next_start = slot + self._min_interval_s  # slots are handed out in order: no thundering herd
            if slot <= now:
                return
            await asyncio.sleep(slot - now)
            if time.monotonic() >= self._paused_until:  # else a 429 arrived while we waited: queue again
                return

    def _classify(self, err: Exception) -> tuple[str, bool, float | None]:
        """(reason, retryable, seconds the server asked us to wait or None)."""
        import openai

        if isinstance(err, TIMEOUTS):  # our per-request deadline
            return "timeout", True, None
        if isinstance(err, openai.APIConnectionError):
            # the aiohttp transport reports a dropped connection as a connect timeout: ask the root cause
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            return ("timeout" if isinstance(root, TIMEOUTS) else "connection"), True, None
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            retryable = status in RETRYABLE_STATUS or status >= 500
            reason = "rate_limit" if status == 429 else f"http_{status}"
            wait_s = _retry_after_s(err.response.headers) if retryable else None
            if wait_s is not None:
                wait_s = min(wait_s, self.max_retry_after_s)
            return reason, retryable, wait_s
        if isinstance(err, (MalformedResponse, openai.APIResponseValidationError)):
            return "malformed", True, None
        return "error", False, None

    def _describe(self, reason: str, err: Exception) -> str:
        text = self._secret.scrub(f"{reason}: {type(err).__name__}: {err}")
        return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."

    def _to_completion(self, body: bytes, request: ChatRequest, latency_s: float) -> Completion:
        try:
            data = json.loads(body)
        except ValueError as err:
            raise MalformedResponse(f"the body is not JSON ({err})") from None
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError, AttributeError):
            raise MalformedResponse("the response has no choices[0].message.content") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        if isinstance(usage.get("prompt_tokens"), int):
            prompt_tokens, completion_tokens = usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
        else:
            prompt_tokens = sum(_estimate_tokens(content) + 4 for _, content in request.messages)
            completion_tokens = _estimate_tokens(text)
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          latency_s=latency_s, finish_reason=choice.get("finish_reason"))


def _is_outage(reason: str) -> bool:
    return reason in OUTAGE_REASONS or (reason.startswith("http_5"))


def _kind(reason: str) -> str:
    """The Completion.error_kind of a failure reason."""
    if reason.startswith("http_5"):
        return "http_5xx"
    if reason.startswith("http_"):
        return "http_4xx"
    return reason if reason in ("connection", "timeout", "rate_limit", "empty", "malformed") else "error"


def _shutdown(runner: _LoopThread, client) -> None:
    runner.stop(client.close() if client is not None else None)
