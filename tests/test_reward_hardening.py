"""The scoring server against hostile or unlucky clients: limits checked before the work they bound, slow clients,
many simultaneous connections, foreign image formats, the shared token, and inputs the judge itself refuses.

Every test synchronises on events (a reply, a closed connection, a barrier); the only timeouts are guards that turn
a hang into a failure.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import threading

import pytest
import torch
from PIL import BmpImagePlugin, EpsImagePlugin, GifImagePlugin, Image, ImageFile

from nftcore.reward import HTTPReward
from nftcore.reward.http_client import TOKEN_ENV, encode_image
from nftcore.reward.server import (
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_TEXT_CHARS,
    RewardServer,
    _DeadlineReader,
    is_loopback,
    main,
)
from nftcore.testing.tiny_judge import random_images
from tests.helpers.judges import tiny_scorer
from tests.helpers.reward_server import FakeScorer, count_attempts, payload, raw_post, small_batch

GUARD_S = 30  # turns a hang into a failure; never what a test waits for


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def blank_png(width: int, height: int) -> str:
    """A 1-bit blank PNG: a few KB of base64 whatever its size, width x height RGB pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def count_decodes(monkeypatch) -> list:
    """Record every pixel decode (PIL's ImageFile.load) made in this process, the server's threads included."""
    calls, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (calls.append(self.size), load(self))[1])
    return calls


# ------------------------------------------------------------------------------------------ decoded-pixel budget

def test_the_probe_request_is_refused_from_the_headers_before_any_pixel_is_decoded(monkeypatch):
    # The probe: blank 4096x4096 1-bit PNGs, each ~3 KB of body and 50 MB decoded. Each is within the per-image
    # limit; together they exceed the default per-request budget.
    big = blank_png(4096, 4096)
    body = json.dumps(payload(3, edited=[big] * 3, sources=[big] * 3)).encode()
    assert len(body) < 20_000
    decodes = count_decodes(monkeypatch)
    fake = FakeScorer()
    with RewardServer(fake, port=0) as server:
        status, reply = raw_post(server.url, body)
    # 3 edited + 1 source = 4 x 4096^2 = 2^26 pixels, exactly the budget; sources[1] is the first image beyond it
    assert DEFAULT_MAX_REQUEST_PIXELS == 4 * 4096**2
    assert status == 413 and reply["error"].startswith("sources[1]:"), reply
    assert f"budget of {DEFAULT_MAX_REQUEST_PIXELS} pixels" in reply["error"]
    assert decodes == [] and fake.batches == []


def test_the_budget_counts_width_times_height_over_all_images_of_a_request():
    fake = FakeScorer()
    with RewardServer(fake, port=0, max_request_pixels=4 * 16 * 16) as server:  # two samples of 16x16 pairs
        status, reply = raw_post(server.url, json.dumps(payload(2)).encode())
        assert status == 200 and len(reply["scores"]) == 2, reply
        status, reply = raw_post(server.url, json.dumps(payload(3)).encode())
    # edited[0..2] and sources[0] make 4 x 256 pixels, the budget; sources[1] goes beyond
    assert status == 413 and reply["error"].startswith("sources[1]:") and "budget of 1024 pixels" in reply["error"]
    assert fake.batches == [2]


def test_sample_count_per_request_is_capped():
    fake = FakeScorer()
    with RewardServer(fake, port=0, max_request_samples=2) as server:
        assert raw_post(server.url, json.dumps(payload(2)).encode())[0] == 200
        status, reply = raw_post(server.url, json.dumps(payload(3)).encode())
    assert status == 413 and "3 samples exceeds the limit of 2" in reply["error"]
    assert fake.batches == [2]


# ------------------------------------------------------------------------------------------------- text length

@pytest.mark.parametrize("field, index", [("prompts", 1), ("requirements", 0)])
def test_text_fields_are_capped_per_field_and_index(field, index):
    fake = FakeScorer()
    n = DEFAULT_MAX_TEXT_CHARS
    with RewardServer(fake, port=0) as server:
        texts = ["p", "p"]
        texts[index] = "x" * n  # at the limit: scored
        assert raw_post(server.url, json.dumps(payload(2, **{field: texts})).encode())[0] == 200
        texts[index] = "x" * (n + 1)
        status, reply = raw_post(server.url, json.dumps(payload(2, **{field: texts})).encode())
    assert status == 413 and reply["error"].startswith(f"{field}[{index}] has {n + 1} characters"), reply
    assert f"limit of {n}" in reply["error"]
    assert fake.batches == [2], "the long text never reached the scorer"


