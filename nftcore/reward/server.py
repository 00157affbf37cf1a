"""A small HTTP server around a scorer: `python -m nftcore.reward.server --model FOLDER [--host] [--port]`.

Why this shape:
- Stdlib only (`ThreadingHTTPServer`): the judge needs no Flask, Ray or pinned vLLM, and the server starts wherever
  transformers runs.
- Batching across requests. Every training rank sends its few samples at about the same time; a handler thread
  decodes and validates its request, then queues it. One worker thread owns the model: it takes the first waiting
  request, gathers whatever else arrives within `batch_wait_ms` (up to `max_batch` samples), scores them in one
  `scorer.score` call (where the shared-prefix path finds the groups), and hands each request its slice. If a
  gathered batch fails, each request is retried alone so that one bad request cannot fail its neighbours.
- JSON, never pickle. Every malformed request (bad JSON, a missing or mistyped field, mismatched list lengths, an
  undecodable image) gets a 4xx with a JSON message naming the field (and index) and the limit. A scoring failure
  is a 500 with the reason, which the client retries and then marks invalid; a ValueError from the scorer (it
  refuses that input, e.g. an image shape its processor cannot handle) is a 422, which the client does not retry.

Limits. Each is checked before the work it bounds, so a small request cannot make the server do much work; every
one is a `RewardServer` argument (None: no check) and a flag (0: no check, except for the body):
- body: `max_body_bytes` (--max-body-mb, 256 MB), from Content-Length before reading (413);
- samples: `max_request_samples` (--max-request-samples, 256) per request (413);
- text: `max_text_chars` (--max-text-chars, 4096) per prompt and per requirement (413): tokenising a very long
  text costs minutes on the single scoring thread, which no other request could then use;
- pixels, read from each image's header before any pixel is decoded: `max_image_pixels` (--max-image-pixels,
  4096^2) per image (400), and `max_request_pixels` (--max-request-pixels, 2^26) summed over a request's images
  (413). A 4096x4096 1-bit PNG is a few KB of body and 50 MB decoded, so the body limit alone bounds nothing. The
  default budget is 32 samples (the client's default chunk and the server's default batch) of 1024x1024 edited +
  source pairs, ~200 MB of decoded RGB per request; raise it with the client's `max_chunk` or image size;
- shape: `max_aspect_ratio` (--max-aspect-ratio, 200): the Qwen2-VL image processor refuses anything more
  elongated, so such an image is a 400 naming it rather than a 500 from the judge;
- formats: only the PNG and JPEG decoders ever see the bytes (400 for anything else): no other PIL plugin (EPS runs
  Ghostscript) is reachable;
- time: `read_timeout` (--read-timeout, 60 s) for a whole request to arrive, request line to last body byte (408),
  and for a reply to be taken: a client that trickles bytes cannot hold a handler thread for longer;
  `request_timeout` (--request-timeout, 600 s) for a request to be scored (503, retried);
- connections: a listen backlog of 128 (the stdlib's 5 dropped simultaneous connections from many ranks).

Exposure. The server binds 127.0.0.1 unless told otherwise. For several nodes, give it a shared token:
`--token-file FILE` (or $NFTCORE_REWARD_TOKEN; never a flag, which `ps` would show). Then every POST /score must
carry `Authorization: Bearer <token>` (compared in constant time), else 401; `HTTPReward` sends the token of its
`token` argument or of the same variable. Binding beyond loopback without a token is refused at start-up unless
`--insecure` says the network is trusted. GET /health stays open, so that launch scripts and orchestrators can
probe without the secret: it reveals the model name and request counters, never a score.

The wire format is documented in `http_client.py`. `RewardServer(scorer, port=0).start()` runs it in-process on a
free port (tests); `.url` is its address.

Where the judge runs: docs/ALGORITHM.md §3.1; batching: §11.5.
Serving other nodes: docs/TRAINING.md, "The judge server beyond one machine".
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .http_client import TOKEN_ENV, load_image, open_image

log = logging.getLogger(__name__)

DEFAULT_PORT = 12341  # Edit-R1's reward server port, so existing launch scripts keep working
DEFAULT_MAX_BODY_BYTES = 256 * 2**20  # 64 samples of 512^2 PNG pairs are ~100 MB of base64
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # decompression-bomb guard; the judge resizes to <= ~1 MP anyway
DEFAULT_MAX_REQUEST_PIXELS = 32 * 2 * 1024 * 1024  # 32 samples of 1024^2 edited + source: ~200 MB of RGB
DEFAULT_MAX_REQUEST_SAMPLES = 256  # 8x the client's default chunk; bounds per-image overhead and one scorer call
DEFAULT_MAX_TEXT_CHARS = 4096  # instructions and requirements are a few hundred characters
DEFAULT_MAX_ASPECT_RATIO = 200.0  # the Qwen2-VL image processor's limit (smart_resize refuses more)
DEFAULT_READ_TIMEOUT = 60.0
LISTEN_BACKLOG = 128
FIELDS = ("edited", "sources", "prompts", "requirements")
TEXT_FIELDS = ("prompts", "requirements")
IMAGE_FIELDS = ("edited", "sources")


class RequestError(ValueError):
    """A client error: `status` (4xx) and a message for the JSON reply."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Per-request limits (see the module docstring); None turns a check off."""

    max_samples: int | None = DEFAULT_MAX_REQUEST_SAMPLES
    max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO


