"""An OpenAI-compatible chat server for Owl (mPLUG-Owl and mPLUG-Owl2) on the standard library's http.server:

    python serve.py --checkpoint DIR        # POST http://127.0.0.1:8000/v1/chat/completions, the chat page at /

A request goes: Handler.dispatch (route, key, body) -> Handler.chat -> parse_chat (messages -> chat.Turns ->
chat.chat_prompt -> ids, every image decoded) -> Worker.submit (a bounded FIFO) -> Worker.answer (tokens -> settled
text) -> Handler.complete or Handler.stream. Each connection has a thread; one worker thread owns the model and
answers one request at a time, so /health and /v1/models answer during a generation. Bad input gets a 4xx error
object; a failure a 500, its traceback going to stderr only.
"""
import argparse
import base64
import contextlib
import hmac
import io
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional
from urllib.parse import unquote, urlsplit

import torch

import chat
import owl

PAGE = Path(__file__).resolve().with_name("chat.html")  # the chat page, read at each GET /
ROUTES = {"/": ("GET", "page"), "/health": ("GET", "health"), "/v1/models": ("GET", "models"),
          "/v1/chat/completions": ("POST", "chat")}
PIL_LOCK = threading.Lock()  # PIL's pixel limit is a global that image reading swaps: one reader at a time


