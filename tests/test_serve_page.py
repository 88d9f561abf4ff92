"""serve.py's chat page in a real headless Chromium (driven over the DevTools protocol through a pipe: no extra
packages), against the live server of tests/test_serve.py (its `server` fixture: the tiny Qwen2 + the trained
adapter): the trained answer streams in piece by piece, the page sends the history along, Clear during an answer
forgets it, and Enter during an answer queues the next message.

The README's picture (docs/phase2_serve_page.png) is this test's screenshot:
    SERVE_SCREENSHOT=docs/phase2_serve_page.png python -m pytest tests/test_serve_page.py -k browser_chat_page
"""

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time

import pytest
import test_serve
from conftest import REPO

server, qa = test_serve.server, test_serve.qa  # its fixtures: the live server (one per module), the questions
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
