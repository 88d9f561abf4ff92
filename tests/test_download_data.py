"""phase2_lora/download_data.py, run as a user runs it, against a local HTTP server on 127.0.0.1 that stands in for
GitHub, the Hugging Face hub and its mirrors: the network is never touched. Every failure must be one `error:`
line, exit code 2, and leave the output folder exactly as it was (no partial file, no temporary file)."""

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, run_script

SCRIPT = "phase2_lora/download_data.py"
RECORDS = 51_760  # the script's default --records, i.e. the real data set's size
HF_PATH = "/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json"


def alpaca_bytes(n: int = RECORDS, **extra) -> bytes:
    """A stand-in for alpaca_data_cleaned.json: n records of the real shape,
    indented like the upstream file (5 MB at the real size); `extra` adds fields to the last record."""
    rows = [{"instruction": f"Say {i}.", "input": "" if i % 3 else f"x{i}", "output": f"{i}"} for i in range(n)]
    rows[-1].update(extra)
    return json.dumps(rows, indent=4).encode()


GOOD = alpaca_bytes()


class Server(ThreadingHTTPServer):
    """Serves `routes` {path: body bytes} with status 200; other paths get 404. `short` paths announce a
    Content-Length 1000 bytes longer than what is sent, then close (a dropped connection); `stall` paths send
    half the body, set `half_sent` and wait for `release`. `hits` lists the paths asked for."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes, self.short, self.stall, self.hits = {}, set(), set(), []
        self.half_sent, self.release = threading.Event(), threading.Event()

    def url(self, path: str = "/alpaca.json") -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) + (1000 if self.path in self.server.short else 0)))
        self.end_headers()
        if self.path in self.server.stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.half_sent.set()
            self.server.release.wait(60)
            body = body[len(body) // 2:]
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def download(server, out_dir, body: bytes | None = None, *args, env=None):
    """Serve body (if given) at /alpaca.json and run the script on it; returns (process, the output path)."""
    if body is not None:
        server.routes["/alpaca.json"] = body
    out = out_dir / "alpaca_data_cleaned.json"
    proc = run_script(SCRIPT, "--url", server.url(), "--output", out, *args, timeout=60, env=env)
    return proc, out


def assert_failed(proc, out_dir, *expected: str, before: dict | None = None):
    """One error line naming what went wrong, exit 2, and the folder as it was `before` (default: empty)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert folder(out_dir) == (before or {}), "a failed download left files behind"


def folder(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()} if path.exists() else {}


def test_downloads_checks_and_moves_into_place(server, tmp_path):
    digest = hashlib.sha256(GOOD).hexdigest()
    proc, out = download(server, tmp_path / "data", GOOD, "--sha256", digest.upper())
    assert proc.returncode == 0, proc.stderr
    assert folder(out.parent) == {out.name: GOOD}  # the exact bytes, and no temporary file beside them
    assert f"{RECORDS:,} records" in proc.stdout and digest in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if "MiB/s" in line]
    assert len(progress) >= 5 and "(100%)" in progress[-1], proc.stderr  # stderr is a pipe: plain lines, no \r
    assert "\r" not in proc.stderr


def test_huggingface_source_honours_hf_endpoint(server, tmp_path):
    """--source huggingface fetches yahma/alpaca-cleaned from HF_ENDPOINT (a mirror such as hf-mirror.com)."""
    server.routes[HF_PATH] = GOOD
    out = tmp_path / "alpaca_data_cleaned.json"
    proc = run_script(SCRIPT, "--source", "huggingface", "--output", out, env={"HF_ENDPOINT": server.url("/")})
    assert proc.returncode == 0, proc.stderr
    assert server.hits == [HF_PATH] and out.read_bytes() == GOOD


