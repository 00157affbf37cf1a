"""The scoring server and `HTTPReward` on loopback, in process (server on port 0 in a thread).

Most tests use a fake scorer (instant, deterministic per prompt) to exercise the protocol, batching and failure
handling; one uses the tiny Qwen2.5-VL judge to check that remote scores equal in-process scores.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading

import pytest
import torch

from nftcore.reward import HTTPReward, MLLMReward
from nftcore.reward.http_client import encode_image
from nftcore.reward.server import RewardServer
from nftcore.testing.tiny_judge import random_images
from tests.helpers.judges import grouped_batch, tiny_scorer
from tests.helpers.reward_server import FakeScorer, count_attempts, payload, raw_post, record_backoffs, small_batch


def test_remote_scores_equal_in_process_scores():
    scorer = tiny_scorer()
    edited, sources, prompts, requirements = grouped_batch(seed=2)
    metadata = [{"requirement": r} for r in requirements]
    local = MLLMReward(scorer)(edited, sources, prompts, metadata)
    with RewardServer(scorer, port=0, batch_wait_ms=50) as server:
        client = HTTPReward(server.url, timeout=60, retries=0)
        assert client.health()["status"] == "ok"
        results = [None, None]

        def call(k):  # two ranks asking at once: the server gathers them into one scorer call
            results[k] = client(edited[3 * k:3 * k + 3], sources[3 * k:3 * k + 3], prompts[3 * k:3 * k + 3],
                                metadata[3 * k:3 * k + 3])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        remote = torch.cat([r.scores for r in results])
        err = (remote - local.scores).abs().max().item()
        print(f"remote vs in-process max abs error {err:.2e}; server batches {server.worker.batches}")
        assert all(r.valid.all() for r in results)
        assert err < 1e-6  # PNG is lossless, so the judge sees the same pixels
        assert server.worker.samples == 6


def test_concurrent_requests_are_batched_and_split_back():
    fake = FakeScorer()
    # max_batch = the 10 samples of the 4 requests: the worker's gathering ends when the batch is full, not on a clock
    # (the long batch wait only bounds a failure)
    with RewardServer(fake, port=0, max_batch=10, batch_wait_ms=60_000) as server:
        client = HTTPReward(server.url, timeout=10, retries=0)
        prompts = [["a" * (k + 1)] * (k + 1) for k in range(4)]  # request k: k+1 samples scoring (k+1)/100
        results = [None] * 4
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, client(*small_batch(prompts[k]))))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k, res in enumerate(results):
        assert res.valid.all() and torch.allclose(res.scores, torch.full((k + 1,), (k + 1) / 100))
    assert fake.batches == [10], f"requests were not gathered: {fake.batches}"


def test_failed_request_does_not_fail_its_batch_neighbours_and_nan_is_invalid():
    fake = FakeScorer()
    # max_batch = both requests' samples: they are gathered into one scorer call (see the test above)
    with RewardServer(fake, port=0, max_batch=4, batch_wait_ms=60_000) as server:
        client = HTTPReward(server.url, timeout=10, retries=0)
        out = {}
        threads = [threading.Thread(target=lambda name=name, p=p: out.__setitem__(name, client(*small_batch(p))))
                   for name, p in (("good", ["ok", "fine"]), ("bad", ["boom", "x"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out["good"].valid.all() and torch.allclose(out["good"].scores, torch.tensor([0.02, 0.04]))
        assert not out["bad"].valid.any() and torch.isnan(out["bad"].scores).all()
        assert "HTTP 500" in out["bad"].errors[0] and "exploded" in out["bad"].errors[0]
        assert fake.batches == [2], "the gathered batch failed, then each request was scored alone"
        server.worker.batch_wait = 0.0  # a lone request from here on
        res = client(*small_batch(["nan", "abc"]))  # a non-finite judge output travels as null -> invalid
        assert res.valid.tolist() == [False, True] and math.isnan(res.scores[0]) and res.scores[1] == 0.03


def test_killed_server_gives_invalid_samples_after_bounded_retries(monkeypatch):
    server = RewardServer(FakeScorer(), port=0).start()
    url = server.url
    assert HTTPReward(url, timeout=5, retries=0)(*small_batch(["abc"])).valid.all()
    server.close()
    waits = record_backoffs(monkeypatch)
    client = HTTPReward(url, timeout=1, retries=2, backoff=0.05)
    attempts = count_attempts(client)
    res = client(*small_batch(["a", "b", "c"]))
    assert not res.valid.any() and torch.isnan(res.scores).all(), "a failed sample must be NaN, never 0.0"
    assert res.num_invalid == 3 and "refused" in res.errors[0].lower()
    assert len(attempts) == 3 and waits == [0.05, 0.1], "1 + 2 retries, exponential backoff"


def test_hanging_server_gives_invalid_samples_after_timeouts(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (kernel backlog) but never answers
    waits = record_backoffs(monkeypatch)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = HTTPReward(url, timeout=0.3, retries=1, backoff=0.01)
        attempts = count_attempts(client)
        res = client(*small_batch(["a", "b"]))
    finally:
        listener.close()
    assert not res.valid.any() and torch.isnan(res.scores).all()
    assert "timed out" in res.errors[0].lower()
    assert len(attempts) == 2 and waits == [0.01]


def test_hanging_scorer_gives_503_then_invalid():
    gate = threading.Event()  # the judge hangs until the test has its answer
    with RewardServer(FakeScorer(gate), port=0, request_timeout=0.2) as server:
        try:
            res = HTTPReward(server.url, timeout=5, retries=0)(*small_batch(["a"]))
        finally:
            gate.set()
    assert not res.valid.any() and "HTTP 503" in res.errors[0]


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({k: v for k, v in payload().items() if k != "requirements"}).encode(), 400, "'requirements'"),
    (json.dumps(payload(prompts="p")).encode(), 400, "'prompts' must be a list"),
    (json.dumps(payload(prompts=["p", 3])).encode(), 400, "prompts[1] must be a string"),
    (json.dumps(payload(prompts=["p"])).encode(), 400, "equal lengths"),
    (json.dumps(payload(edited=["aGVsbG8=", "!!"])).encode(), 400, "edited[0]: not a decodable"),
    (json.dumps(payload(sources=["aGVsbG8=", "%%%"])).encode(), 400, "sources[0]"),
    (json.dumps(payload(0)).encode(), 400, "no samples"),
])
def test_malformed_requests_get_a_clear_4xx(body, status, needle):
    fake = FakeScorer()
    with RewardServer(fake, port=0) as server:
        got_status, reply = raw_post(server.url, body)
    assert got_status == status and needle in reply["error"], reply
    assert fake.batches == [], "a rejected request must never reach the scorer"


def test_oversized_missing_length_and_unknown_path():
    with RewardServer(FakeScorer(), port=0, max_body_bytes=1000, max_image_pixels=20 * 20) as server:
        status, reply = raw_post(server.url, b"", headers={"Content-Length": str(10**9)})
        assert status == 413 and "exceeds the limit of 1000" in reply["error"]
        status, reply = raw_post(server.url, b"{}", path="/nope")
        assert status == 404
        big = encode_image(random_images(2, [(32, 32)])[0])  # 1024 pixels > the 400-pixel limit set above
        server.max_body_bytes = 10**6
        status, reply = raw_post(server.url, json.dumps(payload(1, edited=[big])).encode())
        assert status == 400 and "exceeds the limit of 400" in reply["error"]
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.putrequest("POST", "/score")  # no Content-Length header at all
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()
        # the client does not retry a 4xx: one attempt, invalid result
        client = HTTPReward(server.url, timeout=5, retries=3, backoff=1.0)
        attempts = count_attempts(client)
        server.max_body_bytes = 100
        res = client(*small_batch(["a"]))
        assert not res.valid.any() and len(attempts) == 1 and "HTTP 413" in res.reasons[0]