@dataclass
class _Job:
    edited: list
    sources: list
    prompts: list[str]
    requirements: list[str | None]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list | None = None
    error: str | None = None
    status: int = 500  # the HTTP status of `error`

    def __len__(self) -> int:
        return len(self.prompts)


def parse_request(body: bytes, limits: Limits = Limits()) -> _Job:
    """Validate and decode one /score body; RequestError(4xx, reason) on the first problem found. The cheap checks
    (structure, sample count, text lengths) run before any image is opened."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {list(FIELDS)}")
    for name in FIELDS:
        if name not in data:
            raise RequestError(400, f"missing field {name!r} (required: {list(FIELDS)})")
        if not isinstance(data[name], list):
            raise RequestError(400, f"field {name!r} must be a list, got {type(data[name]).__name__}")
    lengths = {name: len(data[name]) for name in FIELDS}
    if len(set(lengths.values())) != 1:
        raise RequestError(400, f"fields must have equal lengths, got {lengths}")
    n = lengths["prompts"]
    if n == 0:
        raise RequestError(400, "empty request: no samples")
    if limits.max_samples is not None and n > limits.max_samples:
        raise RequestError(413, f"request of {n} samples exceeds the limit of {limits.max_samples} samples per "
                                f"request (send smaller chunks)")
    for name, allow_null in (("prompts", False), ("requirements", True), ("edited", False), ("sources", False)):
        for i, v in enumerate(data[name]):
            if not (isinstance(v, str) or (allow_null and v is None)):
                raise RequestError(400, f"{name}[{i}] must be a string{' or null' if allow_null else ''}, "
                                        f"got {type(v).__name__}")
            if name in TEXT_FIELDS and v is not None and limits.max_text_chars is not None \
                    and len(v) > limits.max_text_chars:
                raise RequestError(413, f"{name}[{i}] has {len(v)} characters, over the limit of "
                                        f"{limits.max_text_chars} per text field (max_text_chars)")
    images = decode_images(data, limits)
    return _Job(images["edited"], images["sources"], data["prompts"], data["requirements"])


def decode_images(data: dict, limits: Limits = Limits()) -> dict[str, list[Image.Image]]:
    """The request's images as RGB, per field. Every image is first opened (its header only) and checked; pixels
    are decoded only once the whole request is known to fit the limits."""
    opened: dict[str, list[Image.Image]] = {name: [] for name in IMAGE_FIELDS}
    total = 0
    for name in IMAGE_FIELDS:
        for i, text in enumerate(data[name]):
            where = f"{name}[{i}]"
            try:
                img = open_image(text)
            except ValueError as e:
                raise RequestError(400, f"{where}: {e}") from None
            w, h = img.size
            if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
                raise RequestError(400, f"{where}: image of {w}x{h} pixels exceeds the limit of "
                                        f"{limits.max_image_pixels}")
            if limits.max_aspect_ratio is not None and max(w, h) > limits.max_aspect_ratio * min(w, h):
                raise RequestError(400, f"{where}: image of {w}x{h} pixels is more elongated than the judge can "
                                        f"take (aspect ratio over {limits.max_aspect_ratio:g})")
            total += w * h
            if limits.max_request_pixels is not None and total > limits.max_request_pixels:
                raise RequestError(413, f"{where}: the request's images add up to {total} pixels so far, over the "
                                        f"budget of {limits.max_request_pixels} pixels per request "
                                        f"(max_request_pixels); send fewer or smaller images per request")
            opened[name].append(img)
    decoded: dict[str, list[Image.Image]] = {name: [] for name in IMAGE_FIELDS}
    for name in IMAGE_FIELDS:
        for i, img in enumerate(opened[name]):
            try:
                decoded[name].append(load_image(img))
            except ValueError as e:
                raise RequestError(400, f"{name}[{i}]: {e}") from None
    return decoded


class BatchingWorker:
    """One thread that owns the scorer and scores queued jobs in gathered batches."""

    def __init__(self, scorer, *, max_batch: int = 32, batch_wait_ms: float = 5.0):
        self.scorer = scorer
        self.max_batch = max(1, int(max_batch))
        self.batch_wait = max(0.0, batch_wait_ms) / 1e3
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None  # a job that did not fit the previous batch goes first in the next
        self._thread = threading.Thread(target=self._loop, name="reward-worker", daemon=True)
        self.batches = 0  # counters for /health and tests
        self.samples = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.ident is None:  # never started (a server closed before serving)
            return
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def submit(self, job: _Job, timeout: float | None) -> _Job:
        """Queue `job` and wait until it is scored (or failed); TimeoutError if it takes longer than `timeout`."""
        self.jobs.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError(f"not scored within {timeout} s")
        return job

    def _gather(self) -> list[_Job] | None:
        first = self._carry if self._carry is not None else self.jobs.get()
        self._carry = None
        if first is None:
            return None
        batch, n = [first], len(first)
        deadline = time.monotonic() + self.batch_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop after this batch
                break
            if n + len(job) > self.max_batch:
                self._carry = job
                break
            batch.append(job)
            n += len(job)
        return batch

    def _loop(self) -> None:
        while (batch := self._gather()) is not None:
            try:
                self._score(batch)
            except Exception as e:  # noqa: BLE001 - isolate: retry each job alone, report its own error
                if len(batch) == 1:
                    self._fail(batch[0], e)
                else:
                    for job in batch:
                        try:
                            self._score([job])
                        except Exception as e_job:  # noqa: BLE001
                            self._fail(job, e_job)
            finally:
                for job in batch:
                    job.done.set()

    def _score(self, batch: list[_Job]) -> None:
        cat = (lambda attr: [x for job in batch for x in getattr(job, attr)])
        scores = self.scorer.score(cat("edited"), cat("sources"), cat("prompts"), cat("requirements"))
        scores = [float(s) for s in scores]
        if len(scores) != sum(len(job) for job in batch):
            raise RuntimeError(f"the scorer returned {len(scores)} scores for {sum(len(j) for j in batch)} samples")
        self.batches += 1
        self.samples += len(scores)
        lo = 0
        for job in batch:
            job.scores = [s if math.isfinite(s) else None for s in scores[lo:lo + len(job)]]
            lo += len(job)

    @staticmethod
    def _fail(job: _Job, exc: Exception) -> None:
        log.exception("scoring failed for a request of %d samples", len(job))
        # A ValueError is the scorer refusing this input (e.g. an image shape its processor cannot take): the same
        # request would fail again, so 422, which the client does not retry. Anything else may pass (500, retried).
        if isinstance(exc, ValueError):
            job.status, job.error = 422, f"the judge cannot score this request: {type(exc).__name__}: {exc}"
        else:
            job.status, job.error = 500, f"scoring failed: {type(exc).__name__}: {exc}"


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, all due by `deadline` (a `clock()` time). A per-read socket timeout alone lets a client that
    sends a byte every (timeout - 1) s hold a handler thread forever; a deadline bounds the whole request."""

    def __init__(self, sock, clock=time.monotonic):
        self.sock, self.clock = sock, clock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(None if math.isinf(remaining) else remaining)
        return self.sock.recv_into(buf)


