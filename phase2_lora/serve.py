"""Serve base + LoRA adapter over an OpenAI-compatible HTTP API, with a web chat page, in one command.

    python phase2_lora/serve.py --adapter checkpoints/qwen1.5-1.8b-persona-lora      # http://127.0.0.1:8000
    python phase2_lora/serve.py --adapter DIR --host 0.0.0.0 --port 8000 --api_key SECRET   # reachable on the LAN

  GET  /                      the chat page: multi-turn, answers stream token by token, Clear and Stop buttons
  GET  /v1/models             the served model; its id names the base and the adapter
  POST /v1/chat/completions   OpenAI's request: messages, max_tokens (or max_completion_tokens), temperature
                              (0 = greedy), top_p, stop, seed, n (1 only), stream (+ stream_options.include_usage);
                              usage counts the tokens of the returned text. Ignored on purpose: model (one is
                              served), user, store, metadata. Any other field (tools, logprobs, response_format,
                              ...) gets 400 naming it, unless it asks for nothing (null, false, 0, "", [], {}).

Model flags are chat.py's, and so is the generation code (chat_session.Generation): the model's own chat
template, stopping at its end-of-turn token. Requests without a system message get --system (default: the one
the adapter was trained with). One generation runs at a time; the others wait in arrival order. A client that
disconnects stops its generation. Bad requests get OpenAI-style JSON errors with a 4xx status (a message the chat
template refuses too: 400 with the template's own message); POST bodies must be application/json (415 otherwise:
a page on another site cannot send that without asking) of at most 2 MiB (413). Only requests whose Host header
names this server are served (--host, localhost, 127.0.0.1, ::1; with --host 0.0.0.0 or :: any IP address too):
a web page whose domain is re-pointed at 127.0.0.1 (DNS rebinding) sends its own name and gets 400. The port is
opened before the model loads, so a port in use fails at once.
"""

import argparse
import asyncio
import contextlib
import errno
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from chat import MIN_TEMPERATURE, OneLineArgumentParser, add_model_flags, check_model_args, die, log
from model_names import model_name, resolve_model
from serve_api import APIError, ChatRequest, host_allowed, parse_request, read_json

