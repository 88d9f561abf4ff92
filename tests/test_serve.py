"""serve.py, live on a free localhost port, serving the tiny Qwen2 + the adapter trained by the `trained_adapter`
fixture: the official `openai` client gets the trained answers, streamed text equals non-streamed text,
concurrent requests get the answers they get alone, every bad request gets an OpenAI-style 4xx JSON error and
the server keeps serving, --api_key is enforced, a client that disconnects stops its generation, and the chat
page works in a real headless Chromium (driven over the DevTools protocol through a pipe: no extra packages):
Clear during an answer forgets it, Enter during an answer queues the next message.
In this process, on the untrained tiny model: the Host-header check, tokenising off the event loop, a chat
template's error as a 400, and the model lock held until the generation thread ends.

SERVE_SCREENSHOT=docs/phase2_serve_page.png python -m pytest tests/test_serve.py -k browser   # the README picture
"""

import base64
import contextlib
import fcntl
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, persona_records, run_script, user_turn

sys.path.insert(0, str(REPO / "phase2_lora"))

SERVE = "phase2_lora/serve.py"
COMPLETIONS = "/v1/chat/completions"
N_PROMPTS = 3
API_KEY = "test-secret"


@contextlib.contextmanager
def live_server(tmp_path, *args):
    """serve.py on a free 127.0.0.1 port; yields (port, path of its stderr log). Stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / SERVE), "--port", str(port), *map(str, args)],
                                cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in log_path.read_text():  # the port listens from the start; this waits for the model
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        assert request(port, "GET", "/", raw=True)[0] == 200
        yield port, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def request(port, method, path, body=None, headers=None, raw=False):
    """(status, parsed JSON or text) of one HTTP request; None if nothing listens yet. body: dict or bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = json.dumps(body) if isinstance(body, dict | list) else body
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, (text if raw else json.loads(text))
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


@pytest.fixture(scope="module")
def qa():
    return [(user_turn(r), r["output"].strip()) for r in persona_records(N_PROMPTS)]


@pytest.fixture(scope="module")
def server(trained_adapter, tmp_path_factory):
    # --greedy: requests that leave temperature out (the chat page's) decode greedily, so answers are exact.
    with live_server(tmp_path_factory.mktemp("serve"), "--adapter", trained_adapter, "--greedy") as (port, log):
        yield port, log


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ask(client, question, **kwargs):
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                          **{"temperature": 0, **kwargs})