def _make_handler(server: "RewardServer"):
    class Handler(BaseHTTPRequestHandler):
        server_version = "nftcore-reward/1"
        protocol_version = "HTTP/1.1"
        timeout = server.read_timeout  # the socket's timeout until the first request starts

        def setup(self):
            super().setup()
            self.rfile.close()  # replaced by a reader with a whole-request deadline
            self.reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self):
            # Waiting for the request, its line, headers and body: all within read_timeout (else the connection is
            # closed, or a 408 once the headers are in).
            self.reader.deadline = time.monotonic() + server.read_timeout
            super().handle_one_request()

        def log_message(self, fmt, *args):  # route access logs to logging, not stderr
            log.debug("%s - " + fmt, self.address_string(), *args)

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.connection.settimeout(server.read_timeout)  # sendall's total time: a client must take its reply
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError as e:  # the client left (or stalled) before taking its answer
                log.debug("reply %d to %s not delivered: %s", status, self.address_string(), e)
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/health":  # open without the token: no score, only counters
                self._reply(200, server.health())
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self):
            body = None
            try:
                if self.path.rstrip("/") != "/score":
                    raise RequestError(404, f"unknown path {self.path!r}; use POST /score")
                self._check_token()
                body = self._read_body()
                job = parse_request(body, server.limits)
            except RequestError as e:
                if body is None:
                    self.close_connection = True  # an unread body must not be parsed as the next request
                self._reply(e.status, {"error": str(e)})
                return
            try:
                server.worker.submit(job, server.request_timeout)
            except TimeoutError as e:
                self._reply(503, {"error": f"scoring queue timeout: {e}"})
                return
            if job.error is not None:
                self._reply(job.status, {"error": job.error})
            else:
                self._reply(200, {"scores": job.scores})

        def _check_token(self) -> None:
            if server.token is None:
                return
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(given.strip().encode(), server.token.encode())):
                raise RequestError(401, "missing or wrong token: this server needs 'Authorization: Bearer <token>' "
                                        f"with the token of its --token-file or ${TOKEN_ENV}")

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "Content-Length header required")
            try:
                n = int(length)
            except ValueError:
                raise RequestError(400, f"bad Content-Length {length!r}") from None
            if n < 0 or n > server.max_body_bytes:
                raise RequestError(413, f"body of {n} bytes exceeds the limit of {server.max_body_bytes} bytes")
            try:
                body = self.rfile.read(n)
            except TimeoutError:
                raise RequestError(408, f"the request did not arrive within {server.read_timeout:g} s "
                                        f"(read_timeout)") from None
            if len(body) < n:
                raise RequestError(400, f"body cut short: {len(body)} of {n} bytes")
            return body

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen() backlog. Every rank of a job asks at about the same time; with the stdlib's 5, the kernel dropped
    # the connections past the 6th until the accept loop caught up (connect timeouts and resets under load).
    request_queue_size = LISTEN_BACKLOG


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1 or "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface): may be reachable from elsewhere


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """ValueError if binding `host` would open the judge beyond this machine without a token."""
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host!r}, beyond loopback, without a token: anyone who can reach the "
                         f"port could use the judge. Give a shared token with --token-file FILE (or ${TOKEN_ENV}) "
                         f"and the same one to the clients (${TOKEN_ENV} or HTTPReward(token=...)), or pass "
                         f"--insecure on a network you trust.")