def test_offline_fails_with_one_line_and_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused, as when offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "data" / "alpaca_data_cleaned.json"
    proc = run_script(SCRIPT, "--url", f"http://127.0.0.1:{port}/alpaca.json", "--output", out, timeout=60)
    assert_failed(proc, out.parent, "cannot download", "Connection refused", "HF_ENDPOINT=https://hf-mirror.com")


@pytest.mark.parametrize("body, args, expected", [
    (alpaca_bytes(5), [], "expected 51,760 records, got 5"),
    (GOOD, ["--sha256", "0" * 64], f"sha256 mismatch: expected {'0' * 64}, got {hashlib.sha256(GOOD).hexdigest()}"),
    (b"<html>Please log in to the Wi-Fi</html>", [], "is not JSON"),
    (b'{"instruction": "a", "input": "", "output": "b"}', [], "holds a JSON dict, not the list of records"),
    (alpaca_bytes(4, history=[]), ["--records", "4"], "record 3 of"),
    (alpaca_bytes(4, output=None), ["--records", "4"], "record 3 of"),
], ids=["count", "sha256", "html", "not-a-list", "extra-field", "null-output"])
def test_a_wrong_file_is_refused_and_not_written(server, tmp_path, body, args, expected):
    proc, out = download(server, tmp_path, body, *args)
    assert_failed(proc, tmp_path, expected)


def test_records_flag_accepts_another_size(server, tmp_path):
    body = alpaca_bytes(5)
    proc, out = download(server, tmp_path, body, "--records", "5")
    assert proc.returncode == 0 and out.read_bytes() == body, proc.stderr


def test_http_error_and_cut_short_download_write_nothing(server, tmp_path):
    proc, out = download(server, tmp_path)  # nothing served at /alpaca.json
    assert_failed(proc, tmp_path, "answered HTTP 404")
    server.short.add("/alpaca.json")
    proc, out = download(server, tmp_path, GOOD)
    assert_failed(proc, tmp_path, "was cut short", "of 5,")  # the connection closed before Content-Length bytes came


def test_ctrl_c_mid_download_leaves_nothing(server, tmp_path):
    server.routes["/alpaca.json"] = GOOD
    server.stall.add("/alpaca.json")
    cmd = [sys.executable, REPO / SCRIPT, "--url", server.url(), "--output", tmp_path / "alpaca_data_cleaned.json"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.half_sent.wait(30)
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size for p in tmp_path.glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first half is on disk: Ctrl-C comes in the middle of the download
    assert list(tmp_path.glob(".*.part")), "the download never started writing its temporary file"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted; nothing was written" in stderr, stderr
    assert "Traceback" not in stderr and folder(tmp_path) == {}


def test_an_existing_file_is_checked_not_downloaded_again(server, tmp_path):
    out = tmp_path / "alpaca_data_cleaned.json"
    out.write_bytes(GOOD)
    proc, _ = download(server, tmp_path, GOOD)
    assert proc.returncode == 0 and "already there and checks out" in proc.stdout, proc.stderr
    assert server.hits == []
    broken = GOOD[: len(GOOD) // 2]
    out.write_bytes(broken)
    proc, _ = download(server, tmp_path)
    assert_failed(proc, tmp_path, "exists but is not the expected file", "--force", before={out.name: broken})
    proc, _ = download(server, tmp_path, None, "--force", "--sha256", "f" * 64)  # a failed --force keeps the old file
    assert_failed(proc, tmp_path, "sha256 mismatch", before={out.name: broken})
    proc, _ = download(server, tmp_path, None, "--force")
    assert proc.returncode == 0 and folder(tmp_path) == {out.name: GOOD}, proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--url", "ftp://example.com/a.json"], "expected an http://, https:// or file:// URL"),
    (["--sha256", "abc"], "expected 64 hex digits"),
    (["--records", "-1"], "expected a whole number >= 0"),
])
def test_bad_flags_are_one_line(tmp_path, args, expected):
    proc = run_script(SCRIPT, *args, "--output", tmp_path / "a.json")
    assert_failed(proc, tmp_path, expected)