# ------------------------------------------------------------------------------------------------ slow clients

def test_deadline_reader_cuts_a_client_that_keeps_sending():
    # A per-read timeout resets with every byte; the deadline does not. The clock advances one "second" per read.
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"0123456789")
        ticks = iter(range(100))
        reader = _DeadlineReader(a, clock=lambda: next(ticks))
        reader.deadline = 3
        buf = bytearray(1)
        got = []
        with pytest.raises(TimeoutError):
            while True:
                reader.readinto(buf)
                got.append(bytes(buf))
    assert got == [b"0", b"1", b"2"], "bytes were waiting, yet the deadline stopped the reads"


def test_a_stalled_body_gets_408_and_the_connection_closed():
    with RewardServer(FakeScorer(), port=0, read_timeout=0.5) as server:
        with socket.create_connection(host_port(server.url), timeout=GUARD_S) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"edi")  # then nothing
            reply = b""
            while chunk := sock.recv(65536):  # until the server closes
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"Connection: close" in head and "read_timeout" in json.loads(body)["error"]


def test_stalled_headers_get_the_connection_closed():
    with RewardServer(FakeScorer(), port=0, read_timeout=0.5) as server:
        with socket.create_connection(host_port(server.url), timeout=GUARD_S) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            assert sock.recv(65536) == b"", "the server must drop the connection"


# --------------------------------------------------------------------------------------------------- backlog

def test_fifty_simultaneous_connections_are_all_answered():
    # All 50 connections are made before the server accepts any: they must all fit the listen backlog (the
    # stdlib's 5 held only 6; the 7th connect() then waited for the accept loop).
    n = 50
    fake = FakeScorer()
    server = RewardServer(fake, port=0)  # listening, not yet accepting
    body = json.dumps(payload(1)).encode()
    connected = threading.Barrier(n + 1, timeout=GUARD_S)
    statuses, errors = [None] * n, []

    def client(k):
        try:
            conn = http_connection(server.url)
            conn.connect()
            connected.wait()
            conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
            statuses[k] = conn.getresponse().status
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {k}: {type(e).__name__}: {e}")
            connected.abort()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    try:
        for t in threads:
            t.start()
        connected.wait()
        server.start()
        for t in threads:
            t.join()
    finally:
        server.close()
    assert errors == [] and statuses == [200] * n
    assert sum(fake.batches) == n


def http_connection(url: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(*host_port(url), timeout=GUARD_S)


# ----------------------------------------------------------------------------------------------- image formats

def foreign_image(fmt: str) -> bytes:
    if fmt == "EPS":  # an EPS header; decoding it would run Ghostscript
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, plugin", [("BMP", BmpImagePlugin.BmpImageFile), ("GIF", GifImagePlugin.GifImageFile),
                                         ("EPS", EpsImagePlugin.EpsImageFile)])
def test_only_the_png_and_jpeg_decoders_see_the_bytes(monkeypatch, fmt, plugin):
    opened = []
    monkeypatch.setattr(plugin, "_open", lambda self: opened.append(fmt))
    image = base64.b64encode(foreign_image(fmt)).decode("ascii")
    fake = FakeScorer()
    with RewardServer(fake, port=0) as server:
        status, reply = raw_post(server.url, json.dumps(payload(2, edited=[encode_image(Image.new("RGB", (8, 8))),
                                                                           image])).encode())
    assert status == 400 and reply["error"].startswith("edited[1]: not a decodable PNG/JPEG image"), reply
    assert opened == [], f"PIL's {fmt} plugin parsed untrusted bytes"
    assert fake.batches == []


def test_jpeg_is_still_accepted():
    with RewardServer(FakeScorer(), port=0) as server:
        res = HTTPReward(server.url, timeout=GUARD_S, retries=0, image_format="JPEG")(*small_batch(["ab"]))
    assert res.valid.all() and res.scores.tolist() == pytest.approx([0.02])


# ------------------------------------------------------------------------------------------------------- token

