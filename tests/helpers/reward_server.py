"""What the reward server and client tests share (tests/test_reward_server.py, test_reward_client.py,
test_reward_hardening.py): a fake judge, small batches and requests, raw HTTP, and hooks that record the client's
attempts and backoffs."""

from __future__ import annotations

import http.client
import json
import math
import threading
from types import SimpleNamespace

import torch

from nftcore.reward import HTTPReward, http_client
from nftcore.reward.http_client import encode_image
from nftcore.testing.tiny_judge import random_images


class FakeScorer:
    """score = len(prompt) / 100, or NaN for the prompt "nan"; raises on the prompt "boom"; records batch sizes.
    With a `gate`, every call first waits until the test opens it (a judge that hangs until told otherwise)."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.batches: list[int] = []

    def score(self, edited, sources, prompts, requirements):
        assert len(edited) == len(sources) == len(prompts) == len(requirements)
        if self.gate is not None:
            self.gate.wait()
        if "boom" in prompts:
            raise RuntimeError("the judge exploded")
        self.batches.append(len(prompts))
        return torch.tensor([math.nan if p == "nan" else len(p) / 100 for p in prompts])


def small_batch(prompts):
    """A batch of 16 px random images, one per prompt, in the reward's (edited, sources, prompts, metadata) order."""
    images = random_images(0, [(16, 16)] * len(prompts))
    return images, images, list(prompts), [{"requirement": "r"} for _ in prompts]


def raw_post(url: str, body: bytes, headers: dict | None = None, path: str = "/score") -> tuple[int, dict]:
    """POST `body` to the server as is: (HTTP status, decoded JSON reply)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def payload(n: int = 2, **override) -> dict:
    """A well-formed /score request body for `n` samples, with `override` keys replaced."""
    images = [encode_image(im) for im in random_images(1, [(16, 16)] * n)]
    body = {"edited": images, "sources": images, "prompts": ["p"] * n, "requirements": ["r"] * n}
    body.update(override)
    return body


def count_attempts(client: HTTPReward) -> list:
    """Record each HTTP attempt `client` makes (its path), without changing what the attempt does."""
    attempts, post = [], client._post
    client._post = lambda path, body: (attempts.append(path), post(path, body))[1]
    return attempts


def record_backoffs(monkeypatch) -> list:
    """The client's backoff waits, recorded instead of slept."""
    waits = []
    monkeypatch.setattr(http_client, "time", SimpleNamespace(sleep=waits.append))
    return waits