class ApiError(Exception):
    """An answer in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One chat completion, checked and ready: the prompt ids, its images' pixels in prompt order, the sampling,
    and `events`, the worker's answer to the connection's thread: ("text", str)..., then ("done", (finish_reason,
    tokens)) or ("error", ApiError)."""
    ids: List[int]
    pixels: Optional[torch.Tensor]
    sampling: owl.Sampling
    stop: List[str]
    stream: bool
    include_usage: bool
    connection: Optional[socket.socket] = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def gone(self) -> bool:
        """Whether the client left. Asked before each token: a dropped request stops within one token, even while
        nothing is written to it (an EOF or a reset reads as ready with no byte)."""
        if self.cancelled.is_set() or self.connection is None:
            return self.cancelled.is_set()
        try:
            poll = select.poll()
            poll.register(self.connection, select.POLLIN)
            return bool(poll.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# --- a request, read and checked on its connection's thread, before it waits in the queue ---------------------------

def parse_chat(body: bytes, server: "Server") -> Job:
    def constant(name):  # Python's json reads NaN and Infinity; JSON has neither
        raise ValueError(f"{name} is not JSON")

    try:
        request = json.loads(body, parse_constant=constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = server.model
    options = read_options(request, model.cfg.template.defaults, server.args.max_new_tokens)
    template, turns = read_messages(request.get("messages"), model)
    # the prompt as the CLI writes it; its length is known from the number of images, before any is decoded
    ids = model.prompt_ids(chat.chat_prompt(turns, template))
    try:
        model.check_context(ids)
    except ValueError as e:
        raise ApiError(400, e.args[0], "messages", "context_length_exceeded") from None
    images = [read_image(url, where, server) for turn in turns for url, where in turn.images]
    return Job(ids, torch.stack(images) if images else None, *options)


def read_options(request: dict, defaults: dict, max_new_tokens: int) -> tuple:
    """(owl.Sampling, stop strings, stream, include_usage). Unset temperature, top_k and top_p take the model's
    official defaults, as owl.py does (not OpenAI's temperature of 1)."""
    for name, refused, why in (("n", lambda v: v is not None and (v is True or v != 1), "Owl writes one answer"),
                               ("tools", bool, "Owl calls no tools"),
                               ("logprobs", lambda v: v not in (None, False), "Owl gives no log probabilities")):
        if refused(request.get(name)):
            raise ApiError(400, f"{name} {json.dumps(request[name])[:40]} is not supported: {why}", name)

    def number(name, low, high, integer=False, open_low=False):
        value = request.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                                  or not (low < value if open_low else low <= value) or not value <= high):
            kind = "an integer" if integer else "a number"  # NaN fails every comparison
            raise ApiError(400, f"{name} must be {kind} in {'(' if open_low else '['}{low}, {high}]", name)
        return value

    tokens = number("max_completion_tokens", 1, max_new_tokens, True) or number("max_tokens", 1, max_new_tokens, True)
    temperature, top_p = number("temperature", 0, 2), number("top_p", 0, 1, open_low=True)
    top_k, seed = number("top_k", 0, 2 ** 31, True), number("seed", -2 ** 63, 2 ** 64 - 1, True)
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    stream, usage = request.get("stream"), (request.get("stream_options") or {})
    usage = usage.get("include_usage") if isinstance(usage, dict) else "?"
    if not all(isinstance(flag, (bool, type(None))) for flag in (stream, usage)):
        raise ApiError(400, "stream and stream_options.include_usage must be true or false", "stream")
    pick = lambda value, name: defaults[name] if value is None else value
    generator = None if seed is None else torch.Generator().manual_seed(seed)  # as owl.py's --seed
    sampling = owl.Sampling(tokens or max_new_tokens, float(pick(temperature, "temperature")),
                            int(pick(top_k, "top_k")), float(pick(top_p, "top_p")), generator)
    return sampling, stop, bool(stream), bool(usage)


def read_messages(messages, model: owl.Owl) -> tuple:
    """The template, its start replaced by the system message if there is one, and the conversation as chat.Turns,
    each holding its images as (url, param). Consecutive user (or assistant) messages join into one turn."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    template, system, turns, last = model.cfg.template, None, [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, user or assistant", f"{where}.role")
        text, images = read_content(message.get("content"), where, template.image, role == "user")
        if role in ("system", "developer"):
            system = text if system is None else f"{system}\n{text}"
            continue
        if role == "assistant" and last is None:
            raise ApiError(400, f"{where} is an assistant message before any user message", f"{where}.role")
        if role == "user" and last != "user":
            turns.append(chat.Turn(text, images))
        elif role == "user":
            turns[-1].question, turns[-1].images = f"{turns[-1].question}\n{text}", turns[-1].images + images
        else:
            turns[-1].answer = text if last == "user" else f"{turns[-1].answer}\n{text}"
        last = role
    if last != "user":
        raise ApiError(400, "the last message (but system ones) must be the user's", "messages")
    if system is not None:
        # v1: in place of its system sentence. Owl2 was trained without one (conversation.py's TWO_NO_SYS): the
        # text goes first, then a space, as conversation.py's templates with a system text (sep style TWO) put it
        template = replace(template, start=system + (" " if model.cfg.version == 2 and system else ""))
    return template, turns


def read_content(content, where: str, tag: str, images_allowed: bool) -> tuple:
    """A message's text (its text parts joined by newlines) and its images as (url, param)."""
    if isinstance(content, str) or (content is None and not images_allowed):
        content, where = [{"type": "text", "text": content or ""}], where + ".content"
    elif isinstance(content, list):
        where += ".content[{}]"
    else:
        raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        param, kind = where.format(j), part.get("type") if isinstance(part, dict) else None
        url = part.get("image_url") if kind == "image_url" else None
        url = url.get("url") if isinstance(url, dict) else url
        if kind == "text" and isinstance(part.get("text"), str):
            if tag in part["text"]:  # it would open image slots that no image fills
                raise ApiError(400, f"{param} contains {tag}; send images as image_url parts", param)
            try:
                part["text"].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no text to tokenize
                raise ApiError(400, f"{param} is not valid Unicode", param) from None
            texts.append(part["text"])
        elif kind == "image_url" and images_allowed and isinstance(url, str):
            images.append((url, f"{param}.image_url.url"))
        else:
            also = ' or {"type": "image_url", "image_url": {"url": ...}}' if images_allowed else ""
            raise ApiError(400, f'{param} must be {{"type": "text", "text": ...}}{also}', param)
    return "\n".join(texts), images


def read_image(url: str, param: str, server: "Server") -> torch.Tensor:
    """An image_url's pixels; its size is checked from the header, before any pixel is decoded."""
    from PIL import Image

    source = image_source(url, param, server.args)
    try:
        with PIL_LOCK:  # --max-pixels replaces PIL's own limit, as in owl.read_image
            Image.init()
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:  # any format PIL reads but EPS, which it decodes by running Ghostscript on the bytes
                image = Image.open(source, formats=[f for f in Image.ID if f != "EPS"])
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        if image.width * image.height > server.args.max_pixels:
            raise ApiError(400, f"the image is {image.width}x{image.height} pixels, more than the limit of "
                                f"{server.args.max_pixels} (--max-pixels)", param)
        image.load()
        return server.model.image_transform(image)
    except ApiError:
        raise
    except Exception as e:  # PIL's many ways of failing on bytes that are not an image it reads: the client's
        raise ApiError(400, f"the image cannot be read ({type(e).__name__})", param) from None


def image_source(url: str, param: str, args):
    """A data:image/...;base64 URL's bytes, or a file inside --media-dir (named by a path or file://). The server
    fetches nothing."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower() if colon and scheme.isalpha() else ""  # no scheme: a path
    if scheme in ("http", "https"):
        raise ApiError(400, "the server fetches no URLs: send the image as a data:image/...;base64 URL", param)
    if scheme == "data":
        head, comma, data = rest.partition(",")
        if not comma or not head.lower().startswith("image/") or not head.lower().endswith(";base64"):
            raise ApiError(400, "an image data URL must be data:image/<type>;base64,<data>", param)
        try:
            return io.BytesIO(base64.b64decode(data, validate=True))
        except ValueError:  # binascii.Error, and text that is not ASCII
            raise ApiError(400, "the image data URL is not valid base64", param) from None
    if scheme not in ("file", ""):
        raise ApiError(400, f"image URLs with the scheme {scheme!r} are not supported", param)
    if args.media_dir is None:
        raise ApiError(400, "local image paths are off: the server was started without --media-dir", param)
    root = Path(args.media_dir).resolve()
    try:
        path = unquote(urlsplit(url).path) if scheme else url
        full = (root / path).resolve()  # '..' and links resolved; an absolute path replaces root
        inside, is_file = full.is_relative_to(root), full.is_file()
    except (OSError, ValueError, RuntimeError):
        raise ApiError(400, "the image path cannot be resolved", param) from None
    if not inside or not is_file:
        raise ApiError(400, f"{path} is {'not a file in' if inside else 'outside'} --media-dir", param)
    return full


# --- the worker: the one thread that runs the model -------------------------------------------------------------------

class Worker:
    def __init__(self, model: owl.Owl, max_queue: int):
        self.model, self.jobs, self.stopping = model, queue.Queue(max_queue), threading.Event()
        self.thread = threading.Thread(target=self.run, name="owl-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.jobs.maxsize} requests are waiting); retry later",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    def stop(self) -> None:
        """End within a token, the jobs still queued dropped: the thread is not left inside torch."""
        self.stopping.set()
        self.thread.join(timeout=60)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                job.events.put(("done", self.answer(job)))
            except Exception as e:  # the worker lives on; the client gets a 500 or an error event, stderr the trace
                traceback.print_exc()
                job.events.put(("error", ApiError(500, f"the model failed while answering ({type(e).__name__}); "
                                                       "the server's log has the details")))

    def answer(self, job: Job) -> tuple:
        """Generate, sending text once later tokens cannot change it (no partial UTF-8 sequence, no ending that may
        grow into a stop string); returns (finish_reason, tokens generated)."""
        tokenizer, new, sent, finish = self.model.tokenizer, [], "", "length"
        if job.gone():  # it left while waiting
            return finish, 0
        tokens = self.model.generate(job.ids, job.pixels, job.sampling)
        try:
            for token in tokens:
                new.append(token)
                text, stopped = cut_at_stop(self.model.answer_text(new), job.stop)
                finish = "stop" if stopped or token == tokenizer.eos_id else finish
                ready = text if stopped else settled(text, job.stop)
                if ready.startswith(sent) and len(ready) > len(sent):
                    job.events.put(("text", ready[len(sent):]))
                    sent = ready
                if stopped or job.gone() or self.stopping.is_set():
                    break
        finally:
            tokens.close()  # frees the KV cache now
        text = cut_at_stop(self.model.answer_text(new), job.stop)[0]
        if text.startswith(sent) and len(text) > len(sent):  # held back for a stop string that never came
            job.events.put(("text", text[len(sent):]))
        return finish, len(new)


def cut_at_stop(text: str, stops: List[str]) -> tuple:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def settled(text: str, stops: List[str]) -> str:
    text = text.rstrip("\ufffd")  # a partial UTF-8 sequence decodes to U+FFFD until its last byte comes
    held = [len(text) - i for s in stops for i in range(max(0, len(text) - len(s) + 1), len(text))
            if s.startswith(text[i:])]
    return text[:len(text) - max(held, default=0)]


# --- HTTP ----------------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; a stream ends by closing its connection
    timeout = 60  # seconds a connection may stay silent, or a client stop reading, before it is closed
    server: "Server"

    def __getattr__(self, name):  # every method reaches dispatch, so a wrong one gets 405, not http.server's 501
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self) -> None:
        self.streaming = False
        try:
            body = self.read_body()
            path = urlsplit(self.path).path
            method, name = ROUTES.get(path, (None, None))
            if name is None:
                raise ApiError(404, f"there is no {path}: try POST /v1/chat/completions", code="not_found")
            if self.command != method:
                raise ApiError(405, f"{path} takes {method}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": method})
            key, given = self.server.args.api_key, self.headers.get("Authorization", "")
            if key and path.startswith("/v1/") and not hmac.compare_digest(  # headers arrive decoded as latin-1
                    given.encode("latin-1", "replace"), f"Bearer {key}".encode()):
                raise ApiError(401, "incorrect API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                               code="invalid_api_key")
            reply = getattr(self, name)(body)
            if reply is not None:
                self.send(200, reply)
        except ApiError as e:
            self.send(e.status, e.body(), e.headers)
        except (ConnectionError, TimeoutError):  # the client left, or stopped reading
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:
                self.send(500, ApiError(500, f"internal error ({type(e).__name__}); the server's log has the "
                                             "details").body())

    def read_body(self) -> bytes:
        length, limit = self.headers.get("Content-Length"), int(self.server.args.max_body_mb * 2 ** 20)
        if length is None and "Transfer-Encoding" not in self.headers:
            return b""
        self.close_connection = True  # until the body is read, the connection cannot carry another request
        if length is None:
            raise ApiError(411, "send the body with a Content-Length header", code="length_required")
        if not (length.isascii() and length.isdigit() and len(length) < 20):
            raise ApiError(400, "Content-Length is not a number")
        if int(length) > limit:
            # read and drop it (a few seconds at most): a client still sending would find its connection reset
            # instead of this answer
            deadline, left = time.monotonic() + 5, int(length)
            self.connection.settimeout(1)
            with contextlib.suppress(OSError):  # a pause or a reset ends the draining, not the answer
                while left > 0 and time.monotonic() < deadline and (chunk := self.rfile.read1(min(left, 1 << 16))):
                    left -= len(chunk)
            raise ApiError(413, f"the body is {length} bytes, more than the limit of {limit} (--max-body-mb)",
                           code="body_too_large")
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            raise ApiError(400, "the body is shorter than its Content-Length")
        self.close_connection = False
        return body

    def send(self, status: int, reply, headers: Optional[dict] = None) -> None:
        """A dict as JSON, bytes as the HTML page."""
        html = isinstance(reply, bytes)
        body = reply if html else json.dumps(reply, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        headers = {"Content-Type": "text/html; charset=utf-8" if html else "application/json",
                   "Content-Length": str(len(body)), **(headers or {})}
        for name, value in {**headers, **({"Connection": "close"} if self.close_connection else {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own refusals (a malformed request line, too many headers) in the error shape."""
        self.close_connection, self.streaming = True, False
        self.send(code, ApiError(code, message or HTTPStatus(code).phrase).body())

    def page(self, body: bytes) -> bytes:
        try:
            return PAGE.read_bytes()
        except OSError:
            raise ApiError(404, f"there is no chat page: no {PAGE.name} next to serve.py", code="not_found") from None

    def health(self, body: bytes) -> dict:
        return {"status": "ok"}

    def models(self, body: bytes) -> dict:
        model = {"id": self.server.name, "object": "model", "created": self.server.created, "owned_by": "owl"}
        return {"object": "list", "data": [model]}

    def chat(self, body: bytes) -> Optional[dict]:
        job = parse_chat(body, self.server)  # every 400, before the job waits
        job.connection = self.connection
        self.server.worker.submit(job)  # 503 when the queue is full
        try:
            return self.stream(job) if job.stream else self.complete(job)
        finally:
            job.cancelled.set()  # a handler that ends early (the client left) ends its generation too

    def complete(self, job: Job) -> dict:
        text = []
        while (event := job.events.get())[0] == "text":
            text.append(event[1])
        if event[0] == "error":
            raise event[1]
        finish, generated = event[1]
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": self.server.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": finish, "logprobs": None}], "usage": usage(job, generated)}

    def stream(self, job: Job) -> None:
        """Server-sent events: the role, the text as it settles, the finish reason, the usage if asked, [DONE]. The
        headers go with the first event, so a job that fails before any text gets a plain error response."""
        def chunk(delta, finish=None):
            return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": self.server.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        while True:
            kind, value = job.events.get()
            if not self.streaming:
                if kind == "error":
                    raise value
                self.send_response(200)
                for name, header in (("Content-Type", "text/event-stream; charset=utf-8"),
                                     ("Cache-Control", "no-cache"), ("Connection", "close")):
                    self.send_header(name, header)
                self.end_headers()
                self.streaming = True
                self.event(chunk({"role": "assistant", "content": ""}))
            if kind == "text":
                self.event(chunk({"content": value}))
                continue
            if kind == "error":
                self.event(value.body())
            else:
                self.event(chunk({}, value[0]))
                if job.include_usage:
                    self.event({**chunk({}), "choices": [], "usage": usage(job, value[1])})
            return self.event("[DONE]")

    def event(self, data) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self.wfile.write(f"data: {text}\n\n".encode("utf-8"))


