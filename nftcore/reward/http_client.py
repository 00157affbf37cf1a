"""`HTTPReward`: the client of `nftcore.reward.server`, a reward like any other (see `base.py`).

Wire format (JSON, no pickle; Edit-R1 pickles request and response, which lets a server run arbitrary code on the
client and vice versa):

    POST /score   {"edited": [b64 image], "sources": [b64 image], "prompts": [str], "requirements": [str | null]}
    200           {"scores": [float | null]}        null: the judge gave a non-finite number for that sample
    4xx / 5xx     {"error": "what was wrong"}
    GET /health   {"status": "ok", ...}

Images travel as base64 PNG by default (lossless, so a remote score equals the in-process one) or JPEG (smaller,
what Edit-R1 sends; the JPEG round trip changes the pixels and so the score slightly).

Authentication: when the server was started with a token (`--token-file`, or $NFTCORE_REWARD_TOKEN), every /score
request carries `Authorization: Bearer <token>`. The client takes the token from its `token` argument, else from
$NFTCORE_REWARD_TOKEN; a wrong or missing token is a 401, which is not retried.

Failure policy: connection errors, timeouts, 5xx responses and unreadable responses are retried `retries` times
with exponential backoff (`backoff * 2**attempt` seconds, capped at `max_backoff`); a 4xx is not retried (the same
request would fail the same way), except 408 (the upload was too slow for the server's read deadline). A chunk that
still fails is returned *invalid* (NaN, valid=False) with the reason in `errors` and `reasons`, never as 0.0, so the
trainer drops its group and counts it instead of learning from a fake score. Within a 200 reply, an entry that is
not a finite number inside `score_range` (the rubric's [0, 1] by default: a string, an object, a bool, null, +-50)
is invalid too, with its reason: the reply of a broken or foreign server must neither stop training nor be trained
on.

Invalid scores: docs/ALGORITHM.md §3.4 and §11.4.
Serving other nodes: docs/TRAINING.md, "The judge server beyond one machine".
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from .base import RewardResult, check_batch, to_pil_list

# 408: the server's read deadline passed while the request was uploading (slow link), worth another try; every other
# 4xx is deterministic (the same request would be refused the same way), so it is not retried.
RETRY_STATUS = frozenset({408, 500, 502, 503, 504})
TOKEN_ENV = "NFTCORE_REWARD_TOKEN"  # the shared secret of server and clients (the server also takes --token-file)
IMAGE_FORMATS = ("PNG", "JPEG")
# The judge computes a score in float32 as a softmax-weighted mean of <= 10 answer values, normalised to [0, 1];
# rounding can carry it a few ulps past a bound (sum of the probabilities 1 + K ulp), never 16 ulps of the range.
SCORE_SLACK_ULPS = 16


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


def open_image(text: str) -> Image.Image:
    """Base64 PNG/JPEG text -> a PIL image whose header only has been read (`.size` is known, no pixel decoded yet).
    ValueError (with the reason) for bad base64 or anything but a PNG/JPEG header: only those two decoders are ever
    asked, so an EPS (Ghostscript), a PSD or any other PIL plugin never sees untrusted bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid base64 ({e})") from None
    try:
        return Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt or foreign data
        raise ValueError(f"not a decodable PNG/JPEG image ({type(e).__name__}: {e})") from None


def load_image(img: Image.Image) -> Image.Image:
    """Decode an `open_image` result's pixels -> RGB; ValueError (with the reason) for corrupt data."""
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"not a decodable PNG/JPEG image ({type(e).__name__}: {e})") from None


def check_score(value: Any, score_range: tuple[float, float] | None) -> tuple[float, str | None]:
    """One reply entry -> (score, None) or (NaN, why it is unusable). Only a JSON number counts (not a bool, not a
    numeric string); it must be finite and, with `score_range`, inside it up to float32 rounding (then clamped)."""
    if value is None:
        return math.nan, "the judge gave a non-finite score (null)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan, f"non-numeric score in the reply ({type(value).__name__})"
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond float range
        value = math.inf
    if not math.isfinite(value):
        return math.nan, "non-finite score in the reply"
    if score_range is not None:
        lo, hi = score_range
        slack = SCORE_SLACK_ULPS * torch.finfo(torch.float32).eps * (hi - lo)
        if not lo - slack <= value <= hi + slack:
            return math.nan, f"score outside the valid range [{lo:g}, {hi:g}]"
        value = min(max(value, lo), hi)  # a rounding overshoot is the bound itself
    return value, None


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
        max_chunk: samples per request. 32, the server's default batch, keeps a request of 1024x1024 pairs within
            its default decoded-pixel budget and well under its body limit (a 512x512 PNG is ~0.4-0.8 MB of base64).
        token: the server's shared token; None reads $NFTCORE_REWARD_TOKEN (unset or empty: no token sent).
        score_range: (low, high) of a usable score, the rubric's [0, 1] by default (up to float32 rounding);
            None accepts any finite number.
    """

    def __init__(self, url: str = "http://127.0.0.1:12341", *, timeout: float = 360.0, retries: int = 3,
                 backoff: float = 1.0, max_backoff: float = 60.0, image_format: str = "PNG",
                 requirement_key: str = "requirement", max_chunk: int = 32, token: str | None = None,
                 score_range: tuple[float, float] | None = (0.0, 1.0)):
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.image_format = image_format
        self.requirement_key = requirement_key
        self.max_chunk = max(1, int(max_chunk))
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip() or None
        if score_range is not None and not score_range[0] < score_range[1]:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range!r}")
        self.score_range = score_range

    def __call__(self, edited, sources, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardResult:
        n = check_batch(edited, sources, prompts, metadata)
        edited_b64 = [encode_image(im, self.image_format) for im in to_pil_list(edited)]
        sources_b64 = [encode_image(im, self.image_format) for im in to_pil_list(sources)]
        requirements = [m.get(self.requirement_key) for m in metadata]
        scores = [math.nan] * n
        reasons: list[str | None] = [None] * n
        errors = []
        for lo in range(0, n, self.max_chunk):
            hi = min(n, lo + self.max_chunk)
            payload = {"edited": edited_b64[lo:hi], "sources": sources_b64[lo:hi], "prompts": list(prompts[lo:hi]),
                       "requirements": requirements[lo:hi]}
            chunk, error = self.score_payload(payload)
            if chunk is None:
                errors.append(f"samples {lo}..{hi - 1}: {error}")
                reasons[lo:hi] = [error] * (hi - lo)
                continue
            bad: dict[str, list[int]] = {}  # reason -> sample indices, one error message per distinct reason
            for i, value in enumerate(chunk, start=lo):
                scores[i], reasons[i] = check_score(value, self.score_range)
                if reasons[i] is not None:
                    bad.setdefault(reasons[i], []).append(i)
            errors += [f"samples {idx}: {why}" for why, idx in bad.items()]
        return RewardResult.from_scores(torch.tensor(scores, dtype=torch.float32), errors=tuple(errors),
                                        reasons=tuple(reasons))

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
            error = f"HTTP {status}: {str(reply.get('error') if isinstance(reply, dict) else reply)[:500]}"
            if status not in RETRY_STATUS:
                break  # a 4xx: the same request would be refused again
        return None, error

    def health(self) -> dict:
        """The server's /health reply (raises on failure: meant for start-up checks)."""
        req = urllib.request.Request(self.url + "/health", method="GET", headers=self._auth())
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _post(self, path: str, body: bytes) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **self._auth()})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry our JSON error body
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            return status, raw[:200].decode(errors="replace")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}