PAGE = Path(__file__).resolve().parent / "web" / "index.html"


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)  # --max_new_tokens etc. are the defaults of requests that leave those fields out
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: %(default)s, this machine only); 0.0.0.0 opens the "
                        "server to the network: add --api_key then. Requests must name the server in their Host "
                        "header: localhost, 127.0.0.1, ::1, this value, or with 0.0.0.0 or :: any IP address")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api_key", default=None,
                   help="require the header 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        die(f"--port must be in 1..65535, got {args.port}")
    key = args.api_key
    if key is not None and not (key.strip() == key != "" and key.isascii() and key.isprintable()):
        die("--api_key must be printable ASCII without leading or trailing spaces (HTTP headers carry latin-1 "
            "bytes: a browser or client cannot send other characters); pick another key")
    return args


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads: a port in use costs milliseconds, not a model load."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            die(f"port {port} on {host} is in use; pass --port")
        die(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host")


# ---------------------------------------------------------------- the model side

class Server:
    """The loaded model and what every request needs; one generation at a time (an asyncio.Lock, FIFO).
    `running` counts the generations running in worker threads, so tests can check that it never exceeds 1."""

    def __init__(self, args, base: str):
        from chat_session import load_for_chat

        self.args, self.lock = args, asyncio.Lock()
        self.running, self.count_lock = 0, threading.Lock()
        self.model, self.tokenizer, self.window, self.stop_ids = load_for_chat(args, base, log=log)
        base_name = model_name(base) if Path(base).expanduser().is_dir() else base  # a hub cache folder too
        self.model_id = base_name + (f"+{args.adapter.name}" if args.adapter else "")
        self.created = int(time.time())

    def prepare(self, request: ChatRequest):
        """(prompt ids (1, T), generate() kwargs); a prompt that leaves no room to answer, or one the chat template
        refuses (say, roles out of order), is an APIError. Tokenising up to 2 MiB takes a while: run it on a thread."""
        from chat_session import encode_chat, generation_kwargs
        from jinja2 import TemplateError

        messages = request.messages
        if self.args.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.args.system}, *messages]
        try:
            input_ids = encode_chat(self.tokenizer, messages)  # (1, T)
        except TemplateError as e:  # the template's raise_exception("...") or a template bug: the client's to fix
            raise APIError(f"the model's chat template refused the messages: {e}", "messages") from e
        room = self.window - input_ids.shape[1]
        max_tokens = request.max_tokens or min(self.args.max_new_tokens, room)
        if max_tokens > room or room < 1:
            raise APIError(f"this model's context window is {self.window} tokens, but {input_ids.shape[1]} prompt "
                           f"+ {max_tokens} completion tokens were requested; shorten the messages or lower "
                           f"max_tokens", "messages", code="context_length_exceeded")
        kwargs = generation_kwargs(max_tokens, self.stop_ids, self.tokenizer.pad_token_id,
                                   greedy=request.temperature < MIN_TEMPERATURE, temperature=request.temperature,
                                   top_p=request.top_p, top_k=self.args.top_k,
                                   repetition_penalty=self.args.repetition_penalty)
        return input_ids, kwargs

    async def pieces(self, request: ChatRequest, input_ids, kwargs, stats: dict):
        """Async generator of answer text pieces. A worker thread runs the same loop as chat.py over a
        Generation and hands each piece to the event loop; closing this generator (the client went away)
        stops the model after its next token. Fills `stats` (usage, finish_reason) at the end."""
        from chat_session import Generation

        loop, queue, done = asyncio.get_running_loop(), asyncio.Queue(), object()
        generation = worker = None

        def pump():
            with self.count_lock:
                self.running += 1
                stats["running"] = self.running  # 1 unless the lock failed
            try:
                for piece in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # noqa: BLE001  (handed to the event loop, raised there)
                loop.call_soon_threadsafe(queue.put_nowait, e)
            with self.count_lock:
                self.running -= 1
            loop.call_soon_threadsafe(queue.put_nowait, done)

        def release(_):  # only once the model has really stopped: then the next request may use it
            if generation is not None and generation.finish_reason is None and generation.error is None:
                log(f"client gone: generation stopped after {generation.completion_tokens} tokens")
            self.lock.release()

        await self.lock.acquire()  # cancelled while waiting: not acquired; from here on the finally releases it
        try:
            generation = Generation(self.model, self.tokenizer, input_ids, kwargs, seed=request.seed,
                                    stop=request.stop)
            worker = loop.run_in_executor(None, pump)
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):  # e.g. CUDA out of memory: one log line, a JSON 500
                    log(f"error: generation failed: {type(item).__name__}: {item}")
                    raise APIError(f"generation failed: {type(item).__name__}", status=500,
                                   kind="server_error") from item
                yield item
            stats.update(finish_reason=generation.finish_reason, prompt_tokens=generation.prompt_tokens,
                         completion_tokens=generation.completion_tokens)
        finally:  # no await here: a cancelled task (client gone) could be interrupted again at any await
            if worker is None:  # Generation() itself failed: no model running
                release(None)
            else:
                generation.cancel()  # a no-op once finished
                worker.add_done_callback(release)


# ---------------------------------------------------------------- the HTTP app

def usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_response(e: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


async def api_error(request, e: APIError):
    return error_response(e)


async def http_error(request, e):  # 404, 405: the same JSON shape
    return error_response(APIError(str(e.detail), status=e.status_code))


async def server_error(request, e: Exception):
    log(f"error: {type(e).__name__}: {e}")  # one line; the client gets JSON, never a traceback
    return error_response(APIError(f"generation failed: {type(e).__name__}", status=500, kind="server_error"))


async def chat_completions(server: Server, http, event_stream):
    request = parse_request(await read_json(http), server.args, max_tokens_cap=server.window - 1)
    # Off the event loop: tokenising a long history would stall every stream and the disconnect checks meanwhile
    input_ids, kwargs = await asyncio.to_thread(server.prepare, request)
    reply_id, created, stats, start = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), {}, time.perf_counter()
    head = {"id": reply_id, "created": created, "model": server.model_id}
    pieces = server.pieces(request, input_ids, kwargs, stats)
    if request.stream:
        return event_stream(stream_events(head, pieces, stats, request.include_usage, start))
    text = ""
    async for piece in pieces:
        text += piece
        if await http.is_disconnected():  # nobody to answer: stop the model (closing the generator does)
            await pieces.aclose()
            return error_response(APIError("client disconnected", status=499))
    log_request(reply_id, stats, start, None)
    return {**head, "object": "chat.completion", "usage": usage(stats), "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stats["finish_reason"],
        "logprobs": None}]}


def create_app(server: Server, api_key: str | None = None, bound: str = "127.0.0.1"):
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    class EventStream(StreamingResponse):
        media_type = "text/event-stream"

        async def stream_response(self, send):
            try:
                await super().stream_response(send)
            finally:  # a client gone mid-stream: close the generator now (stops the model), not at garbage collection
                await self.body_iterator.aclose()

    async def check_host(request: Request):  # a dependency, not a middleware: BaseHTTPMiddleware hides disconnects
        host = request.headers.get("host")
        if host is not None and not host_allowed(host, bound):
            raise APIError(f"Host {host!r} does not name this server (a DNS-rebinding page sends its own); open "
                           f"http://127.0.0.1:PORT/ or http://localhost:PORT/, or start serve.py with --host "
                           f"naming it", status=400, code="invalid_host")

    async def check_key(request: Request):
        sent = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise APIError("invalid or missing API key: send the header 'Authorization: Bearer KEY'", status=401,
                           code="invalid_api_key")

    app = FastAPI(title="phase2_lora serve", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check_host)])
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "phase2_lora"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def completions(http: Request):
        return await chat_completions(server, http, EventStream)

    return app


async def stream_events(head: dict, pieces, stats: dict, include_usage: bool, start: float):
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""
    chunk = {**head, "object": "chat.completion.chunk"}
    delta = lambda d, reason=None: sse({**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": reason}]})  # noqa: E731
    yield delta({"role": "assistant", "content": ""})
    first = None
    try:
        async for piece in pieces:
            first = first or time.perf_counter()
            yield delta({"content": piece})
    except APIError as e:  # headers are sent: report in-band, as OpenAI does
        yield sse(e.body())
        return
    finally:
        await pieces.aclose()
    yield delta({}, stats["finish_reason"])
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(stats)})
    yield "data: [DONE]\n\n"
    log_request(head["id"], stats, start, first)


def log_request(reply_id: str, stats: dict, start: float, first: float | None) -> None:
    seconds = time.perf_counter() - start
    ttft = f", first token after {first - start:.2f} s" if first else ""
    log(f"{reply_id[:17]}: {stats['prompt_tokens']} prompt + {stats['completion_tokens']} completion tokens in "
        f"{seconds:.2f} s{ttft}, finish_reason {stats['finish_reason']}, generations running {stats['running']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    base = check_model_args(args)
    sock = listen(args.host, args.port)
    import uvicorn  # heavy imports only after the cheap checks
    from qlora_model import UsageError

    try:
        base = resolve_model(base, args.hub, UsageError)  # --hub modelscope: download, then load the folder
        app = create_app(Server(args, base), args.api_key, bound=args.host)
    except UsageError as e:
        die(str(e))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"note: listening on {args.host}: other machines can reach this server"
            + ("" if args.api_key else "; add --api_key to require a key"))
    log(f"serving on http://{args.host}:{args.port}/ (chat page), OpenAI API at http://{args.host}:{args.port}/v1")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn shuts down cleanly
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
