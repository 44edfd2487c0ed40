"""An OpenAI-compatible chat server on 127.0.0.1 with fault injection, for tests and benchmarks.

`POST /v1/chat/completions` answers "echo: <last user message>" (cut to `max_tokens` words, then
finish_reason "length"), with `usage`, `id`, `model`, `created` and `object` like the real API.
`GET /v1/models` lists the model and `GET /stats` returns the request count, the peak number of
requests in flight and the summed latency (what a benchmark's bound is made of; `?since=N`: of the requests
after the first N). Faults can be injected per request:

    with LoopbackServer(latency_s=0.05) as server:
        server.add_fault("429", times=2, retry_after="1")   # first 2 attempts of every request
        server.add_fault("500", times=None, match="BROKEN")  # always, for prompts containing BROKEN
        client = openai.OpenAI(base_url=server.base_url, api_key="k")

Fault kinds: "429" (with Retry-After), "500", "503", "malformed" (HTTP 200 with a truncated JSON body),
"no_choices" (HTTP 200, valid JSON without choices), "hang" (no answer until `hang_s` passes or the
server stops), "drop" (the connection is closed without a response), "400" (a permanent client error), "401" (an
authentication error whose message quotes the key it received, as real servers do), "404" (an unknown model),
"empty" (HTTP 200 whose content is empty), "length" (HTTP 200, the answer cut to half its words with
finish_reason "length"). `add_fault(kind, rate=0.3, seed=1)` instead fails that fraction of all attempts
(decided by a hash of the request and attempt number, so a rerun sees the same faults); with a list of kinds
it picks one of them per failing attempt. `outage(seconds, kind="refuse")` takes the server down for a while:
"refuse" closes the listening socket and every open connection (connections are refused), "503" answers
503 to everything; it comes back by itself.

`responder` makes the answers: "echo" (the default), or "evol" — the rule-based expert/instructor/reviewer of
tests/generate_fakes.py (rewrites, answers and "Equal"/"Not Equal" judgements as a pure function of the request),
so whole pipeline stages can run against the server. `latency` may be a function of the request body
(e.g. a seeded lognormal) instead of the constant `latency_s`.
Attempts are counted per request body (messages + sampling fields), so a retried request is "the same
request" and `times=k` fails exactly k of its attempts. The faults that match a request play in the order
they were added: with `add_fault("429", times=1)` then `add_fault("drop", times=2)` its first attempt gets
a 429, the next two a dropped connection, and the fourth an answer.

The server binds only to 127.0.0.1, runs its asyncio loop in a daemon thread and stops on `stop()`, on
leaving the `with` block, or by itself after `max_lifetime_s`. `python tests/loopback_server.py` runs it
as a separate process (the benchmark does, so client and server do not share one GIL); that process
prints its port, and exits when its stdin closes (i.e. when the parent goes away) or after its lifetime.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

FAULT_KINDS = ("429", "500", "503", "400", "401", "404", "malformed", "no_choices", "hang", "drop", "empty", "length")


@dataclass
class Fault:
    kind: str | tuple[str, ...]
    times: int | None = 1  # how many attempts of each matching request fail; None = every attempt
    match: str | None = None  # only requests whose last user message contains this text
    model: str | None = None  # only requests for this model
    retry_after: str | None = None  # Retry-After header value sent with 429/503 (seconds or an HTTP date)
    rate: float | None = None  # instead of `times`: this fraction of all attempts fails (hash-decided)
    seed: int = 0

    def pick(self, key: str, attempt: int) -> str | None:
        """For a rate fault: the kind this attempt fails with, or None (a pure function of the attempt)."""
        digest = hashlib.sha256(f"{self.seed}|{key}|{attempt}".encode()).digest()
        if int.from_bytes(digest[:8], "little") / 2**64 >= self.rate:
            return None
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        return kinds[digest[8] % len(kinds)]


@dataclass
class Record:
    """One request as the server saw it."""

    body: dict | None
    headers: dict[str, str]
    attempt: int  # 0 for the first time this request body arrived, 1 for its first retry, ...
    fault: str | None  # the fault injected into this attempt, None when answered normally
    started: float  # time.monotonic() at arrival
    finished: float | None = None

    @property
    def last_user_message(self) -> str:
        return _last_user(self.body or {})


def _last_user(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def _attempt_key(body: dict) -> str:
    fields = {k: body.get(k) for k in ("model", "messages", "max_tokens", "temperature", "top_p", "seed")}
    return json.dumps(fields, sort_keys=True)


@dataclass(eq=False)
class LoopbackServer:
    """A real HTTP server on a free loopback port; see the module docstring."""

    latency_s: float = 0.0
    hang_s: float = 60.0
    omit_usage: bool = False
    max_lifetime_s: float = 600.0
    model: str = "loopback-model"
    responder: str = "echo"
    latency: object = None  # callable(body) -> seconds, instead of latency_s
    known_models: tuple[str, ...] | None = None  # other models get a 404 (None: any model is served)
    faults: list[Fault] = field(default_factory=list)
    records: list[Record] = field(default_factory=list, repr=False)
    port: int | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._in_flight = 0
        self.max_in_flight = 0
        self.served = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._stopped = threading.Event()
        self._down_until = 0.0  # monotonic time until which an outage lasts
        self._down_kind = "refuse"
        self._runner = None
        self._site = None
        self.outages = 0
        if self.responder not in ("echo", "evol"):
            raise ValueError(f"unknown responder {self.responder!r}")
        self._evol = None
        if self.responder == "evol":
            from tests.generate_fakes import EvolFake

            self._evol = EvolFake(model="loopback")

    # ---- configuration -------------------------------------------------------------------------
    def add_fault(self, kind, times: int | None = 1, match: str | None = None, model: str | None = None,
                  retry_after: str | None = None, rate: float | None = None, seed: int = 0) -> Fault:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        for k in kinds:
            if k not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {k!r} (known: {', '.join(FAULT_KINDS)})")
        fault = Fault(kind if isinstance(kind, str) else kinds, times, match, model, retry_after, rate, seed)
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        """Forget faults, records, attempt counts and the in-flight peak (keeps running)."""
        with self._lock:
            self.faults.clear()
            self.records.clear()
            self._attempts.clear()
            self.max_in_flight = 0
            self.served = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- request handling ----------------------------------------------------------------------
    def _pick_fault(self, body: dict | None) -> tuple[int, Fault | None]:
        key = _attempt_key(body) if isinstance(body, dict) else "<unparsable>"
        text = _last_user(body) if isinstance(body, dict) else ""
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            first = 0  # the matching faults form a script: attempts [0, k1) get the first, [k1, k1 + k2) the next...
            for fault in self.faults:
                if fault.match is not None and fault.match not in text:
                    continue
                if fault.model is not None and fault.model != model:
                    continue
                if fault.rate is not None:
                    kind = fault.pick(key, attempt)
                    if kind is not None:
                        return attempt, Fault(kind, retry_after=fault.retry_after)
                    continue
                if fault.times is None or attempt < first + fault.times:
                    return attempt, fault
                first += fault.times
        return attempt, None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        record = None
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            attempt, fault = self._pick_fault(body)
            if time.monotonic() < self._down_until and self._down_kind == "503":
                fault = Fault("503")
            if fault is None and self.known_models is not None and isinstance(body, dict) \
                    and body.get("model") not in self.known_models:
                fault = Fault("404")
            record = Record(body, dict(request.headers), attempt, fault.kind if fault else None, time.monotonic())
            with self._lock:
                self.records.append(record)
            delay = self.latency(body) if callable(self.latency) and isinstance(body, dict) else self.latency_s
            if delay:
                await asyncio.sleep(delay)
            if fault is not None:
                return await self._inject(request, fault)
            if not isinstance(body, dict) or not body.get("messages"):
                return web.json_response({"error": {"message": "messages are required", "type": "invalid_request"}},
                                         status=400)
            return web.json_response(self._answer(body))
        finally:
            with self._lock:
                self._in_flight -= 1
                self.served += 1
                if record is not None:
                    record.finished = time.monotonic()

    async def _inject(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        kind = fault.kind
        if kind in ("429", "503"):
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            message = "Rate limit reached" if kind == "429" else "Service unavailable"
            return web.json_response({"error": {"message": message, "type": "requests"}}, status=int(kind),
                                     headers=headers)
        if kind == "401":  # like a real server, quote the key it was given (clients must not repeat it)
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return web.json_response({"error": {"message": f"Incorrect API key provided: {token}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        if kind in ("500", "400"):
            return web.json_response({"error": {"message": f"injected {kind}", "type": "server_error"}},
                                     status=int(kind))
        if kind == "404":
            body = json.loads(await request.read() or b"{}")
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist",
                                                "type": "invalid_request_error", "code": "model_not_found"}},
                                     status=404)
        if kind in ("empty", "length"):
            body = json.loads(await request.read())
            reply = self._answer(body)
            content = reply["choices"][0]["message"]["content"]
            words = content.split(" ")
            reply["choices"][0]["message"]["content"] = "" if kind == "empty" else " ".join(words[:max(1, len(words) // 2)])
            reply["choices"][0]["finish_reason"] = "length" if kind == "length" else "stop"
            return web.json_response(reply)
        if kind == "malformed":
            return web.Response(body=b'{"id": "chatcmpl-broken", "choices": [', content_type="application/json")
        if kind == "no_choices":
            return web.json_response({"id": "chatcmpl-empty", "object": "chat.completion", "model": self.model})
        if kind == "hang":
            try:
                await asyncio.wait_for(self._stopping.wait(), self.hang_s)
            except asyncio.TimeoutError:
                pass
            return web.json_response({"error": {"message": "hung", "type": "server_error"}}, status=504)
        # "drop": close the TCP connection without writing a response
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError()

    def _text(self, body: dict) -> str:
        if self._evol is None:
            return f"echo: {_last_user(body)}"
        from teams_rl.llm.types import ChatRequest

        messages = tuple((m.get("role", "user"), str(m.get("content", ""))) for m in body.get("messages") or [])
        return self._evol.respond(ChatRequest(messages=messages, seed=body.get("seed")))

    def _answer(self, body: dict) -> dict:
        words = self._text(body).split(" ")
        max_tokens = body.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            words, finish = words[:max_tokens], "length"
        text = " ".join(words)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        with self._lock:
            n = len(self.records)
        reply = {
            "id": f"chatcmpl-loopback-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
        }
        if not self.omit_usage:
            reply["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                              "total_tokens": prompt_tokens + len(words)}
        return reply

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                              "owned_by": "loopback"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", 0))  # the latency figures over records[since:] only
        with self._lock:
            done = [r for r in self.records[since:] if r.finished is not None]
            return web.json_response({
                "served": self.served, "max_in_flight": self.max_in_flight, "records": len(self.records),
                "latency_sum_s": sum(r.finished - r.started for r in done),  # time the server spent answering
                "first_start": min((r.started for r in done), default=None),
                "last_finish": max((r.finished for r in done), default=None)})

    def outage(self, seconds: float, kind: str = "refuse") -> None:
        """Take the server down for `seconds` ("refuse": no connection is accepted and open ones are closed;
        "503": every request is answered 503); it comes back by itself."""
        if kind not in ("refuse", "503"):
            raise ValueError(f"unknown outage kind {kind!r}")
        self.outages += 1
        self._down_until = time.monotonic() + seconds
        self._down_kind = kind
        if kind == "refuse":
            asyncio.run_coroutine_threadsafe(self._refuse_for(seconds), self._loop).result(10)

    async def _refuse_for(self, seconds: float) -> None:
        await self._site.stop()
        server = getattr(self._runner, "server", None)
        for proto in list(getattr(server, "_connections", {}) or []):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abort()
        self._loop.call_later(seconds, lambda: asyncio.ensure_future(self._listen()))

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock, backlog=1024)
        await self._site.start()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()
        ready.set()
        try:
            await asyncio.wait_for(self._stopping.wait(), self.max_lifetime_s)
        except asyncio.TimeoutError:
            pass
        finally:
            await self._runner.cleanup()

    def start(self) -> LoopbackServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve(ready))
            except BaseException as err:  # surfaced to start() if startup failed
                errors.append(err)
                ready.set()
            finally:
                self._loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=main, name="loopback-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        if not ready.is_set():
            raise RuntimeError("loopback server did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and not self._stopped.is_set():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._stopped.wait(10)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def lognormal_latency(mean_s: float, sigma: float, seed: int = 0):
    """latency(body) -> seconds: lognormal with the given mean and sigma, a pure function of the request body
    (and `seed`): the same request always takes the same time, another seed shuffles the latencies."""
    import math

    mu = math.log(mean_s) - sigma ** 2 / 2

    def latency(body: dict) -> float:
        digest = hashlib.sha256(f"{seed}|{_attempt_key(body)}".encode()).digest()
        u1 = (int.from_bytes(digest[:8], "little") + 1) / (2**64 + 1)
        u2 = (int.from_bytes(digest[8:16], "little") + 1) / (2**64 + 1)
        normal = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)  # Box-Muller
        return math.exp(mu + sigma * normal)

    return latency


def _watch_stdin(server: LoopbackServer) -> None:
    """Stop the server when the parent process closes our stdin (or dies)."""
    sys.stdin.buffer.read()
    server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible loopback server (prints its port)")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--max-lifetime-s", type=float, default=600.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--responder", choices=("echo", "evol"), default="echo")
    parser.add_argument("--lognormal-mean-s", type=float, default=None,
                        help="latency per request: lognormal with this mean (seeded by the request body)")
    parser.add_argument("--lognormal-sigma", type=float, default=1.0)
    parser.add_argument("--latency-seed", type=int, default=0)
    args = parser.parse_args(argv)
    latency = None
    if args.lognormal_mean_s is not None:
        latency = lognormal_latency(args.lognormal_mean_s, args.lognormal_sigma, args.latency_seed)
    server = LoopbackServer(latency_s=args.latency_s, max_lifetime_s=args.max_lifetime_s, port=args.port or None,
                            responder=args.responder, latency=latency)
    server.start()
    print(server.port, flush=True)
    threading.Thread(target=_watch_stdin, args=(server,), daemon=True).start()
    server._stopped.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))  # `tests.` importable
    main()