class RewardServer:
    """The scoring server. `scorer` is anything with `score(edited, sources, prompts, requirements) -> [B]`.

    max_batch / batch_wait_ms: how many samples the worker gathers per scorer call, and how long it waits for more
    after the first request. max_body_bytes, max_request_samples, max_text_chars, max_image_pixels,
    max_request_pixels, max_aspect_ratio: request limits (None: no check; see the module docstring).
    request_timeout: seconds a request may wait for its scores (then 503, which the client retries). read_timeout:
    seconds for a whole request to arrive (then 408 or the connection is closed), and for a reply to be sent.
    token: the shared secret every POST /score must carry (None: no check). insecure: allow a non-loopback `host`
    without a token (else ValueError).
    """

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, max_batch: int = 32,
                 batch_wait_ms: float = 5.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_request_samples: int | None = DEFAULT_MAX_REQUEST_SAMPLES,
                 max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS,
                 max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO, request_timeout: float = 600.0,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, token: str | None = None, insecure: bool = False,
                 name: str = ""):
        if token is not None and not token.strip():
            raise ValueError("the token is empty")
        self.token = token.strip() if token is not None else None
        check_exposure(host, self.token, insecure)
        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout!r}")
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout = float(read_timeout)
        self.limits = Limits(max_request_samples, max_text_chars, max_image_pixels, max_request_pixels,
                             max_aspect_ratio)
        self.request_timeout = request_timeout
        self.name = name
        self.worker = BatchingWorker(scorer, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        self.httpd = _HTTPServer((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "queued": self.worker.jobs.qsize(),
                "batches": self.worker.batches, "samples": self.worker.samples, "max_batch": self.worker.max_batch,
                "token_required": self.token is not None}

    def start(self) -> "RewardServer":
        """Serve in a background thread (returns at once)."""
        self.worker.start()
        # poll_interval: how fast close() is noticed; 0.1 s keeps in-process test servers quick to stop
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="reward-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self.worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
        self.worker.stop()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def read_token(token_file: str | None) -> str | None:
    """The shared token: the first line of `token_file` if given, else $NFTCORE_REWARD_TOKEN, else None.
    ValueError for an unreadable or empty file."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {token_file}: cannot read it ({e})") from None
    if not token:
        raise ValueError(f"--token-file {token_file} is empty")
    return token


def main(argv: Sequence[str] | None = None) -> None:
    off = (lambda v: v or None)  # a limit flag of 0 turns its check off
    p = argparse.ArgumentParser(prog="python -m nftcore.reward.server", description=__doc__.split("\n")[0],
                                epilog="The --max-* flags but --max-body-mb take 0 to turn their check off. The "
                                       "module docstring (pydoc nftcore.reward.server) explains each limit and its "
                                       "default.")
    p.add_argument("--model", required=True, help="local Qwen2.5-VL folder (weights, tokenizer, preprocessor)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: loopback only). Beyond loopback, a token is required (--token-file "
                        f"or ${TOKEN_ENV}) unless --insecure")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token-file", default=None,
                   help=f"file holding the shared token every POST /score must carry as 'Authorization: Bearer "
                        f"<token>' (default: ${TOKEN_ENV} if set, else no token). GET /health stays open")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token (only on a network you trust)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--rubric", choices=["digits", "yes-no"], default="digits")
    p.add_argument("--max-batch", type=int, default=32, help="samples gathered per scorer call")
    p.add_argument("--scorer-batch", type=int, default=16, help="edits per language-model forward")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="request body size (default: %(default)g)")
    p.add_argument("--max-request-samples", type=int, default=DEFAULT_MAX_REQUEST_SAMPLES,
                   help="samples per request (default: %(default)s)")
    p.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_TEXT_CHARS,
                   help="characters per prompt and per requirement (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="width x height per image (default: %(default)s)")
    p.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                   help="width x height summed over a request's images, read from their headers before decoding "
                        "(default 2^26: 32 samples of 1024x1024 edited + source pairs, ~200 MB decoded)")
    p.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO,
                   help="longest / shortest side per image (default: %(default)g, the Qwen2-VL processor's limit)")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                   help="seconds for a whole request to arrive, and for a reply to be taken (default: %(default)g)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may wait to be scored (default: %(default)g)")
    p.add_argument("--no-share-prefix", action="store_true", help="score every sample with a full forward")
    args = p.parse_args(argv)
    try:  # before minutes of model loading
        token = read_token(args.token_file)
        check_exposure(args.host, token, args.insecure)
        if not args.read_timeout > 0:
            raise ValueError(f"--read-timeout must be > 0 seconds, got {args.read_timeout}")
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from .mllm import MLLMScorer
    from .prompt import DIGIT_RUBRIC, YES_NO_RUBRIC

    scorer = MLLMScorer.from_pretrained(
        args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=getattr(torch, args.dtype) if args.dtype else None, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, rubric=YES_NO_RUBRIC if args.rubric == "yes-no" else DIGIT_RUBRIC,
        max_batch=args.scorer_batch, share_prefix=not args.no_share_prefix)
    server = RewardServer(scorer, args.host, args.port, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          max_body_bytes=int(args.max_body_mb * 2**20),
                          max_request_samples=off(args.max_request_samples), max_text_chars=off(args.max_text_chars),
                          max_image_pixels=off(args.max_image_pixels),
                          max_request_pixels=off(args.max_request_pixels),
                          max_aspect_ratio=off(args.max_aspect_ratio), request_timeout=args.request_timeout,
                          read_timeout=args.read_timeout, token=token, insecure=args.insecure, name=str(args.model))
    log.info("serving %s on %s (POST /score%s, GET /health)", args.model, server.url,
             " with a token" if token else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