def usage(job: Job, generated: int) -> dict:
    # every position of the prompt counts, tokens_per_image of them for each image
    return {"prompt_tokens": len(job.ids), "completion_tokens": generated, "total_tokens": len(job.ids) + generated}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model: owl.Owl, args):
        self.model, self.args, self.worker = model, args, Worker(model, args.max_queue)
        self.name, self.created = args.model_name or Path(args.checkpoint).resolve().name, int(time.time())
        super().__init__((args.host, args.port), Handler)  # a failed bind calls server_close: the worker ends

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that left is no error
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()


# --- the command line ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve Owl (mPLUG-Owl or mPLUG-Owl2) over an OpenAI-compatible HTTP API: "
                                "POST /v1/chat/completions, GET /v1/models, GET /health, and a chat page at GET /.")
    for flag, default, kind, text in (
            ("--checkpoint", "runs/owl-tiny/stage2", str, "an mPLUG-Owl or mPLUG-Owl2 checkpoint folder"),
            ("--host", "127.0.0.1", str, "the address to listen on. http.server is not meant to face the internet: "
                                         "keep it local, or put a real proxy in front"),
            ("--port", 8000, int, "the port to listen on; 0: any free port"),
            ("--model-name", None, str, "the model's id in /v1/models and in answers (default: the checkpoint "
                                        "folder's name); requests may name any model"),
            ("--api-key", None, str, "if set, /v1/ requires 'Authorization: Bearer KEY'"),
            ("--max-queue", 4, int, "requests that may wait while one is answered; more get 503 with Retry-After"),
            ("--max-new-tokens", 512, int, "the most tokens an answer gets: max_tokens' default and its limit"),
            ("--max-body-mb", 20.0, float, "the largest request body, in MiB (413 above it)"),
            ("--max-pixels", owl.MAX_PIXELS, int, "refuse larger images from their header, before decoding them"),
            ("--media-dir", None, str, "let image_url name files (a path or file://) inside this folder; without it "
                                       "only data: URLs are read. http(s) URLs are never fetched")):
        p.add_argument(flag, default=default, type=kind, help=text + (" (default: %(default)s)" if default else ""))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and compute dtype (default: float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if there is one)")
    return p


def make_server(args) -> Server:
    """The model loaded and the port bound, ready to serve_forever; a problem is an owl.UserError (one sentence)."""
    if min(args.max_queue, args.max_new_tokens, args.max_pixels) < 1 or not args.max_body_mb > 0:
        raise owl.UserError("--max-queue, --max-new-tokens, --max-pixels and --max-body-mb must be positive")
    if not 0 <= args.port <= 65535:
        raise owl.UserError(f"--port {args.port} is not a port (0 to 65535)")
    if args.media_dir is not None and not Path(args.media_dir).is_dir():
        raise owl.UserError(f"--media-dir {args.media_dir} is not a folder")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise owl.UserError("--device cuda was asked for but no CUDA device is available")
    model = owl.load_model(args)
    try:
        return Server(model, args)
    except OSError as e:
        raise owl.UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server = make_server(args)
    except owl.UserError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"listening on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    # not sys.exit: a connection thread may still hold a tensor, and torch aborts the process if one is freed while
    # Python finalizes (it takes the GIL to free it); the OS cleans up the rest
    os._exit(status)
