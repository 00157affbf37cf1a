"""A small HTTP server around a scorer: `python -m nftcore.reward.server --model FOLDER [--host] [--port]`.

Why this shape:
- Stdlib only (`ThreadingHTTPServer`): the judge needs no Flask, Ray or pinned vLLM, and the server starts wherever
  transformers runs.
- Batching across requests. Every training rank sends its few samples at about the same time; a handler thread
  decodes and validates its request, then queues it. One worker thread owns the model: it takes the first waiting
  request, gathers whatever else arrives within `batch_wait_ms` (up to `max_batch` samples), scores them in one
  `scorer.score` call (where the shared-prefix path finds the groups), and hands each request its slice. If a
  gathered batch fails, each request is retried alone so that one bad request cannot fail its neighbours.
- Safe by default: binds 127.0.0.1 unless told otherwise; JSON, never pickle; bodies above `max_body_bytes` are
  refused from the Content-Length header before reading; every malformed request (bad JSON, a missing or mistyped
  field, mismatched list lengths, an undecodable or oversized image) gets a 4xx with a JSON message naming the
  problem. A scoring failure is a 500 with the reason, which the client retries and then marks invalid.

The wire format is documented in `http_client.py`. `RewardServer(scorer, port=0).start()` runs it in-process on a
free port (tests); `.url` is its address.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from .http_client import decode_image

log = logging.getLogger(__name__)

DEFAULT_PORT = 12341  # Edit-R1's reward server port, so existing launch scripts keep working
DEFAULT_MAX_BODY_BYTES = 256 * 2**20  # 64 samples of 512^2 PNG pairs are ~100 MB of base64
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # decompression-bomb guard; the judge resizes to <= ~1 MP anyway
FIELDS = ("edited", "sources", "prompts", "requirements")


class RequestError(ValueError):
    """A client error: `status` (4xx) and a message for the JSON reply."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    edited: list
    sources: list
    prompts: list[str]
    requirements: list[str | None]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list | None = None
    error: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def parse_request(body: bytes, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> _Job:
    """Validate and decode one /score body; RequestError(400, reason) on the first problem found."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
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
    if lengths["prompts"] == 0:
        raise RequestError(400, "empty request: no samples")
    for name, allow_null in (("prompts", False), ("requirements", True), ("edited", False), ("sources", False)):
        for i, v in enumerate(data[name]):
            if not (isinstance(v, str) or (allow_null and v is None)):
                raise RequestError(400, f"{name}[{i}] must be a string{' or null' if allow_null else ''}, "
                                        f"got {type(v).__name__}")
    images = {}
    for name in ("edited", "sources"):
        decoded = []
        for i, text in enumerate(data[name]):
            try:
                decoded.append(decode_image(text, max_image_pixels))
            except ValueError as e:
                raise RequestError(400, f"{name}[{i}]: {e}") from None
        images[name] = decoded
    return _Job(images["edited"], images["sources"], data["prompts"], data["requirements"])


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
            except Exception:  # noqa: BLE001 - isolate: retry each job alone, report its own error
                if len(batch) == 1:
                    self._fail(batch[0])
                else:
                    for job in batch:
                        try:
                            self._score([job])
                        except Exception:  # noqa: BLE001
                            self._fail(job)
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
    def _fail(job: _Job) -> None:
        log.exception("scoring failed for a request of %d samples", len(job))
        job.error = "scoring failed: " + traceback.format_exc(limit=1).strip().splitlines()[-1]


def _make_handler(server: "RewardServer"):
    class Handler(BaseHTTPRequestHandler):
        server_version = "nftcore-reward/1"
        protocol_version = "HTTP/1.1"
        timeout = server.read_timeout  # socket timeout: a client that stalls mid-body cannot hold a thread forever

        def log_message(self, fmt, *args):  # route access logs to logging, not stderr
            log.debug("%s - " + fmt, self.address_string(), *args)

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._reply(200, server.health())
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self):
            try:
                if self.path.rstrip("/") != "/score":
                    raise RequestError(404, f"unknown path {self.path!r}; use POST /score")
                body = self._read_body()
                job = parse_request(body, server.max_image_pixels)
            except RequestError as e:
                self._reply(e.status, {"error": str(e)})
                return
            try:
                server.worker.submit(job, server.request_timeout)
            except TimeoutError as e:
                self._reply(503, {"error": f"scoring queue timeout: {e}"})
                return
            if job.error is not None:
                self._reply(500, {"error": job.error})
            else:
                self._reply(200, {"scores": job.scores})

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError(411, "Content-Length header required")
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                raise RequestError(400, f"bad Content-Length {length!r}") from None
            if n < 0 or n > server.max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as the next request
                raise RequestError(413, f"body of {n} bytes exceeds the limit of {server.max_body_bytes} bytes")
            return self.rfile.read(n)

    return Handler


class RewardServer:
    """The scoring server. `scorer` is anything with `score(edited, sources, prompts, requirements) -> [B]`.

    max_batch / batch_wait_ms: how many samples the worker gathers per scorer call, and how long it waits for more
    after the first request. max_body_bytes / max_image_pixels: request limits (413 / 400 beyond). request_timeout:
    seconds a request may wait for its scores (then 503, which the client retries). read_timeout: socket timeout
    while reading a request.
    """

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, max_batch: int = 32,
                 batch_wait_ms: float = 5.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, request_timeout: float = 600.0,
                 read_timeout: float = 60.0, name: str = ""):
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout = read_timeout
        self.max_image_pixels = max_image_pixels
        self.request_timeout = request_timeout
        self.name = name
        self.worker = BatchingWorker(scorer, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "queued": self.worker.jobs.qsize(),
                "batches": self.worker.batches, "samples": self.worker.samples, "max_batch": self.worker.max_batch}

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


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from .mllm import MLLMScorer
    from .prompt import DIGIT_RUBRIC, YES_NO_RUBRIC

    p = argparse.ArgumentParser(prog="python -m nftcore.reward.server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local Qwen2.5-VL folder (weights, tokenizer, preprocessor)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--rubric", choices=["digits", "yes-no"], default="digits")
    p.add_argument("--max-batch", type=int, default=32, help="samples gathered per scorer call")
    p.add_argument("--scorer-batch", type=int, default=16, help="edits per language-model forward")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    p.add_argument("--no-share-prefix", action="store_true", help="score every sample with a full forward")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scorer = MLLMScorer.from_pretrained(
        args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        rubric=YES_NO_RUBRIC if args.rubric == "yes-no" else DIGIT_RUBRIC, max_batch=args.scorer_batch,
        share_prefix=not args.no_share_prefix)
    server = RewardServer(scorer, args.host, args.port, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          max_body_bytes=int(args.max_body_mb * 2**20), name=str(args.model))
    log.info("serving %s on %s (POST /score, GET /health)", args.model, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
