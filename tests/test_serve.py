"""serve.py, the OpenAI-compatible server, run in this process on a free port with tiny random mPLUG-Owl and
mPLUG-Owl2 checkpoints written here. Through the real openai client: the answers equal owl.py's (greedy and seeded,
streamed and not, with an image as a data URL), usage, the model list, errors as the client's exceptions, 503 when
the queue is full. Through raw HTTP: the SSE framing, a failure mid-stream, a dropped stream, --media-dir, and a few
hundred bad requests. And the command line: --help, one-sentence failures, `listening on`, Ctrl-C."""
import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

import owl
import serve
from conftest import tiny_owl, write_huge_png
from test_owl2 import make_image, tiny_owl2

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
QUESTION = "What is in the picture?"
GREEDY = dict(temperature=0, max_tokens=12)


# --- servers and helpers ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tokenizer_model, tmp_path_factory):
    """Two checkpoints (v1: 65 positions per image; Owl2: 17), a --media-dir with an image and a link out of it,
    images outside it, and images the server must refuse."""
    d = tmp_path_factory.mktemp("serve")
    tiny_owl(tokenizer_model, seed=1).save_pretrained(d / "owl-v1")
    tiny_owl2(tokenizer_model).save_pretrained(d / "owl2")
    (d / "media").mkdir()
    make_image(0, (40, 28)).save(d / "media" / "img0.png")
    make_image(1, (23, 37)).save(d / "img1.png")
    (d / "media" / "link.png").symlink_to(d / "img1.png")
    Image.new("RGB", (1001, 1000), "white").save(d / "big.png")  # over the servers' --max-pixels of 1 000 000
    write_huge_png(d / "huge.png", 20000, 20000)  # 400 megapixels in 70 bytes
    return d