def text_tokens(tokenizer, answer: str) -> list[int]:
    """The tokens of an answer the adapter memorised: it generates them as they were in training."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the API, through the official client

def test_openai_client_gets_trained_answers_streamed_equal_to_non_streamed(client, trained_adapter, tiny_model_dir, qa,
                                                                          tokenizer):
    assert [m.id for m in client.models.list()] == [f"{tiny_model_dir.name}+{trained_adapter.name}"]
    for question, answer in qa:
        reply = ask(client, question)
        assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
        u = reply.usage
        # The answer's tokens; the end-of-turn token that ended it is not in the text, so not counted
        assert u.prompt_tokens > 10 and u.completion_tokens == len(text_tokens(tokenizer, answer))
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        chunks = list(ask(client, question, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == answer and len(pieces) > 1  # streamed piece by piece
        assert not any("\ufffd" in piece for piece in pieces)  # no character sent in halves
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage == u


def test_seed_stop_and_max_tokens(client, qa, tokenizer):
    question, answer = qa[0]
    sampled = [ask(client, question, temperature=1.5, top_p=1, seed=s).choices[0].message.content for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed makes sampling reproducible
    stop = answer[4:6]
    reply = ask(client, question, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == answer[:answer.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    # Counted: the tokens it takes to write the returned text; not the stop string's, nor any generated after it
    ids = text_tokens(tokenizer, answer)
    assert reply.usage.completion_tokens == next(
        n for n in range(len(ids)) if len(tokenizer.decode(ids[:n]).rstrip("\ufffd")) >= answer.index(stop))
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, question, stop=stop, stream=True))
    assert streamed == answer[:answer.index(stop)]
    reply = ask(client, question, max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    assert answer.startswith(reply.choices[0].message.content)


def generations_running(log) -> list[int]:
    """Per request logged: how many generations were running when it started (1 = it had the model alone)."""
    return [int(n) for n in re.findall(r"generations running (\d+)", log.read_text())]


def test_concurrent_requests_get_the_answers_they_get_alone_one_at_a_time(server, client, qa):
    questions, before = [qa[i % len(qa)][0] for i in range(8)], len(generations_running(server[1]))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: ask(client, q, stream=q == qa[0][0]), questions))
    texts = [g.choices[0].message.content if hasattr(g, "choices") else "".join(
        c.choices[0].delta.content or "" for c in g) for g in got]
    assert texts == [qa[i % len(qa)][1] for i in range(8)]
    deadline = time.monotonic() + 10  # a streamed request logs just after its last event
    while len(running := generations_running(server[1])) < before + 8:
        assert time.monotonic() < deadline, running
        time.sleep(0.1)
    assert set(running) == {1}  # the lock let one generation run at a time


# ---------------------------------------------------------------- the model lock, in this process with a stubbed model

def stub_server():
    """A serve.Server with no model loaded: only the locking around Generation is under test."""
    import asyncio
    import threading

    import serve

    server = object.__new__(serve.Server)
    server.model = server.tokenizer = None
    server.lock, server.running, server.count_lock = asyncio.Lock(), 0, threading.Lock()
    return server, serve.ChatRequest([], 1, 0.0, 1.0, (), None, False, False)


def test_a_generation_that_fails_to_start_releases_the_model(monkeypatch):
    """Generation() raising (say, CUDA out of memory) must not leave the lock held: every later request would
    wait forever."""
    import asyncio

    import chat_session

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(chat_session, "Generation", fail)
    server, request = stub_server()

    async def twice():
        for _ in range(2):  # the second would wait on a leaked lock until wait_for gives up
            with pytest.raises(RuntimeError, match="out of memory"):
                async for _ in server.pieces(request, None, {}, {}):
                    pass
        return server.lock.locked()

    assert asyncio.run(asyncio.wait_for(twice(), timeout=10)) is False


class RunOnGeneration:
    """Stands in for chat_session.Generation: one piece, then its model thread runs on whatever cancel() says,
    until the test sets `finish` (a GPU kernel is not interrupted mid-step). Like the real one, iterating ends
    only once that thread has ended."""

    def __init__(self, *args, **kwargs):
        import threading

        self.finish = threading.Event()
        self.thread = threading.Thread(target=self.finish.wait, daemon=True)
        self.thread.start()
        self.finish_reason = self.error = None
        self.prompt_tokens = self.completion_tokens = 1

    def cancel(self):
        pass  # asked to stop: it cannot yet

    def __iter__(self):
        try:
            yield "first"
        finally:
            self.thread.join()


def test_the_lock_is_held_until_the_generation_thread_ends(monkeypatch):
    """A client that leaves closes the stream at once, but the model may still be mid-step: the next request must
    not start a second generation on it (two on one GPU: out of memory, or twice the latency for both)."""
    import asyncio

    import chat_session

    made = []
    monkeypatch.setattr(chat_session, "Generation", lambda *a, **k: made.append(RunOnGeneration()) or made[-1])
    server, request = stub_server()

    async def client_leaves():
        pieces = server.pieces(request, None, {}, {})
        assert await anext(pieces) == "first"
        await pieces.aclose()  # the client is gone: cancel() is called, the thread runs on
        await asyncio.sleep(0.2)
        held = server.lock.locked()
        made[0].finish.set()  # the model's step ends
        while server.lock.locked():  # released once the worker thread has joined it
            await asyncio.sleep(0.01)
        return held, made[0].thread.is_alive()

    assert asyncio.run(asyncio.wait_for(client_leaves(), timeout=10)) == (True, False)


# ---------------------------------------------------------------- in this process, on the untrained tiny model

@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """serve.py's app on the untrained tiny model in this process (uvicorn in a thread, as benchmark_serve.py runs
    it), so that a test can look inside the Server or swap a part of it: (port, server)."""
    import serve
    from benchmark_serve import start_server

    args = serve.parse_args(["--model_name_or_path", str(tiny_model_dir), "--quantization", "none"])
    server = serve.Server(args, serve.check_model_args(args))
    port, uv = start_server(server)
    yield port, server
    uv.should_exit = True


def test_only_requests_that_name_this_server_are_served(local):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and calls the server, with
    `Host: evil.example`. Nothing is served to it: not the page, not the API."""
    import serve

    port, _ = local
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for host, status in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"[::1]:{port}", 200),
                         ("LOCALHOST.", 200), ("evil.example", 400), (f"evil.example:{port}", 400),
                         (f"127.0.0.1.nip.io:{port}", 400), (f"192.168.1.5:{port}", 400)]:
        for method, path in (("GET", "/"), ("GET", "/v1/models"), ("POST", COMPLETIONS)):
            got_status, got = request(port, method, path, body if method == "POST" else None, {"Host": host}, raw=True)
            assert got_status == status, (host, path, got)
            assert status == 200 or json.loads(got)["error"]["code"] == "invalid_host"
    # Bound to every interface, the LAN reaches it by IP address (never by a name that could be rebound)
    assert serve.host_allowed("192.168.1.5:8000", "0.0.0.0") and serve.host_allowed("[fe80::1]:8000", "::")
    assert not serve.host_allowed("evil.example:8000", "0.0.0.0") and serve.host_allowed("gpu-box:80", "gpu-box")