def test_token_guards_score_but_not_health():
    fake = FakeScorer()
    with RewardServer(fake, port=0, token="s3cret") as server:
        body = json.dumps(payload(1)).encode()
        assert raw_post(server.url, body)[0] == 401
        assert raw_post(server.url, body, {"Authorization": "Bearer nope"})[0] == 401
        assert raw_post(server.url, body, {"Authorization": "Basic s3cret"})[0] == 401
        # refused before the body is read: no 413 for an unauthenticated giant
        status, reply = raw_post(server.url, b"", {"Content-Length": str(10**12)})
        assert status == 401 and "Authorization: Bearer" in reply["error"]
        status, reply = raw_post(server.url, body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and len(reply["scores"]) == 1
        health = HTTPReward(server.url, token="").health()  # open, with no token sent
        assert health["status"] == "ok" and health["token_required"] is True
    assert fake.batches == [1]


def test_client_sends_the_token_of_its_argument_or_of_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with RewardServer(FakeScorer(), port=0, token="s3cret") as server:
        assert HTTPReward(server.url, token="s3cret")(*small_batch(["a"])).valid.all()
        client = HTTPReward(server.url, retries=3)
        attempts = count_attempts(client)
        res = client(*small_batch(["a", "b"]))
        assert not res.valid.any() and "HTTP 401" in res.reasons[0]
        assert len(attempts) == 1, "a 401 is not retried"
        monkeypatch.setenv(TOKEN_ENV, "s3cret\n")  # as read from a file
        assert HTTPReward(server.url)(*small_batch(["a"])).valid.all()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("", False),
                                            ("10.1.2.3", False), ("judge-node", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_binding_beyond_loopback_needs_a_token_or_insecure():
    with pytest.raises(ValueError, match=r"beyond loopback, without a token.*--token-file.*--insecure"):
        RewardServer(FakeScorer(), host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="token is empty"):
        RewardServer(FakeScorer(), port=0, token="  ")
    for kwargs in ({"token": "s3cret"}, {"insecure": True}):
        RewardServer(FakeScorer(), host="0.0.0.0", port=0, **kwargs).close()


def test_cli_refuses_an_open_bind_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    missing = str(tmp_path / "no-model")  # never loaded: the check comes first
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", missing, "--host", "0.0.0.0"])
    assert exit_info.value.code == 2 and "--insecure" in capsys.readouterr().err
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        main(["--model", missing, "--host", "0.0.0.0", "--token-file", str(empty)])
    assert "is empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- inputs the judge refuses

def test_extreme_aspect_ratio_is_a_400_naming_the_image():
    fake = FakeScorer()
    with RewardServer(fake, port=0) as server:
        ok = encode_image(Image.new("RGB", (1, 200)))  # the processor's limit, inclusive
        status, reply = raw_post(server.url, json.dumps(payload(1, edited=[ok])).encode())
        assert status == 200, reply
        thin = encode_image(Image.new("RGB", (1, 4000)))
        status, reply = raw_post(server.url, json.dumps(payload(2, sources=[ok, thin])).encode())
    assert status == 400 and reply["error"].startswith("sources[1]: image of 1x4000 pixels"), reply
    assert "aspect ratio over 200" in reply["error"]
    assert fake.batches == [1]


class CountingScorer:
    def __init__(self, scorer):
        self.scorer, self.calls = scorer, 0

    def score(self, *args):
        self.calls += 1
        return self.scorer.score(*args)


def test_the_judge_refusing_an_input_is_a_422_that_the_client_does_not_retry():
    scorer = tiny_scorer()
    src = random_images(0, [(64, 64)])[0]
    # the server's default limit is the processor's own
    assert math.isfinite(scorer.score([Image.new("RGB", (1, 200))], [src], ["x"], ["y"]).item())
    with pytest.raises(ValueError, match="aspect ratio"):
        scorer.score([Image.new("RGB", (1, 201))], [src], ["x"], ["y"])
    counting = CountingScorer(scorer)
    with RewardServer(counting, port=0, max_aspect_ratio=None) as server:  # let it reach the judge
        client = HTTPReward(server.url, timeout=GUARD_S, retries=3, backoff=0)
        res = client([Image.new("RGB", (1, 4000))], [src], ["x"], [{"requirement": "y"}])
    assert not res.valid.any() and torch.isnan(res.scores).all()
    assert res.reasons[0].startswith("HTTP 422: the judge cannot score this request: ValueError"), res.reasons
    assert counting.calls == 1, "a deterministic refusal must not be retried"