@contextlib.contextmanager
def running(*flags):
    """serve.py's server with these flags, on a free port, serving from a thread."""
    server = serve.make_server(serve.build_parser().parse_args(["--port", "0", "--max-pixels", "1000000",
                                                                *map(str, flags)]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def v1(files):
    with running("--checkpoint", files / "owl-v1", "--api-key", KEY, "--max-queue", 1, "--max-body-mb", 1,
                 "--media-dir", files / "media") as server:
        yield server


@pytest.fixture(scope="module")
def owl2(files):
    with running("--checkpoint", files / "owl2") as server:
        yield server


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=key, max_retries=0,
                         timeout=60)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def ask(question=QUESTION, *urls) -> list:
    """One user message: the text, then the images."""
    parts = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def streamed(c, **request) -> tuple:
    """The streamed answer's text and finish reason, joined from its chunks."""
    text, finish = [], None
    for chunk in c.chat.completions.create(stream=True, **request):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def owl_cli(*args) -> str:
    """owl.main in this process (`python owl.py ARGS`); its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = owl.main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


def raw(server, method, path, body=b"", headers=None, key=KEY):
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    try:
        conn.request(method, path, body=body, headers={**({"Authorization": f"Bearer {key}"} if key else {}),
                                                       **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_socket(server, data: bytes) -> bytes:
    """Bytes sent as they are; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def sse_events(body: bytes) -> list:
    """The data of each server-sent event, checking the framing: `data: ...` lines, each ended by a blank line."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text[:2000]
    return [e[len("data: "):] for e in events]


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "owl", "messages": ask(), **GREEDY, **fields}).encode()


# --- answers through the openai client -------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["v1", "owl2"])
def test_the_answer_equals_owl_py_greedy_and_seeded_streamed_and_not(which, files, request):
    server, checkpoint = request.getfixturevalue(which), files / ("owl-v1" if which == "v1" else "owl2")
    c, image = client(server), files / "media" / "img0.png"
    cli = owl_cli("--checkpoint", checkpoint, "--image", image, "--prompt", QUESTION, "--temperature", 0,
                  "--max-new-tokens", 12)
    assert cli.endswith("\n") and len(cli) > 1
    messages = ask(QUESTION, data_url(image))
    answer = c.chat.completions.create(model="any name", messages=messages, **GREEDY)
    assert answer.choices[0].message.content == cli[:-1]
    assert answer.choices[0].finish_reason == "length"  # the tiny models never choose EOS
    assert answer.model == server.name and answer.id.startswith("chatcmpl-")
    assert streamed(c, model="x", messages=messages, **GREEDY) == (cli[:-1], "length")
    # sampled with a seed: the sampling fields the client sets, and, unset, the model's own defaults (as owl.py)
    for flags, fields in (([], {}), (["--temperature", 1.5, "--top-k", 20, "--top-p", 0.9],
                                     dict(temperature=1.5, top_p=0.9, extra_body={"top_k": 20}))):
        cli = owl_cli("--checkpoint", checkpoint, "--image", image, "--prompt", QUESTION, "--seed", 7,
                      "--max-new-tokens", 12, *flags)
        request = dict(model="x", messages=messages, seed=7, max_completion_tokens=12, **fields)
        assert c.chat.completions.create(**request).choices[0].message.content == cli[:-1]
        assert streamed(c, **request)[0] == cli[:-1]


def test_usage_counts_tokens_per_image_for_each_image(v1, files):
    c, images = client(v1), [files / "media" / "img0.png", files / "img1.png"]
    assert v1.model.cfg.tokens_per_image == 65
    for n in (0, 2):
        cli = json.loads(owl_cli("--checkpoint", files / "owl-v1", "--prompt", QUESTION, "--temperature", 0,
                                 "--max-new-tokens", 12, "--json", *[a for i in images[:n] for a in ("--image", i)]))
        assert cli["image_tokens"] == 65 * n
        usage = c.chat.completions.create(model="x", messages=ask(QUESTION, *map(data_url, images[:n])),
                                          **GREEDY).usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (cli["prompt_tokens"], cli["generated_tokens"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        chunks = list(c.chat.completions.create(model="x", messages=ask(QUESTION, *map(data_url, images[:n])),
                                                stream=True, stream_options={"include_usage": True}, **GREEDY))
        assert chunks[-1].choices == [] and chunks[-1].usage == usage


@pytest.mark.parametrize("which", ["v1", "owl2"])
def test_a_conversation_is_written_in_the_models_template(which, files, request, monkeypatch):
    """System, user (image, question), assistant, user (question, image): the prompt the worker gets, against the
    template written out here by hand, and the images in the order of their turns."""
    server = request.getfixturevalue(which)
    seen = []
    real = server.model.generate

    def recording(ids, pixels=None, sampling=None, **kw):
        seen.append((ids, pixels))
        return real(ids, pixels, sampling, **kw)

    monkeypatch.setattr(server.model, "generate", recording)
    img0, img1 = files / "media" / "img0.png", files / "img1.png"
    turns = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img0)}},
                                          {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": "A red cat."},
             {"role": "user", "content": ask("Which one is bigger?", data_url(img1))[0]["content"]}]
    c = client(server)
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        c.chat.completions.create(model="x", messages=messages, **GREEDY)
    if which == "v1":
        rest = ("\nHuman: <image>\nHuman: What is it?\nAI: A red cat.\nHuman: <image>\nHuman: Which one is bigger?"
                "\nAI: ")
        expected = [owl.SYSTEM + rest, "Be brief." + rest]
    else:
        rest = "USER: <|image|>What is it? ASSISTANT: A red cat.</s>USER: <|image|>Which one is bigger? ASSISTANT:"
        expected = [rest, "Be brief. " + rest]
    assert [ids for ids, _ in seen] == [server.model.prompt_ids(text) for text in expected]
    pixels = torch.stack([server.model.image_transform(owl.read_image(str(p))) for p in (img0, img1)])
    assert all(torch.equal(p, pixels) for _, p in seen)


def test_models_health_and_the_chat_page(v1, monkeypatch, tmp_path):
    models = client(v1).models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("owl-v1", "model", "owl")]
    assert isinstance(models[0].created, int)
    assert raw(v1, "GET", "/health", key=None)[::2] == (200, b'{"status": "ok"}')
    monkeypatch.setattr(serve, "PAGE", tmp_path / "chat.html")
    status, _, body = raw(v1, "GET", "/", key=None)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    (tmp_path / "chat.html").write_text("<!doctype html><title>Owl</title>")
    status, headers, body = raw(v1, "GET", "/", key=None)
    assert (status, headers["content-type"], body) == (200, "text/html; charset=utf-8",
                                                      b"<!doctype html><title>Owl</title>")


def test_errors_arrive_as_the_clients_exceptions_with_the_servers_message(v1, files, monkeypatch):
    c = client(v1)
    cases = [(dict(n=2), "n", None), (dict(logprobs=True), "logprobs", None),
             (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", None),
             (dict(temperature=3), "temperature", None), (dict(max_tokens=513), "max_tokens", None),
             (dict(messages=ask(QUESTION, "https://example.com/a.png")), "messages[0].content[1].image_url.url", None),
             (dict(messages=ask(QUESTION, *[data_url(files / "img1.png")] * 8)), "messages", "context_length_exceeded")]
    for fields, param, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{"model": "x", "messages": ask(), **fields})
        assert (e.value.param, e.value.code, e.value.type) == (param, code, "invalid_request_error")
        assert e.value.body["message"] in e.value.message
    with pytest.raises(openai.BadRequestError, match="fetches no URLs"):
        c.chat.completions.create(model="x", messages=ask(QUESTION, "http://example.com/cat.png"))
    with pytest.raises(openai.BadRequestError, match=r"is \d+ tokens long, more than the context of 512 tokens"):
        c.chat.completions.create(model="x", messages=ask("Hi", *[data_url(files / "img1.png")] * 8))
    with pytest.raises(openai.AuthenticationError, match="incorrect API key") as e:
        client(v1, key="sk-wrong").models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(v1, key="sk-wrong").chat.completions.create(model="x", messages=ask())
    status, headers, body = raw(v1, "POST", "/v1/chat/completions", chat_body(), key=None)  # no key at all
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"

    def failing(*args, **kwargs):
        raise RuntimeError("the secret internals")
        yield

    monkeypatch.setattr(v1.model, "generate", failing)
    with pytest.raises(openai.InternalServerError, match=r"the model failed while answering \(RuntimeError\)") as e:
        c.chat.completions.create(model="x", messages=ask())
    assert "secret" not in str(e.value.body) and e.value.type == "server_error"
    with pytest.raises(openai.InternalServerError, match="the model failed"):  # no text yet: a plain 500, streamed too
        streamed(c, model="x", messages=ask())
    monkeypatch.undo()
    assert c.chat.completions.create(model="x", messages=ask(), **GREEDY).choices[0].message.content


def test_a_full_queue_answers_503_with_retry_after_and_health_answers_meanwhile(v1, monkeypatch):
    """The v1 server lets one request wait (--max-queue 1) while one runs: the third is refused at once."""
    c = client(v1)
    expected = c.chat.completions.create(model="x", messages=ask(), **GREEDY).choices[0].message.content
    entered, gate = threading.Event(), threading.Event()
    real = v1.model.generate

    def held(*args, **kwargs):
        entered.set()
        gate.wait(60)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(v1.model, "generate", held)
    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(c.chat.completions.create, model="x", messages=ask(), **GREEDY)
            assert entered.wait(30)
            second = pool.submit(c.chat.completions.create, model="x", messages=ask(), **GREEDY)
            deadline = time.monotonic() + 30
            while v1.worker.jobs.qsize() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            start = time.monotonic()
            assert raw(v1, "GET", "/health")[0] == 200 and c.models.list().data[0].id == "owl-v1"
            with pytest.raises(openai.InternalServerError, match="the server is busy") as e:
                c.chat.completions.create(model="x", messages=ask(), **GREEDY)
            assert time.monotonic() - start < 5 and not first.done()
            assert (e.value.status_code, e.value.code, e.value.response.headers.get("retry-after")) == \
                (503, "queue_full", "1")
        finally:
            gate.set()
        assert [f.result().choices[0].message.content for f in (first, second)] == [expected, expected]


# --- raw HTTP --------------------------------------------------------------------------------------------------------

def test_the_stream_is_server_sent_events_with_one_id_a_usage_chunk_and_done(v1):
    expected = client(v1).chat.completions.create(model="x", messages=ask(), **GREEDY).choices[0].message.content
    status, headers, body = raw(v1, "POST", "/v1/chat/completions",
                                chat_body(stream=True, stream_options={"include_usage": True}))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert {(ch["id"], ch["created"], ch["object"], ch["model"]) for ch in chunks} == \
        {(chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk", "owl-v1")}
    first, *content, final, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert content and all(ch["choices"][0]["finish_reason"] is None and list(ch["choices"][0]["delta"]) == ["content"]
                           for ch in content)
    assert "".join(ch["choices"][0]["delta"]["content"] for ch in content) == expected
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    # without stream_options, no usage chunk
    assert len(sse_events(raw(v1, "POST", "/v1/chat/completions", chat_body(stream=True))[2])) == len(events) - 1


def test_a_stop_string_ends_the_answer_early_and_is_cut_out(v1):
    c = client(v1)
    full = c.chat.completions.create(model="x", messages=ask(), temperature=0, max_tokens=24).choices[0].message.content
    k = next(i for i in range(len(full) // 3, len(full)) if "\ufffd" not in full[i: i + 2] and full[i: i + 2].strip())
    stop = full[k: k + 2]
    expected = full[:full.index(stop)]
    answer = c.chat.completions.create(model="x", messages=ask(), temperature=0, max_tokens=24,
                                       stop=["never said", stop])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (expected, "stop")
    assert answer.usage.completion_tokens < 24  # generation stopped there, not only the text
    assert streamed(c, model="x", messages=ask(), temperature=0, max_tokens=24, stop=stop) == (expected, "stop")


def test_a_failure_mid_stream_sends_an_error_event_then_done(v1, monkeypatch):
    real = v1.model.generate

    def failing(*args, **kwargs):
        tokens = real(*args, **kwargs)
        for _ in range(4):
            yield next(tokens)
        tokens.close()
        raise RuntimeError("the secret internals")

    monkeypatch.setattr(v1.model, "generate", failing)
    status, _, body = raw(v1, "POST", "/v1/chat/completions", chat_body(stream=True))
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[1])["choices"][0]["delta"]["content"]  # some text came before the failure
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert b"secret" not in body and b"Traceback" not in body
    monkeypatch.undo()
    assert raw(v1, "POST", "/v1/chat/completions", chat_body())[0] == 200


def test_a_dropped_stream_stops_within_one_token_and_frees_the_worker(v1, monkeypatch):
    c = client(v1)
    expected = c.chat.completions.create(model="x", messages=ask(), **GREEDY).choices[0].message.content
    sock = socket.create_connection(("127.0.0.1", v1.server_address[1]), timeout=30)
    made, started = [], threading.Event()
    real = v1.model.generate

    def counting(*args, **kwargs):
        started.set()
        for i, token in enumerate(real(*args, **kwargs)):
            if i == 3:  # the client leaves while this token is being made
                sock.close()
                time.sleep(0.05)
            made.append(token)
            yield token

    monkeypatch.setattr(v1.model, "generate", counting)
    body = chat_body(stream=True, max_tokens=400)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert started.wait(30)
    start = time.monotonic()
    answer = c.chat.completions.create(model="x", messages=ask(), **GREEDY)  # waits behind the dropped one
    assert answer.choices[0].message.content == expected and time.monotonic() - start < 30
    assert 4 <= len(made) - 12 <= 5  # tokens 0-3, at most one more; then the 12 of the answer above


def test_media_dir_reads_files_inside_it_and_nothing_else(v1, owl2, files):
    c = client(v1)
    inside = [data_url(files / "media" / "img0.png"), "img0.png", str(files / "media" / "img0.png"),
              (files / "media" / "img0.png").as_uri(), "sub/../img0.png"]
    answers = {c.chat.completions.create(model="x", messages=ask(QUESTION, url), **GREEDY).choices[0].message.content
               for url in inside}
    assert len(answers) == 1
    outside = ["../img1.png", str(files / "img1.png"), (files / "img1.png").as_uri(), "link.png",
               "../media/../img1.png",
               "file://" + str(files / "media") + "/%2E%2E/img1.png", "/etc/passwd"]
    for url in outside:
        with pytest.raises(openai.BadRequestError, match="is outside --media-dir"):
            c.chat.completions.create(model="x", messages=ask(QUESTION, url), **GREEDY)
    with pytest.raises(openai.BadRequestError, match="missing.png is not a file in --media-dir"):
        c.chat.completions.create(model="x", messages=ask(QUESTION, "missing.png"), **GREEDY)
    with pytest.raises(openai.BadRequestError, match="local image paths are off"):
        client(owl2).chat.completions.create(model="x", messages=ask(QUESTION, str(files / "media" / "img0.png")))


def bad_requests(files) -> list:
    """(method, path, body, headers, key) of requests that must each get a 4xx error object."""
    good = chat_body().decode()
    image = data_url(files / "img1.png")
    png = (files / "img1.png").read_bytes()
    b64 = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()
    with_message = lambda content, role="user": {"messages": [{"role": role, "content": content}]}
    bodies = [good[:k] for k in range(0, len(good) - 1, 7)]  # truncated JSON
    bodies += ["[]", '"x"', "1", "null", "{", '{"messages": NaN}', '{"messages": ' + "[" * 100000 + "]" * 100000 + "}",
               b"\xff\xfe{}", '{"messages": "\\ud800"}']
    bodies.append('{"model": "x", "temperature": 0}')  # no messages
    fields = [{"messages": None}, {"messages": []}, {"messages": "Hi"}, {"messages": [1]},
              {"messages": [{"role": "bot", "content": "Hi"}]}, {"messages": [{"role": "user"}]},
              with_message(5), with_message([{"type": "text"}]), with_message([{"type": "text", "text": 5}]),
              with_message([{"type": "image_url"}]), with_message([{"type": "image_url", "image_url": {"url": 5}}]),
              with_message([{"type": "input_audio"}]), with_message(["Hi"]), with_message("Hi", "assistant"),
              with_message("Hi", "system"),
              with_message([{"type": "image_url", "image_url": {"url": image}}], "system"),
              {"messages": ask() + [{"role": "assistant", "content": "A cat."}]},
              with_message("<image> Hi"), with_message("Hi \ud800")]
    fields += [{name: value} for name, values in {
        "max_tokens": [-1, 0, 10 ** 30, 1.5, "12", True, 513], "max_completion_tokens": [0, 10 ** 400, [12]],
        "temperature": [-1, 2.5, "hot", float("inf")], "top_p": [0, 1.5, -0.1, {}],
        "top_k": [-1, 1.5, 10 ** 40], "seed": [2 ** 64, -2 ** 63 - 1, "7", 1.5], "n": [2, 0, True, "1"],
        "tools": [[{"type": "function", "function": {"name": "f"}}]], "logprobs": [True, "yes"],
        "stop": [5, ["a"] * 5, [""], [1], ""], "stream": ["yes", 1], "stream_options": ["x", {"include_usage": 1}],
    }.items() for value in values]
    urls = ["data:image/png;base64,@@@@", "data:image/png,abc", "data:text/plain;base64,aGk=", "data:image/png;base64",
            b64(b"this is text, not a picture"), b64(png[: len(png) // 2]), b64((files / "huge.png").read_bytes()),
            b64((files / "big.png").read_bytes()), "http://127.0.0.1:1/x.png", "ftp://host/x.png", "", "../img1.png",
            "/etc/passwd", "data:image/png;base64,\u00e9\u00e9\u00e9\u00e9"]
    fields += [{"messages": ask(QUESTION, url)} for url in urls]
    fields.append({"messages": ask(QUESTION, *[image] * 8)})  # too many images for the context
    cases = [("POST", "/v1/chat/completions", b if isinstance(b, bytes) else b.encode(), {}, KEY) for b in bodies]
    cases += [("POST", "/v1/chat/completions", json.dumps({"model": "x", "messages": ask(), **f}).encode(), {}, KEY)
              for f in fields]
    cases += [("POST", "/v1/chat/completions", b"{" + b" " * (1 << 20) + b"}", {}, KEY),  # over --max-body-mb 1
              ("GET", "/v1/chat/completions", b"", {}, KEY), ("POST", "/v1/models", b"{}", {}, KEY),
              ("BREW", "/health", b"", {}, KEY), ("GET", "/nowhere", b"", {}, KEY),
              ("GET", "/v1/models", b"", {}, None),
              ("POST", "/v1/chat/completions", good.encode(), {}, "sk-wrong")]
    return cases


def test_bad_input_at_volume_gets_only_4xx_error_objects_and_leaves_the_server_well(v1, files, capsys):
    cases = bad_requests(files)
    socket_cases = [  # framing only a raw socket can send wrong
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"messages\": ",
        b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"]
    count, total = 0, 320
    for i in range(total):
        if i % 40 == 39:
            response = raw_socket(v1, socket_cases[(i // 40) % len(socket_cases)])
            head, _, body = response.partition(b"\r\n\r\n")
            status = int(head.split()[1]) if head.startswith(b"HTTP/1.") else 400
            body = body if head.startswith(b"HTTP/1.") else response  # http.server answers HTTP/0.9 without headers
        else:
            method, path, body, headers, key = cases[i % len(cases)]
            status, _, body = raw(v1, method, path, body, headers, key)
        error = json.loads(body)["error"]
        assert 400 <= status < 500, (i, status, error)
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert isinstance(error["message"], str) and error["message"], error
        count += 1
    assert count == total and len(cases) > 100
    answer = client(v1).chat.completions.create(model="x", messages=ask(QUESTION, data_url(files / "img1.png")),
                                                **GREEDY)
    cli = owl_cli("--checkpoint", files / "owl-v1", "--image", files / "img1.png", "--prompt", QUESTION,
                  "--temperature", 0, "--max-new-tokens", 12)
    assert answer.choices[0].message.content == cli[:-1] and v1.worker.jobs.qsize() == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and " 500 " not in err and " 413 " in err


# --- the command line ------------------------------------------------------------------------------------------------

def serve_main(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = serve.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_help_names_every_flag_and_a_bad_start_is_one_sentence_and_exit_2(v1, files, tmp_path):
    code, out, _ = serve_main("--help")
    assert code == 0
    for flag in ("--checkpoint", "--host", "--port", "--model-name", "--api-key", "--max-queue", "--max-new-tokens",
                 "--max-body-mb", "--max-pixels", "--media-dir", "--dtype", "--device"):
        assert flag in out
    (tmp_path / "empty").mkdir()
    for args, words in (((tmp_path / "missing",), "cannot load checkpoint"),
                        ((tmp_path / "empty",), "has no config.json"),
                        ((files / "owl-v1", "--port", v1.server_address[1]), "cannot listen on 127.0.0.1"),
                        ((files / "owl-v1", "--media-dir", tmp_path / "nope"), "is not a folder"),
                        ((files / "owl-v1", "--max-queue", 0), "must be positive")):
        code, out, err = serve_main("--checkpoint", *args)
        lines = err.strip().splitlines()
        assert (code, out, len(lines)) == (2, "", 1) and words in lines[0] and "Traceback" not in err, err


def test_serve_py_says_where_it_listens_and_ctrl_c_ends_it_cleanly(files):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(files / "owl-v1"), "--port", "0",
                             "--model-name", "tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as in a terminal, even where the suite was started in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()
        port = int(re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"
        conn.request("POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=400))
        assert conn.getresponse().readline().startswith(b"data: ")  # Ctrl-C in the middle of an answer
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "" and "Traceback" not in err and "terminate" not in err, err
    assert err.rstrip().endswith("serve: stopped")
