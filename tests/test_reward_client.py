"""`HTTPReward` against a stand-in server that answers whatever a test wants (a broken or foreign judge), and the
error summary the training loop logs once per epoch (`summarize_errors`, `format_error_summary`)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nftcore.reward import HTTPReward, RewardResult, WeightedSum
from nftcore.reward.base import MAX_REASON_CHARS, NONFINITE_REASON, format_error_summary, summarize_errors
from tests.helpers.reward_server import record_backoffs, small_batch

GUARD_S = 30  # turns a hang into a failure; never what a test waits for


class CannedJudge:
    """A server that answers every POST with `status` and `body` (bytes, or a JSON-able object), and keeps the
    headers of each request it got."""

    def __init__(self, status: int, body):
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                judge.requests.append(dict(self.headers))
                self.send_response(judge.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(judge.body)))
                self.end_headers()
                self.wfile.write(judge.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def __enter__(self) -> "CannedJudge":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def score_reply(scores, **client_kwargs) -> RewardResult:
    """What HTTPReward makes of a 200 reply carrying `scores`, for as many samples."""
    with CannedJudge(200, {"scores": scores}) as judge:
        return HTTPReward(judge.url, timeout=GUARD_S, retries=0, **client_kwargs)(*small_batch(["p"] * len(scores)))


# ------------------------------------------------------------------------------------------ entries of a reply

def test_non_numeric_scores_are_invalid_samples_with_a_reason():
    res = score_reply(["abc", None, {}, [0.5], True, "0.5", 0.25])
    assert res.valid.tolist() == [False] * 6 + [True]
    assert torch.isnan(res.scores[:6]).all() and res.scores[6].item() == 0.25, "never a fake number"
    assert res.reasons == ("non-numeric score in the reply (str)", "the judge gave a non-finite score (null)",
                           "non-numeric score in the reply (dict)", "non-numeric score in the reply (list)",
                           "non-numeric score in the reply (bool)", "non-numeric score in the reply (str)", None)
    assert "samples [0, 5]: non-numeric score in the reply (str)" in res.errors


def test_scores_outside_the_rubric_range_or_non_finite_are_invalid():
    eps = torch.finfo(torch.float32).eps
    scores = [50.0, -50.0, 0.0, 1.0, 1 + eps, -eps, 1.001, -0.001, float("inf"), float("nan"), 10**400]
    res = score_reply(scores)  # inf and nan travel as JSON's Infinity / NaN, which Python's json reads
    assert res.valid.tolist() == [False, False, True, True, True, True, False, False, False, False, False]
    assert res.reasons[0] == res.reasons[6] == "score outside the valid range [0, 1]"
    assert res.reasons[8] == res.reasons[9] == res.reasons[10] == "non-finite score in the reply"
    assert res.scores[4].item() == 1.0 and res.scores[5].item() == 0.0, "a rounding overshoot is clamped"


def test_the_range_is_an_argument():
    assert score_reply([4.5, 5.5], score_range=(0, 5)).valid.tolist() == [True, False]
    assert score_reply([50.0, -50.0], score_range=None).scores.tolist() == [50.0, -50.0]
    with pytest.raises(ValueError, match="low < high"):
        HTTPReward(score_range=(1, 1))


@pytest.mark.parametrize("reply", [b"[" * 100_000, b"not json", b'{"scores": "0.5"}', b'{"scores": [0.5, 0.5]}',
                                   b'["scores"]'])
def test_an_unreadable_reply_is_invalid_never_an_exception(reply):
    with CannedJudge(200, reply) as judge:
        res = HTTPReward(judge.url, timeout=GUARD_S, retries=1, backoff=0)(*small_batch(["p"]))
    assert not res.valid.any() and res.reasons[0].startswith("malformed response")
    assert len(judge.requests) == 2, "an unreadable reply is retried"


# --------------------------------------------------------------------------------------------- what is retried

@pytest.mark.parametrize("status, attempts", [(400, 1), (401, 1), (404, 1), (413, 1), (422, 1),
                                              (408, 3), (500, 3), (503, 3)])
def test_deterministic_failures_are_not_retried(monkeypatch, status, attempts):
    waits = record_backoffs(monkeypatch)
    with CannedJudge(status, {"error": "no"}) as judge:
        res = HTTPReward(judge.url, timeout=GUARD_S, retries=2, backoff=0.5)(*small_batch(["p", "q"]))
    assert not res.valid.any() and res.reasons == (f"HTTP {status}: no",) * 2
    assert len(judge.requests) == attempts and waits == [0.5, 1.0][:attempts - 1]


def test_the_token_is_sent_only_when_there_is_one(monkeypatch):
    monkeypatch.delenv("NFTCORE_REWARD_TOKEN", raising=False)
    with CannedJudge(200, {"scores": [0.5]}) as judge:
        HTTPReward(judge.url, retries=0)(*small_batch(["p"]))
        HTTPReward(judge.url, retries=0, token="t0k")(*small_batch(["p"]))
        monkeypatch.setenv("NFTCORE_REWARD_TOKEN", "from-env")
        HTTPReward(judge.url, retries=0)(*small_batch(["p"]))
        HTTPReward(judge.url, retries=0, token="")(*small_batch(["p"]))  # an explicit "" turns it off
    assert [r.get("Authorization") for r in judge.requests] == [None, "Bearer t0k", "Bearer from-env", None]


# ----------------------------------------------------------------------------------------------- error summary

def test_summary_counts_samples_per_reason_across_chunks_and_batches():
    with CannedJudge(503, {"error": "busy"}) as judge:
        client = HTTPReward(judge.url, timeout=GUARD_S, retries=0, max_chunk=2)
        results = [client(*small_batch(["p"] * 5)), client(*small_batch(["p"]))]
    assert len(results[0].errors) == 3, "one message per chunk, with its samples"
    assert summarize_errors(results) == {"HTTP 503: busy": 6}


def test_summary_of_mixed_results():
    nan = math.nan
    results = [
        RewardResult.from_scores([0.5, nan, 0.7]),  # a judge's NaN
        RewardResult.invalid(3, "HTTP 500: scoring failed:\n  RuntimeError: CUDA error"),
        RewardResult.from_scores([nan, nan, 0.1], reasons=("score outside the valid range [0, 1]", None, None)),
        RewardResult(torch.tensor([nan, 0.2]), torch.tensor([False, True]), errors=("judge timed out",)),  # no reasons
        RewardResult(torch.tensor([0.3, nan]), torch.tensor([True, True])),  # NaN marked valid: not usable either
        RewardResult.from_scores([0.9, 0.8]),
    ]
    counts = summarize_errors(results)
    assert counts == {NONFINITE_REASON: 3, "HTTP 500: scoring failed: RuntimeError: CUDA error": 3,
                      "score outside the valid range [0, 1]": 1, "judge timed out": 1}
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert sum(counts.values()) == sum(int((~(r.valid & torch.isfinite(r.scores))).sum()) for r in results)
    line = format_error_summary(counts)
    assert "\n" not in line and line.startswith("8 invalid rewards: 3 x non-finite score; 3 x HTTP 500")
    assert format_error_summary({}) == "no invalid rewards" and summarize_errors([]) == {}


def test_summary_of_a_weighted_sum_names_the_failed_part():
    def judge(edited, sources, prompts, metadata):
        return RewardResult.from_scores([0.5, math.nan, math.nan])

    def ocr(edited, sources, prompts, metadata):
        return RewardResult.from_scores([1.0, 1.0, math.nan])

    combined = WeightedSum({"mllm": (judge, 1.0), "ocr": (ocr, 0.5)})(*small_batch(["p", "q", "r"]))
    assert combined.valid.tolist() == [True, False, False]
    assert summarize_errors([combined]) == {"mllm: non-finite score": 1,
                                            "mllm: non-finite score; ocr: non-finite score": 1}


def test_long_reasons_are_cut_for_one_line():
    reason = "HTTP 400: " + "x" * 1000
    (key,) = summarize_errors([RewardResult.invalid(2, reason)])
    assert len(key) == MAX_REASON_CHARS and key.endswith("...")


def test_reasons_must_match_the_batch():
    with pytest.raises(ValueError, match="one entry per sample"):
        RewardResult(torch.zeros(2), torch.ones(2, dtype=torch.bool), reasons=("a",))
