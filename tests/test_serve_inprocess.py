"""serve.py's parts in this process. With a stubbed model: a generation that fails to start, or runs on after its
client left, holds the model lock exactly as long as the model runs. On the untrained tiny model (the app under
uvicorn in a thread): the Host-header check against DNS rebinding, tokenising off the event loop, and a chat
template's error as a 400.
"""

import json
import sys

import pytest
from conftest import REPO
from test_serve import COMPLETIONS, request

sys.path.insert(0, str(REPO / "phase2_lora"))


# ---------------------------------------------------------------- the model lock, in this process with a stubbed model

def stub_server():
    """A serve.Server with no model loaded: only the locking around Generation is under test."""
    import asyncio
    import threading

    import serve
    from serve_api import ChatRequest

    server = object.__new__(serve.Server)
    server.model = server.tokenizer = None
    server.lock, server.running, server.count_lock = asyncio.Lock(), 0, threading.Lock()
    return server, ChatRequest([], 1, 0.0, 1.0, (), None, False, False)


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
    from serve_api import host_allowed

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
    assert host_allowed("192.168.1.5:8000", "0.0.0.0") and host_allowed("[fe80::1]:8000", "::")
    assert not host_allowed("evil.example:8000", "0.0.0.0") and host_allowed("gpu-box:80", "gpu-box")


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
