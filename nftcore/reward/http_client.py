"""`HTTPReward`: the client of `nftcore.reward.server`, a reward like any other (see `base.py`).

Wire format (JSON, no pickle; Edit-R1 pickles request and response, which lets a server run arbitrary code on the
client and vice versa):

    POST /score   {"edited": [b64 image], "sources": [b64 image], "prompts": [str], "requirements": [str | null]}
    200           {"scores": [float | null]}        null: the judge gave a non-finite number for that sample
    4xx / 5xx     {"error": "what was wrong"}
    GET /health   {"status": "ok", ...}

Images travel as base64 PNG by default (lossless, so a remote score equals the in-process one) or JPEG (smaller,
what Edit-R1 sends; the JPEG round trip changes the pixels and so the score slightly).

Failure policy: connection errors, timeouts, 5xx responses and unreadable responses are retried `retries` times
with exponential backoff (`backoff * 2**attempt` seconds, capped at `max_backoff`); a 4xx is not retried (the same
request would fail the same way). A chunk that still fails is returned *invalid* (NaN, valid=False) with the reason
in `errors`, never as 0.0, so the trainer drops its group and counts it instead of learning from a fake score
(ALGORITHM.md 11.4).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from .base import RewardResult, check_batch, to_pil_list

RETRY_STATUS = frozenset({500, 502, 503, 504})


def encode_image(image: Image.Image, image_format: str = "PNG", quality: int = 95) -> str:
    """A PIL image as base64 text of its PNG (lossless) or JPEG encoding."""
    buf = io.BytesIO()
    fmt = image_format.upper()
    if fmt in ("JPG", "JPEG"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "PNG":
        image.save(buf, format="PNG", compress_level=1)  # level 1: ~5x faster than the default, ~10 % bigger
    else:
        raise ValueError(f"image_format must be PNG or JPEG, got {image_format!r}")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, max_pixels: int | None = None) -> Image.Image:
    """Base64 PNG/JPEG text -> RGB PIL image. ValueError (with the reason) for bad base64, an undecodable image,
    or more than `max_pixels` pixels (checked from the header, before the pixels are decoded)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
            raise ValueError(f"image of {img.size[0]}x{img.size[1]} pixels exceeds the limit of {max_pixels}")
        img.load()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"not a decodable PNG/JPEG image ({type(e).__name__}: {e})") from None
    if img.format not in ("PNG", "JPEG"):
        raise ValueError(f"images must be PNG or JPEG, got {img.format}")
    return img.convert("RGB")


class HTTPReward:
    """Scores through a running `nftcore.reward.server`.

    Args:
        url: the server root, e.g. "http://127.0.0.1:12341".
        timeout: seconds per HTTP attempt (connect + score + response).
        retries: extra attempts after the first, for retryable failures (see the module docstring).
        backoff: base of the exponential backoff between attempts, in seconds (backoff, 2 backoff, 4 backoff, ...).
        max_backoff: cap on one wait, in seconds.
        image_format: "PNG" (lossless, default) or "JPEG".
        requirement_key: the metadata field sent as the requirement.
        max_chunk: samples per request; a large batch is split so one request stays well under the server's
            body limit (a 512x512 PNG is ~0.4-0.8 MB of base64).
    """

    def __init__(self, url: str = "http://127.0.0.1:12341", *, timeout: float = 360.0, retries: int = 3,
                 backoff: float = 1.0, max_backoff: float = 60.0, image_format: str = "PNG",
                 requirement_key: str = "requirement", max_chunk: int = 64):
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.image_format = image_format
        self.requirement_key = requirement_key
        self.max_chunk = max(1, int(max_chunk))

    def __call__(self, edited, sources, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardResult:
        n = check_batch(edited, sources, prompts, metadata)
        edited_b64 = [encode_image(im, self.image_format) for im in to_pil_list(edited)]
        sources_b64 = [encode_image(im, self.image_format) for im in to_pil_list(sources)]
        requirements = [m.get(self.requirement_key) for m in metadata]
        scores = torch.full((n,), math.nan)
        errors = []
        for lo in range(0, n, self.max_chunk):
            hi = min(n, lo + self.max_chunk)
            payload = {"edited": edited_b64[lo:hi], "sources": sources_b64[lo:hi], "prompts": list(prompts[lo:hi]),
                       "requirements": requirements[lo:hi]}
            chunk, error = self.score_payload(payload)
            if chunk is None:
                errors.append(f"samples {lo}..{hi - 1}: {error}")
            else:
                scores[lo:hi] = torch.tensor([math.nan if s is None else float(s) for s in chunk])
        return RewardResult.from_scores(scores, errors=tuple(errors))

    def score_payload(self, payload: dict) -> tuple[list | None, str | None]:
        """POST one request with bounded retries: (scores, None) or (None, the last error)."""
        body = json.dumps(payload).encode()
        n = len(payload["prompts"])
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                status, reply = self._post("/score", body)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            if status == 200:
                scores = reply.get("scores") if isinstance(reply, dict) else None
                if isinstance(scores, list) and len(scores) == n:
                    return scores, None
                error = f"malformed response: {str(reply)[:200]}"
                continue
            error = f"HTTP {status}: {reply.get('error') if isinstance(reply, dict) else reply}"
            if status not in RETRY_STATUS:
                break  # a 4xx: the same request would be refused again
        return None, error

    def health(self) -> dict:
        """The server's /health reply (raises on failure: meant for start-up checks)."""
        req = urllib.request.Request(self.url + "/health", method="GET")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _post(self, path: str, body: bytes) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry our JSON error body
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw[:200].decode(errors="replace")
