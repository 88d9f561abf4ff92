"""serve.py, live on a free localhost port, serving the tiny Qwen2 + the adapter trained by the `trained_adapter`
fixture: the official `openai` client gets the trained answers, streamed text equals non-streamed text,
concurrent requests get the answers they get alone, every bad request gets an OpenAI-style 4xx JSON error and
the server keeps serving, --api_key is enforced, and a client that disconnects stops its generation.
The chat page in a real browser: tests/test_serve_page.py; serve.py's parts in this process:
tests/test_serve_inprocess.py.
"""

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, free_port, persona_records, run_script, user_turn

SERVE = "phase2_lora/serve.py"
COMPLETIONS = "/v1/chat/completions"
N_PROMPTS = 3
API_KEY = "test-secret"


@contextlib.contextmanager
def live_server(tmp_path, *args):
    """serve.py on a free 127.0.0.1 port; yields (port, path of its stderr log). Stopped on exit."""
    port = free_port()
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
