"""chat.html in a real browser: headless Chromium, driven through chromedriver's W3C WebDriver HTTP API with urllib,
talking to the real serve.py (a subprocess on port 0) that answers from a tiny random v1 checkpoint written here.

- the page asks with a picked image at temperature 0 and shows exactly the answer the API gives for the same request
  (non-streaming, made with urllib); a second turn resends the whole conversation, the image still in the first turn;
- Stop ends a long answer: the page marks it done, and what it shows is the start of the full answer;
- what the page does with what a server may send (SSE cut anywhere, an error before or during the stream, markup in
  the text) is checked against scripted responses: window.fetch replaced in the page, the rest of it as it is.

Needs Debian's chromium and chromium-driver (`make test` installs them); without them the test fails, saying so.
docs/chat-page.png was drawn by this file, run as a script on `make demo`'s checkpoint:
    python tests/test_page.py --screenshot docs/chat-page.png --checkpoint runs/owl-tiny/stage2 \
        --image data/synth/images/h_00001.png --prompt "How many shapes are there?" \
        --prompt "What colour is the shape?" --prompt "Where is it?" --next-prompt "Describe the image."
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in the picture?"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the key of an element reference in WebDriver's JSON
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


# --- a WebDriver client: the few commands the test needs, over HTTP -----------------------------------------------

def http_json(url, body=None, method=None, headers=None, timeout=60):
    """(status, parsed JSON body) of a request; a 4xx/5xx answer is returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_browser():
    """Paths of chromium and chromedriver, or a failure that says how to install them."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail(f"tests/test_page.py needs Chromium and chromedriver, not found on PATH; install them with "
                    f"`{INSTALL}` (Debian; `make test` does this)", pytrace=False)
    return browser, driver


class Browser:
    """One headless Chromium session behind its own chromedriver process."""

    def __init__(self, width=900, height=700):
        browser, driver = find_browser()
        port = free_port()
        self.driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                if http_json(self.base + "/status", timeout=2)[1]["value"]["ready"]:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.driver.poll() is not None:
                self.driver.kill()
                raise AssertionError("chromedriver did not start")
            time.sleep(0.05)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}"]
        status, reply = http_json(self.base + "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": browser, "args": args}}}})
        if status != 200:
            self.driver.kill()
            raise AssertionError(f"chromedriver could not start {browser}: {reply['value'].get('message')}")
        self.session = f"{self.base}/session/{reply['value']['sessionId']}"
        try:  # --window-size is the window's outer size; make the page's viewport width x height
            inner = self.js("return [window.innerWidth, window.innerHeight]")
            self.cmd("POST", "/window/rect", {"width": 2 * width - inner[0], "height": 2 * height - inner[1]})
        except BaseException:
            self.quit()
            raise

    def cmd(self, method, path, body=None):
        status, reply = http_json(self.session + path, body if body is not None or method == "GET" else {}, method)
        if status != 200:
            raise AssertionError(f"WebDriver {method} {path}: {reply['value'].get('error')}: "
                                 f"{reply['value'].get('message')}")
        return reply["value"]

    def quit(self):
        try:
            http_json(self.session, method="DELETE", timeout=10)
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()

    def open(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click")

    def type(self, css, text, clear=True):
        """Text typed into an input as a user types it (for a file input: the paths of the files, one per line)."""
        el = self.find(css)
        if clear:
            self.cmd("POST", f"/element/{el}/clear")
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, *args, timeout=30, what=None):
        """Polls a script until it returns something truthy, and returns that."""
        deadline = time.time() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or script}")
            time.sleep(0.03)

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))


LAST_ANSWER = "[...document.querySelectorAll('#messages .message.assistant')].pop()"
LAST_QUESTION = "[...document.querySelectorAll('#messages .message.user')].pop()"
DONE = LAST_ANSWER + "?.dataset.done === 'true'"


def ask(b: Browser, prompt, images=(), temperature="0", max_tokens="24") -> dict:
    """Asks on the page as a user does (images picked, settings typed, Send clicked), waits until the answer is
    done, and returns what the page shows: {"text", "finish", "error"}."""
    if images:
        b.type("#images", "\n".join(map(str, images)), clear=False)
        b.wait("return document.querySelectorAll('#thumbs img').length === arguments[0]", len(images),
               what="the thumbnails")
    b.type("#temperature", temperature)
    b.type("#max-tokens", max_tokens)
    b.type("#prompt", prompt)
    n = b.js("return document.querySelectorAll('#messages .message.assistant').length")
    b.click("#send")
    b.wait("return document.querySelectorAll('#messages .message.assistant').length === arguments[0]", n + 1)
    b.wait("return " + DONE, timeout=30, what="data-done on the answer")
    return answer_shown(b)


def answer_shown(b: Browser) -> dict:
    return b.js(f"const a = {LAST_ANSWER};"
                "return {text: a.querySelector('.text').textContent, finish: a.dataset.finish || null,"
                "        error: a.querySelector('.error')?.textContent || null};")


# --- serve.py, on a tiny checkpoint -------------------------------------------------------------------------------

class Server:
    """`python serve.py --checkpoint DIR --port 0` in a subprocess; url is taken from its `listening on` line."""

    def __init__(self, checkpoint, *flags):
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint),
                                      "--port", "0", *flags], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     encoding="utf-8")
        self.log, self.url, self.ready = [], None, threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:  # read to the end, so the server never blocks on a full pipe
            self.log.append(line)
            if self.url is None and "listening on http://" in line:
                self.url = line.split("listening on ", 1)[1].split()[0].rstrip("/")
                self.ready.set()
        self.ready.set()

    def wait(self, timeout=120):
        if not self.ready.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError("serve.py did not start:\n" + "".join(self.log)[-3000:])
        return self

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def complete(self, messages, **settings) -> dict:
        """The API's answer to a request, non-streaming."""
        status, reply = http_json(self.url + "/v1/chat/completions", {"messages": messages, **settings})
        assert status == 200, reply
        return reply["choices"][0]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def files(tokenizer_model, tmp_path_factory):
    from conftest import tiny_owl

    d = tmp_path_factory.mktemp("page")
    tiny_owl(tokenizer_model, seed=1).save_pretrained(d / "ckpt")
    for i, size in enumerate([(40, 28), (23, 37)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def served(files):
    """The server and the browser, started side by side (each takes a few seconds)."""
    if not (ROOT / "serve.py").exists():
        pytest.fail("serve.py is missing", pytrace=False)
    server = Server(files / "ckpt")
    try:
        browser = Browser()
    except BaseException:
        server.stop()
        raise
    try:
        yield server.wait(), browser
    finally:
        browser.quit()
        server.stop()


@pytest.fixture
def page(served):
    """A fresh page (an empty conversation) in the module's browser."""
    server, b = served
    b.open(server.url + "/")
    b.wait("return document.readyState === 'complete' && !!document.getElementById('send')")
    return b


# --- the tests ----------------------------------------------------------------------------------------------------

def test_the_page_shows_the_api_answer_and_resends_the_conversation_with_its_image(served, page, files):
    server, b = served
    # pick two images, remove the second: only the first goes with the question
    b.type("#images", f"{files / 'img0.png'}\n{files / 'img1.png'}", clear=False)
    b.wait("return document.querySelectorAll('#thumbs img').length === 2", what="two thumbnails")
    b.click("#thumbs .thumb:last-child button")
    b.wait("return document.querySelectorAll('#thumbs img').length === 1", what="one thumbnail left")
    assert b.js("return document.querySelector('#thumbs img').alt") == "img0.png"

    first = ask(b, QUESTION)
    image = {"type": "image_url", "image_url": {"url": data_url(files / "img0.png")}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]
    expected = server.complete(messages, temperature=0, max_tokens=24)
    assert first == {"text": expected["message"]["content"], "finish": expected["finish_reason"], "error": None}
    assert first["text"]
    assert b.js("return document.querySelectorAll('#messages .message.user img').length") == 1
    assert b.js("return document.querySelectorAll('#thumbs img').length") == 0  # the picker is emptied

    # the second turn: the whole history is resent, the image in the turn it came with; the question's markup
    # is shown as text
    follow_up = "And <b>what</b> colour is it?"
    second = ask(b, follow_up, max_tokens="16")
    messages += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": follow_up}]
    expected = server.complete(messages, temperature=0, max_tokens=16)
    assert second == {"text": expected["message"]["content"], "finish": expected["finish_reason"], "error": None}
    assert b.js(f"return {LAST_QUESTION}.querySelector('.text').textContent") == follow_up
    assert b.js("return document.querySelectorAll('#messages b').length") == 0
    assert b.js("return [document.querySelector('#send').disabled, document.querySelector('#stop').disabled]") \
        == [False, True]


def test_stop_ends_a_long_answer_with_the_start_of_the_full_answer(served, page):
    server, b = served
    b.type("#temperature", "0")
    b.type("#max-tokens", "300")
    b.type("#prompt", "Tell me a long story.")
    b.click("#send")
    b.wait(f"return {LAST_ANSWER}?.querySelector('.text').textContent.length > 0 || {DONE}",
           what="the first words of the answer")
    assert b.js("return document.querySelector('#send').disabled") is True  # no second question while streaming
    b.click("#stop")
    b.wait("return " + DONE, timeout=20, what="data-done after Stop")
    shown = answer_shown(b)
    full = server.complete([{"role": "user", "content": "Tell me a long story."}], temperature=0, max_tokens=300)
    assert shown["error"] is None
    if shown["finish"] == "stopped":
        assert full["message"]["content"].startswith(shown["text"])
        assert len(shown["text"]) < len(full["message"]["content"])
    else:  # the whole answer came before Stop was clicked
        assert shown["text"] == full["message"]["content"]
    assert b.js("return [document.querySelector('#send').disabled, document.querySelector('#stop').disabled]") \
        == [False, True]


def test_a_request_the_server_refuses_shows_its_error_and_goes_back_in_the_box(served, page):
    server, b = served
    shown = ask(b, "Hello?", temperature="5")
    status, reply = http_json(server.url + "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "Hello?"}], "temperature": 5})
    assert status == 400 and shown["finish"] == "error" and shown["text"] == ""
    assert shown["error"] == f"Error 400 ({reply['error']['type']}): {reply['error']['message']}"
    assert b.js("return document.querySelector('#prompt').value") == "Hello?"
    shown = ask(b, "Hello?")  # the refused turn was left out: this is a conversation of one question
    expected = server.complete([{"role": "user", "content": "Hello?"}], temperature=0, max_tokens=24)
    assert shown == {"text": expected["message"]["content"], "finish": expected["finish_reason"], "error": None}


# Scripted responses for the page's fetch: each a list of chunks (strings, sent as UTF-8, or arrays of byte values,
# to cut a character in two) and a status. The page's own code does the rest.
FAKE_FETCH = """
const responses = arguments[0];
window.requests = [];
window.fetch = async (url, init) => {
  window.requests.push({url: String(url), headers: init.headers, body: JSON.parse(init.body)});
  const r = responses.shift();
  const enc = new TextEncoder();
  const chunks = r.chunks.map((c) => typeof c === "string" ? enc.encode(c) : new Uint8Array(c));
  const body = new ReadableStream({
    pull(controller) { chunks.length ? controller.enqueue(chunks.shift()) : controller.close(); },
  });
  return new Response(body, {status: r.status, headers: {"Content-Type": r.type}});
};
"""


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def test_the_page_reads_sse_cut_anywhere_and_shows_errors_as_text(page, files):
    b = page
    owl = "🦉".encode()  # four bytes
    head = ("data: " + json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) + "\r\n\r\n"
            + ": a comment\r\n" + sse({"choices": [{"delta": {"content": "<b>Hi</b> "}}]}).replace("\n", "\r\n"))
    chunks = [head[i:i + 5] for i in range(0, len(head), 5)]  # lines cut anywhere
    chunks += ['data: {"choices": [{"delta":\r',  # one event in two data lines, the CRLF between them cut in two
               '\ndata: {"content": "there "}}]}\r\n\r\n',
               'data: {"choices": [{"delta": {"content": "', list(b"x" + owl[:2]),  # a character cut in two
               list(owl[2:] + b'"}}]}\r'), "\r" + sse({"choices": [{"delta": {}, "finish_reason": "stop"}]}),  # CR, CR
               "data: [DONE]\n\n"]
    mid_error = [sse({"choices": [{"delta": {"content": "Half an "}}]}),
                 sse({"error": {"message": "out of <i>memory</i>", "type": "server_error", "param": None,
                                "code": None}}), "data: [DONE]\n\n"]
    bad_request = [json.dumps({"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error",
                                         "param": "max_tokens", "code": None}})]
    b.js(FAKE_FETCH, [{"status": 200, "type": "text/event-stream", "chunks": chunks},
                      {"status": 200, "type": "text/event-stream", "chunks": mid_error},
                      {"status": 400, "type": "application/json", "chunks": bad_request}])
    b.type("#api-key", "sekrit")

    shown = ask(b, "Hello", images=[files / "img1.png"])
    assert shown == {"text": "<b>Hi</b> there x🦉", "finish": "stop", "error": None}
    assert b.js("return document.querySelectorAll('#messages b, #messages i').length") == 0

    shown = ask(b, "Again")
    assert shown["text"] == "Half an " and shown["finish"] == "error"
    assert "out of <i>memory</i>" in shown["error"]
    assert b.js("return document.querySelector('#prompt').value") == "Again"  # back in the box to try again

    shown = ask(b, "Once more")
    assert shown["text"] == "" and shown["finish"] == "error"
    assert "400" in shown["error"] and "max_tokens must be at least 1" in shown["error"]
    assert b.js("return document.querySelectorAll('#messages b, #messages i').length") == 0

    requests = b.js("return window.requests")
    assert [r["url"] for r in requests] == ["v1/chat/completions"] * 3
    assert all(r["headers"]["Authorization"] == "Bearer sekrit" for r in requests)
    assert all(r["body"]["stream"] is True and r["body"]["temperature"] == 0 for r in requests)
    image = {"type": "image_url", "image_url": {"url": data_url(files / "img1.png")}}
    hello = {"role": "user", "content": [image, {"type": "text", "text": "Hello"}]}
    assert requests[0]["body"]["messages"] == [hello]
    answer = {"role": "assistant", "content": "<b>Hi</b> there x🦉"}
    assert requests[1]["body"]["messages"] == [hello, answer, {"role": "user", "content": "Again"}]
    # the failed turn is not resent
    assert requests[2]["body"]["messages"] == [hello, answer, {"role": "user", "content": "Once more"}]


# --- the README's picture -----------------------------------------------------------------------------------------

def screenshot(out, checkpoint, image, prompts, next_prompt="", max_tokens="64"):
    """Asks the prompts in turn (the first with the image), then picks the image again and types next_prompt
    without sending it, and saves what the page looks like (900 x 700)."""
    server = Server(checkpoint)
    b = Browser(900, 700)
    try:
        server.wait()
        b.open(server.url + "/")
        b.wait("return document.readyState === 'complete'")
        for i, prompt in enumerate(prompts):
            shown = ask(b, prompt, images=[image] if i == 0 else [], max_tokens=max_tokens)
            print(f"{prompt!r} -> {shown['text']!r}")
        b.type("#images", str(image), clear=False)  # a thumbnail waiting for the next question
        b.wait("return document.querySelectorAll('#thumbs img').length === 1")
        b.type("#prompt", next_prompt)
        b.screenshot(out)
    finally:
        b.quit()
        server.stop()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Save a screenshot of chat.html mid-conversation.")
    p.add_argument("--screenshot", required=True, help="the PNG to write")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, help="the image of the first question")
    p.add_argument("--prompt", action="append", help="a question, asked at temperature 0; repeatable")
    p.add_argument("--next-prompt", default="", help="typed into the box, not sent")
    a = p.parse_args()
    screenshot(a.screenshot, a.checkpoint, a.image, a.prompt or ["How many shapes are there?"], a.next_prompt)
