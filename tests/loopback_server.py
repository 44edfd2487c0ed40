"""An OpenAI-compatible chat server on 127.0.0.1 with fault injection, for tests and benchmarks.

`POST /v1/chat/completions` answers "echo: <last user message>" (cut to `max_tokens` words, then
finish_reason "length"), with `usage`, `id`, `model`, `created` and `object` like the real API.
`GET /v1/models` lists the model and `GET /stats` returns the request count and the peak number of
requests in flight. Faults can be injected per request:

    with LoopbackServer(latency_s=0.05) as server:
        server.add_fault("429", times=2, retry_after="1")   # first 2 attempts of every request
        server.add_fault("500", times=None, match="BROKEN")  # always, for prompts containing BROKEN
        client = openai.OpenAI(base_url=server.base_url, api_key="k")

Fault kinds: "429" (with Retry-After), "500", "503", "malformed" (HTTP 200 with a broken JSON body),
"no_choices" (HTTP 200, valid JSON without choices), "hang" (no answer until `hang_s` passes or the
server stops), "drop" (the connection is closed without a response), "400" (a permanent client error), "401" (an
authentication error whose message quotes the key it received, as real servers do).
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
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

FAULT_KINDS = ("429", "500", "503", "400", "401", "malformed", "no_choices", "hang", "drop")


@dataclass
class Fault:
    kind: str
    times: int | None = 1  # how many attempts of each matching request fail; None = every attempt
    match: str | None = None  # only requests whose last user message contains this text
    model: str | None = None  # only requests for this model
    retry_after: str | None = None  # Retry-After header value sent with 429/503 (seconds or an HTTP date)


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

    # ---- configuration -------------------------------------------------------------------------
    def add_fault(self, kind: str, times: int | None = 1, match: str | None = None, model: str | None = None,
                  retry_after: str | None = None) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
        fault = Fault(kind, times, match, model, retry_after)
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
            record = Record(body, dict(request.headers), attempt, fault.kind if fault else None, time.monotonic())
            with self._lock:
                self.records.append(record)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
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

    def _answer(self, body: dict) -> dict:
        words = f"echo: {_last_user(body)}".split(" ")
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

    async def _stats(self, _request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response({"served": self.served, "max_in_flight": self.max_in_flight,
                                      "records": len(self.records)})

    # ---- lifecycle -----------------------------------------------------------------------------
    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=1024).start()
        ready.set()
        try:
            await asyncio.wait_for(self._stopping.wait(), self.max_lifetime_s)
        except asyncio.TimeoutError:
            pass
        finally:
            await runner.cleanup()

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


def _watch_stdin(server: LoopbackServer) -> None:
    """Stop the server when the parent process closes our stdin (or dies)."""
    sys.stdin.buffer.read()
    server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible loopback server (prints its port)")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--max-lifetime-s", type=float, default=600.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = LoopbackServer(latency_s=args.latency_s, max_lifetime_s=args.max_lifetime_s, port=args.port or None)
    server.start()
    print(server.port, flush=True)
    threading.Thread(target=_watch_stdin, args=(server,), daemon=True).start()
    server._stopped.wait()


if __name__ == "__main__":
    main()
