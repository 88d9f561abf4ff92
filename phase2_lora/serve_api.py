"""The OpenAI chat-completions request, checked before the model runs: the body (Content-Type, size, JSON), each
field against OpenAI's rules, and the Host header. No model, torch or web framework here: serve.py builds on it.

A bad request is an APIError: OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with a 4xx status.
"""

import ipaddress
import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_BODY = 2 << 20  # bytes per request: 32k tokens of history is ~300 kB even as \u-escaped JSON
FIELDS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "stream_options"}
IGNORED = {"model", "user", "store", "metadata"}  # one model is served; OpenAI's bookkeeping means nothing here
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int | None  # None: as many as fit, up to --max_new_tokens
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise APIError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if not (lo < value if lo_open else lo <= value) or value > hi:
        raise APIError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value if integer else float(value)  # generate() rejects an int temperature


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise APIError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))}",
                           f"messages[{i}].role")
        if not isinstance(m.get("content"), str):
            raise APIError(f"messages[{i}].content must be a string (text only), got {json.dumps(m.get('content'))}",
                           f"messages[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_request(body, args, max_tokens_cap: int) -> ChatRequest:
    """The request's fields, checked; ChatRequest uses the server's flags for the ones left out."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    for name, value in body.items():  # a field that asks for nothing (null, false, 0, "", [], {}) is let through
        if name not in FIELDS | IGNORED and value not in (None, False, 0, "", [], {}):
            raise APIError(f"'{name}' is not supported by this server (it serves {', '.join(sorted(FIELDS))})", name)
    messages = check_messages(body.get("messages"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, name, None, 1, max_tokens_cap, integer=True)
    if body.get("n") is not None and (type(body["n"]) is not int or body["n"] != 1):  # True == 1 in Python
        raise APIError(f"only 'n': 1 is supported, got {json.dumps(body['n'])}", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object such as {\"include_usage\": true}", "stream_options")
    return ChatRequest(messages, max_tokens, temperature=number(body, "temperature", 0.0 if args.greedy else
                                                                args.temperature, 0, 2),
                       top_p=number(body, "top_p", args.top_p, 0, 1, lo_open=True), stop=tuple(stop),
                       seed=number(body, "seed", None, 0, 2**32 - 1, integer=True),  # numpy's range
                       stream=stream, include_usage=bool(options.get("include_usage")))


async def read_json(http):
    """The request body, parsed. Only application/json: a web page on another site can POST text/plain to
    localhost without asking (no CORS preflight), but not application/json."""
    kind = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(f"Content-Type must be application/json, got {kind or 'none'}", status=415)
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(f"the request body exceeds {MAX_BODY} bytes", status=413)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise APIError(f"the request body is not valid JSON ({e})") from e


def host_allowed(header: str, bound: str) -> bool:
    """Whether a Host header ("name", "name:port", "[v6]:port") names this server: localhost, the loopback
    addresses or --host; when bound to every interface (0.0.0.0, ::), any IP address too. DNS rebinding always
    sends a domain name (the attacker's), so refusing unknown names is enough."""
    name = header.lower()
    name = name[1:name.find("]")] if name.startswith("[") else name.rpartition(":")[0] if ":" in name else name
    if name.rstrip(".") in LOCAL_HOSTS | {bound.lower()}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return bound in ("0.0.0.0", "::", "")