def test_tokenising_runs_off_the_event_loop(local, monkeypatch):
    """prepare() renders and tokenises up to 2 MiB of history: on the event loop it would stall every stream and
    the disconnect checks meanwhile."""
    import asyncio

    port, server = local
    on_loop, prepare = [], server.prepare

    def recording(request):
        try:
            on_loop.append(asyncio.get_running_loop() is not None)
        except RuntimeError:  # no loop runs in this thread
            on_loop.append(False)
        return prepare(request)

    monkeypatch.setattr(server, "prepare", recording)
    status, _ = request(port, "POST", COMPLETIONS, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert status == 200 and on_loop == [False]


def test_a_message_the_chat_template_refuses_gets_400(local, monkeypatch):
    """Templates such as Llama 2's or Gemma's raise_exception() on roles out of order: the client's mistake,
    told in the template's words, not a 500."""
    port, server = local
    monkeypatch.setattr(server.tokenizer, "chat_template", (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"))
    status, got = request(port, "POST", COMPLETIONS, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert status == 400 and got["error"]["param"] == "messages", got
    assert "Conversation roles must alternate" in got["error"]["message"]


# ---------------------------------------------------------------- bad input: 4xx JSON, and the server keeps serving

def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, qa):
    port, _ = server
    user = [{"role": "user", "content": "hi"}]
    cases = [  # (body, status, the error's param, a fragment of its message)
        (b"{not json", 400, None, "not valid JSON"),
        ({"model": "x"}, 400, "messages", "non-empty list"),
        ({"messages": []}, 400, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "must be one of"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, 400, "messages[0].content", "must be a string"),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "must be a string"),
        ({"messages": user, "max_tokens": 0}, 400, "max_tokens", "must be in [1, 1023]"),
        ({"messages": user, "max_tokens": 10**6}, 400, "max_tokens", "must be in [1, 1023]"),
        ({"messages": user, "max_tokens": "5"}, 400, "max_tokens", "must be an integer"),
        ({"messages": [{"role": "user", "content": "长" * 3000}]}, 400, "messages", "context window is 1024"),
        ({"messages": user, "temperature": -1}, 400, "temperature", "must be in"),
        ({"messages": user, "stop": [""]}, 400, "stop", "'stop' must be"),
        ([1, 2], 400, None, "JSON object"),
        (b"[" * 100_000, 400, None, "not valid JSON"),  # nested too deep for the parser: RecursionError
        (b'{"messages": "' + b"x" * (2 << 20) + b'"}', 413, None, "exceeds 2097152 bytes"),
        ({"messages": user}, 415, None, "must be application/json", {"Content-Type": "text/plain"}),  # CSRF
        ({"messages": user, "seed": -1}, 400, "seed", "must be in [0, 4294967295]"),
        ({"messages": user, "seed": 2**32}, 400, "seed", "must be in [0, 4294967295]"),
        ({"messages": user, "stream_options": 5}, 400, "stream_options", "must be an object"),
        ({"messages": user, "stream": True, "stream_options": "x"}, 400, "stream_options", "must be an object"),
        ({"messages": user, "stream": "yes"}, 400, "stream", "true or false"),
        ({"messages": user, "n": True}, 400, "n", "only 'n': 1"),  # True == 1 in Python: not here
        ({"messages": user, "n": 2}, 400, "n", "only 'n': 1"),
        ({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
        ({"messages": user, "logprobs": True}, 400, "logprobs", "not supported"),
        ({"messages": user, "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"messages": user, "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ]
    # Accepted alongside every good request: a null stream (the default, not streamed), the fields ignored on
    # purpose, and unsupported fields that ask for nothing.
    ok_body = {"messages": [{"role": "user", "content": qa[0][0]}], "temperature": 0, "stream": None, "n": 1,
               "model": "gpt-4o", "user": "u-1", "store": False, "logprobs": False, "tools": [], "presence_penalty": 0}
    for body, status, param, fragment, *headers in cases:
        got_status, got = request(port, "POST", COMPLETIONS, body, *headers)
        assert got_status == status, (body, got)
        assert got["error"]["type"] == "invalid_request_error" and got["error"]["param"] == param, got
        assert fragment in got["error"]["message"], got
        ok_status, ok = request(port, "POST", COMPLETIONS, ok_body)
        assert ok_status == 200 and ok["choices"][0]["message"]["content"] == qa[0][1], ok
    assert request(port, "GET", "/v1/nothing")[0] == 404


def test_cli_bad_input_fails_fast(tmp_path):
    for args, fragment in [(["--adapter", tmp_path / "missing"], "does not exist"),
                           (["--model_name_or_path", "x", "--port", "0"], "--port"),
                           (["--model_name_or_path", "x", "--api_key", ""], "--api_key"),
                           # headers are latin-1 bytes: a key outside ASCII could never be sent, so never match
                           (["--model_name_or_path", "x", "--api_key", "clé-secrète"], "printable ASCII"),
                           (["--model_name_or_path", "x", "--api_key", "密钥"], "printable ASCII"),
                           (["--model_name_or_path", "x", "--repetition_penalty", 0], "--repetition_penalty")]:
        assert_one_error_line(run_script(SERVE, *args), fragment)


def assert_one_error_line(proc, fragment):
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and fragment in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_port_in_use_fails_before_loading_the_model():
    with socket.create_server(("127.0.0.1", 0)) as busy:  # listening, as another server would be
        port = busy.getsockname()[1]
        # The model name does not exist: the port is checked before anything is loaded.
        proc = run_script(SERVE, "--model_name_or_path", "no/such-model", "--port", port, timeout=60)
    assert_one_error_line(proc, f"port {port} on 127.0.0.1 is in use; pass --port")


def test_benchmark_serve_prints_its_table(tiny_model_dir):
    """A smoke run of benchmark_serve.py: its table has both sides and the ratio, for TTFT and tokens/s (the
    figures themselves are not checked: the tiny random model on a shared CPU measures the code path only)."""
    proc = run_script("phase2_lora/benchmark_serve.py", "--model_name_or_path", tiny_model_dir,
                      "--max_tokens", 8, "--repeats", 1, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, header, rule, *rows, overhead = proc.stdout.strip().splitlines()
    assert model.startswith(f"model {tiny_model_dir.name} on cpu") and "median of 1" in model
    assert header == "| | direct generate() | API, streamed | API / direct |" and rule == "|---|---|---|---|"
    number = r"\d+(\.\d+)?"
    assert re.fullmatch(rf"\| time to first token \| {number} ms \| {number} ms \| {number} \|", rows[0]), rows
    assert re.fullmatch(rf"\| tokens/s \| {number} \| {number} \| {number} \|", rows[1]) and len(rows) == 2, rows
    assert overhead.startswith("overhead: TTFT ") and "tokens/s" in overhead


# ---------------------------------------------------------------- API key, client disconnect (base model: never stops)

def test_api_key_and_a_disconnected_client_stops_generation(tiny_model_dir, tmp_path):
    with live_server(tmp_path, "--model_name_or_path", tiny_model_dir, "--api_key", API_KEY) as (port, log):
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert request(port, "GET", "/v1/models")[0] == 401
        status, body = request(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert request(port, "GET", "/v1/models", headers=auth)[1]["data"][0]["id"] == tiny_model_dir.name
        assert request(port, "GET", "/", raw=True)[0] == 200  # the page itself is public; it asks for the key

        # The untrained base rambles on this question: its whole greedy answer first, for reference.
        body = {"messages": [{"role": "user", "content": "LoRA 是什么？"}], "max_tokens": 900, "temperature": 0}
        full = request(port, "POST", "/v1/chat/completions", body, headers=auth)[1]["usage"]["completion_tokens"]
        assert full >= 50
        # The same request streamed: hang up after the first piece of the answer.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json", **auth})
        response = conn.getresponse()
        assert response.status == 200
        while b'"delta":{"content":"' not in response.fp.readline():  # the role event has "content":"" too
            pass
        response.close()  # the response holds the socket too
        conn.close()
        deadline = time.monotonic() + 60
        while not (gone := re.search(r"client gone: generation stopped after (\d+) tokens", log.read_text())):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert int(gone[1]) < full  # stopped, not run to its end
        status, reply = request(port, "POST", "/v1/chat/completions", {**body, "max_tokens": 5}, headers=auth)
        assert status == 200 and reply["usage"]["completion_tokens"] == 5  # the model is free again


# ---------------------------------------------------------------- the chat page in a real browser

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def high_fd(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ending in NUL on fds 3 and 4), so the test needs no websocket library, selenium or driver binary."""

    def __init__(self, exe, profile):
        to_chrome, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # The child's ends move above fd 9 first: `3<&4 4>&3` would scramble them if they were 3 or 4 already
        # (and bash, not sh, does the redirection: dash reads single-digit fds only).
        to_chrome, from_chrome_w = (high_fd(fd) for fd in (to_chrome, from_chrome_w))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome_w}',
                                      exe, *flags], pass_fds=(to_chrome, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome_w)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method, timeout=60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            assert select.select([self.from_chrome], [], [], max(0.0, deadline - time.monotonic()))[0], method
            self.buffer += os.read(self.from_chrome, 1 << 20)

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=900, height=620, deviceScaleFactor=1, mobile=False)

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


RECORD_UPDATES = """window.updates = [];
new MutationObserver(() => {  // every text the newest answer bubble shows, in order
  const all = document.querySelectorAll('.assistant .msg'), text = all.length ? all[all.length - 1].textContent : '';
  if (text && window.updates[window.updates.length - 1] !== text) window.updates.push(text);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"""


RECORD_BODIES = """window.bodies = [];  // every request body the page sends, parsed
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (init?.body) window.bodies.push(JSON.parse(init.body));
  return realFetch(url, init);
};"""

ON_FIRST_PIECE = """new MutationObserver((_, observer) => {
  const pending = document.querySelector('.assistant .msg.pending');
  if (pending && pending.textContent) { observer.disconnect(); ACTION }
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"""


def on_first_piece(browser, action: str) -> None:
    """Run the JS `action` in the same task that shows the first piece of the next answer: while it streams."""
    browser.js(ON_FIRST_PIECE.replace("ACTION", action))


def type_and_wait(browser, text) -> list[str]:
    """Type a message, press Enter, wait for the answer; returns the texts the answer bubble showed over time."""
    browser.js("window.updates = []; document.getElementById('input').focus()")
    browser.call("Input.insertText", text=text)
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    n = browser.js("document.querySelectorAll('.assistant .msg').length")
    browser.wait_for(f"document.querySelectorAll('.stats').length >= {n}")  # shown when the answer is complete
    return browser.js("window.updates")


def prompt_tokens_logged(log) -> list[int]:
    return [int(n) for n in re.findall(r": (\d+) prompt \+", log.read_text())]


@pytest.fixture
def page(server, tmp_path):
    """The chat page in a fresh headless Chromium, the model list loaded, every request body recorded."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        browser.open(f"http://127.0.0.1:{server[0]}/")
        browser.wait_for("document.getElementById('model').textContent.includes('+')")
        browser.js(RECORD_BODIES)
        yield browser
    finally:
        browser.close()


def test_browser_chat_page_streams_the_trained_answer(page, server, qa, trained_adapter):
    browser, log = page, server[1]
    assert trained_adapter.name in browser.js("document.getElementById('model').textContent")
    browser.js(RECORD_UPDATES)
    updates = type_and_wait(browser, qa[0][0])
    assert updates[-1] == qa[0][1]  # the trained answer
    assert len(updates) > 1 and all(qa[0][1].startswith(u) for u in updates)  # it grew piece by piece
    before = prompt_tokens_logged(log)[-1]
    second = type_and_wait(browser, qa[1][0])[-1]  # multi-turn: the page sends the first turn along
    assert second and prompt_tokens_logged(log)[-1] > before + len(qa[1][0]) // 2
    assert browser.js("turns.length") == 4
    if os.environ.get("SERVE_SCREENSHOT"):
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (REPO / os.environ["SERVE_SCREENSHOT"]).write_bytes(png)
    browser.js("document.getElementById('clear').click()")
    assert browser.js("turns.length") == 0 and browser.js("document.querySelectorAll('.msg').length") == 0
    assert type_and_wait(browser, qa[1][0])[-1] == qa[1][1]  # a fresh one-turn chat again


def texts(browser, selector: str) -> list[str]:
    return browser.js(f"[...document.querySelectorAll('{selector}')].map(e => e.textContent)")


def test_browser_enter_while_an_answer_streams_queues_the_message(page, qa):
    """Enter during an answer sends the next message once the answer is done; it does not stop the answer."""
    on_first_piece(page, f"""const input = document.getElementById('input');
        input.value = {json.dumps(qa[1][0])};
        input.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true}}));""")
    type_and_wait(page, qa[0][0])
    assert texts(page, ".assistant .msg")[0] == qa[0][1] and "stopped" not in texts(page, ".stats")[0]
    page.wait_for("document.querySelectorAll('.stats').length == 2")  # the queued message's answer
    assert page.js("bodies.at(-1).messages") == [{"role": "user", "content": qa[0][0]},
                                                 {"role": "assistant", "content": qa[0][1]},
                                                 {"role": "user", "content": qa[1][0]}]


def test_browser_clear_while_an_answer_streams_forgets_it(page, qa):
    """The aborted answer's handler must not put its turn back into the new conversation: the next request
    carries only the new turn."""
    on_first_piece(page, "document.getElementById('clear').click();")
    page.js(f"document.getElementById('input').value = {json.dumps(qa[2][0])}")
    page.js("document.getElementById('send').click()")
    page.wait_for("document.getElementById('empty')?.textContent.includes('cleared') && "
                  "!document.querySelector('.pending')")
    type_and_wait(page, qa[0][0])
    assert page.js("bodies.at(-1).messages") == [{"role": "user", "content": qa[0][0]}]  # the new turn only
    assert page.js("turns.length") == 2
