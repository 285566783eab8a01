"""distpp.serve hardening without Ray (issue 13): text and number validation at parse time, strict JSON,
bounded body reading (replica and proxy side), per-request isolation of a failing batch, non-finite
results as errors, and the in-flight cost gate. The same behaviour through a real deployment is in
test_serve.py (``serve`` tier)."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import numpy as np
import pytest

from distpp.errors import ConfigError, InputError
from distpp.serve import ServeSettings, parse_request
from distpp.serve.http import (MAX_BODY_BYTES, BodyLimitMiddleware, BodyTooLarge, NonFiniteResult, Overloaded,
                               content_length, parse_json, read_body, status_of)
from distpp.serve.worker import CostGate, finite_or_error, run_isolated

SETTINGS = ServeSettings(preset="tiny", device="cpu", max_batch_size=4)


# --- parse-time validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("body, words", [
    ({"prompt": "\ud800"}, "prompt holds a lone surrogate '\\ud800' at character 0"),
    ({"prompt": "ok", "negative_prompt": "ab\udfff"}, "negative_prompt holds a lone surrogate"),
    ({"prompt": "x", "cfg": 1e39}, "at most 3.403e+38 (float32's largest"),
    ({"prompt": "x", "cfg": 10**400}, "at most 3.403e+38 (float32's largest"),
    ({"prompt": "x", "lam": 10**400}, "lam must be a number in [0, 1]"),
    ({"prompt": "x", "lam": -1e39}, "lam must be a number in [0, 1]"),
    ({"prompt": "x", "lam": True}, "lam must be a number in [0, 1]"),
    ({"prompt": "x", "lam": float("inf")}, "lam must be a number in [0, 1]"),
    ({"prompt": "x", "cfg": float("nan")}, "cfg (the teacher's CFG scale) must be a number"),
    ({"prompt": "x", "cfg": None}, "cfg"),
    ({"prompt": "x", "seed": 10**4000}, "seed must be an integer in [0, 2**32), got an integer of 4001 digits"),
    ({"prompt": "x", "family": ["lcm"]}, "family must be a string, got list"),
    ({"prompt": "x", "family": "flux"}, "unknown family 'flux'"),
])
def test_bad_text_and_numbers_are_refused_at_parse_time(body, words):
    with pytest.raises((ConfigError, InputError)) as e:
        parse_request(body, SETTINGS)
    assert words in str(e.value)
    assert len(str(e.value)) < 400  # a 4001-digit seed is not echoed back whole
    assert status_of(e.value) == 400


def test_float32_edge_values_are_accepted_unchanged():
    r = parse_request({"prompt": "x", "cfg": 1e38, "lam": 1, "seed": 2**32 - 1}, SETTINGS)
    assert (r.cfg, r.lam, r.seed) == (1e38, 1.0, 2**32 - 1)
    assert parse_request({"prompt": "a \U0001f600 pair"}, SETTINGS).prompt == "a \U0001f600 pair"


# --- strict JSON ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, words", [
    (b"[" * 30000, "nested too deeply"),
    (b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", "a JSON integer with 5000 digits"),
    (b'{"prompt": "x", "cfg": NaN}', "NaN is not valid JSON"),
    (b'{"prompt": "x", "cfg": -Infinity}', "-Infinity is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"prompt": ', "not valid JSON"),
])
def test_malformed_json_is_an_input_error(raw, words):
    with pytest.raises(InputError, match=None) as e:
        parse_json(raw)
    assert words in str(e.value)
    assert status_of(e.value) == 400


def test_json_numbers_parse_as_before():
    assert parse_json(b'{"seed": 4294967295, "cfg": 1e400, "lam": 0.5}') == {"seed": 2**32 - 1, "cfg": float("inf"),
                                                                           "lam": 0.5}


# --- bounded bodies -------------------------------------------------------------------------------------
class Stream:
    """An async chunk iterator of ``total`` bytes that counts what was consumed."""

    def __init__(self, total: int, chunk: int = 1 << 16):
        self.total, self.chunk, self.consumed = total, chunk, 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.consumed >= self.total:
            raise StopAsyncIteration
        n = min(self.chunk, self.total - self.consumed)
        self.consumed += n
        return b" " * n


def test_read_body_refuses_a_large_content_length_before_reading():
    s = Stream(256 << 20)
    with pytest.raises(BodyTooLarge, match="is 268435456 bytes; send at most 65536"):
        asyncio.run(read_body(256 << 20, s))
    assert s.consumed == 0


def test_read_body_stops_a_chunked_body_at_the_cap():
    s = Stream(256 << 20, chunk=4096)
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge) as e:
            asyncio.run(read_body(None, s))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status_of(e.value) == 413
    assert s.consumed <= MAX_BODY_BYTES + 4096
    assert peak < 4 * MAX_BODY_BYTES, f"{peak} bytes held while refusing the body"


def test_read_body_within_the_cap():
    assert asyncio.run(read_body(10, Stream(10))) == b" " * 10
    assert asyncio.run(read_body(None, Stream(MAX_BODY_BYTES))) == b" " * MAX_BODY_BYTES


def test_content_length_header():
    assert content_length([(b"Content-Length", b"12")]) == 12
    assert content_length([(b"host", b"x")]) is None
    with pytest.raises(InputError, match="not a byte count"):
        content_length([(b"content-length", b"-5")])


def run_middleware(headers, messages, cap=1024):
    """Drive BodyLimitMiddleware with scripted receive messages -> (sent messages, app saw body or None,
    messages left unread)."""
    seen = {}
    pending = list(messages)

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return pending.pop(0)

    sent = []

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/sample", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=cap)(scope, receive, send))
    return sent, seen.get("body"), len(pending)


def chunks(n: int, size: int) -> list[dict]:
    return [{"type": "http.request", "body": b"x" * size, "more_body": i < n - 1} for i in range(n)]


def test_proxy_middleware_refuses_on_content_length_without_reading():
    sent, body, left = run_middleware([(b"content-length", b"999999")], chunks(100, 10000))
    assert body is None and left == 100
    assert sent[0]["status"] == 413
    assert "send at most 1024 bytes" in json.loads(sent[1]["body"])["error"]


def test_proxy_middleware_stops_a_chunked_body_at_the_cap():
    sent, body, left = run_middleware([], chunks(100, 300))
    assert body is None and sent[0]["status"] == 413
    assert left == 100 - 4  # read 4 x 300 bytes > 1024, then stopped


def test_proxy_middleware_replays_a_small_body():
    sent, body, _ = run_middleware([(b"content-length", b"900")], chunks(3, 300))
    assert body == b"x" * 900 and sent[0]["status"] == 200


# --- isolation, finiteness, cost ------------------------------------------------------------------------
class Req:
    def __init__(self, name: str, key: str = "a", lam: float = 0.1, cfg: float = 7.5):
        self.name, self.group_key, self.lam, self.cfg = name, key, lam, cfg


def fake_group(reqs):
    """Sample stand-in: fails the whole call when any request is 'bad'; 'nan' yields a NaN result."""
    if any(r.name == "bad" for r in reqs):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    return [np.full((2, 2), np.nan if r.name == "nan" else float(len(r.name)), np.float32) for r in reqs]


def test_a_request_that_breaks_its_call_fails_only_itself():
    reqs = [Req("one"), Req("bad"), Req("three"), Req("x", key="b"), Req("nan")]
    out = run_isolated(fake_group, reqs)
    assert isinstance(out[1], UnicodeEncodeError)
    assert np.array_equal(out[0], fake_group([reqs[0]])[0]) and np.array_equal(out[2], fake_group([reqs[2]])[0])
    assert np.array_equal(out[3], fake_group([reqs[3]])[0])
    assert isinstance(out[4], NonFiniteResult) and status_of(out[4]) == 422
    assert "not finite (4 of 4 values NaN/inf)" in str(out[4])


def test_finite_or_error_passes_finite_results_through():
    x = np.ones((4, 3, 3), np.float32)
    assert finite_or_error(Req("a"), x) is x
    x[1, 2, 0] = np.inf
    assert isinstance(finite_or_error(Req("a", cfg=1e38), x), NonFiniteResult)


def test_cost_gate():
    g = CostGate(100)
    assert g.admit(150)  # alone, even over the budget
    assert not g.admit(1)
    g.release(150)
    assert g.admit(60) and g.admit(40) and not g.admit(1)
    g.release(60)
    assert g.admit(10) and g.inflight == 50
    assert status_of(Overloaded("x")) == 503


def test_default_cost_budget_admits_normal_requests_beside_one_heavy():
    from distpp.presets import build_preset
    from distpp.serve import PresetWorker

    w = PresetWorker(SETTINGS, pair=build_preset("tiny"))
    heavy = w.cost(parse_request({"prompt": "x", "family": "ddim", "steps": SETTINGS.max_steps,
                                  "guided_steps": SETTINGS.max_steps}, SETTINGS))
    normal = w.cost(parse_request({"prompt": "x"}, SETTINGS))
    assert (heavy, normal) == (150 * 16 * 16, 6 * 16 * 16)  # (steps + 2 guided) x latent pixels
    g = CostGate(w.cost_bound())
    assert g.admit(heavy) and not g.admit(heavy)
    assert all(g.admit(normal) for _ in range(2 * SETTINGS.max_batch_size)) and not g.admit(normal)
    assert ServeSettings(max_inflight_cost=7).resolved_max_inflight_cost(100, 1) == 7


def test_queue_settings():
    assert ServeSettings(replicas=2, max_batch_size=4).resolved_max_queued_requests == 16
    assert ServeSettings(max_queued_requests=-1).resolved_max_queued_requests == -1
    for kw, words in ((dict(max_queued_requests=0), "max_queued_requests"), (dict(retry_after_s=-1), "retry_after_s"),
                      (dict(max_inflight_cost=0), "max_inflight_cost")):
        with pytest.raises(ConfigError, match=words):
            ServeSettings(**kw)


def test_service_soak_refuses_bad_requests_and_isolates_model_failures(tiny_pair):
    """benchmarks/soak.py --service, short: bad bodies never reach a batch, an injected model failure
    fails at most the one request it hit, batched results equal single ones, RSS flat after warm-up."""
    from reliability.test_soak import load_soak

    r = load_soak().run_service_soak(40, warmup=10, recheck=3, fail_rate=0.3, bad_rate=0.2, torch_threads=1,
                                     pair=tiny_pair)
    assert r["bad_requests"] > 0 and r["bad_refused"] == r["bad_requests"], r
    assert r["failures_injected"] > 0 and 0 <= r["errors"] <= r["failures_injected"], r
    assert r["batched_vs_single_max_rel"] is not None and r["batched_vs_single_max_rel"] <= 1e-5, r
    assert r["rss_growth_after_warmup_mib"] < 8.0, r
