"""distpp.serve: request validation, the per-replica worker (no Ray), and a real local Ray Serve
deployment with 2 CPU replicas of the tiny preset (marked ``serve``; needs ``pip install ".[serve]"``).

Every served latent is compared with a direct batch-1 Sampler call for the same prompt, seed, lam and cfg
(fp32, 1e-5 relative by norm: batching changes the last bits, nothing more).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from distpp import Sampler
from distpp.errors import ConfigError, InputError
from distpp.serve.http import MAX_BODY_BYTES
from distpp.serve import (SampleRequest, PresetWorker, ServeSettings, group_indices, latent_image, parse_request,
                          png_bytes, prompt_cond, settings_from_strings)

RTOL_F32 = 1e-5
SETTINGS = ServeSettings(preset="tiny", replicas=2, max_batch_size=4, batch_wait_timeout_s=0.05, device="cpu")
# The backpressure app: one replica with small admission bounds (one batch in flight, 2 queued at the
# proxy), so a flood is refused whatever the machine's speed, not only on a slow one.
SMALL = ServeSettings(preset="tiny", replicas=1, max_batch_size=4, batch_wait_timeout_s=0.05, device="cpu",
                      max_ongoing_requests=4, max_queued_requests=2, cpus_per_replica=0.5)


@pytest.fixture(scope="module")
def worker() -> PresetWorker:
    return PresetWorker(SETTINGS)


def reference(worker: PresetWorker, req: SampleRequest) -> np.ndarray:
    """The direct, unbatched sampler result for one request: [C, H, W] float32 (memoized per request)."""
    if req not in _REFS:
        _REFS[req] = _direct(worker, req)
    return _REFS[req]


_REFS: dict[SampleRequest, np.ndarray] = {}


def _direct(worker: PresetWorker, req: SampleRequest) -> np.ndarray:
    info = worker.pair.info
    s = Sampler(worker.pair.student, worker.pair.teacher, req.sampler_config(), device="cpu")
    x = s.sample(prompt_cond(info, req.prompt), uncond=prompt_cond(info, req.negative_prompt),
                 latent_shape=info.latent_shape, seeds=[req.seed], lam=req.lam, cfg=req.cfg)
    return x[0].numpy()


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: NaN/inf at {np.argwhere(~np.isfinite(got))[:5].tolist()}"
    assert np.abs(want).max() > 0.1, f"{what}: reference is near zero; the comparison would prove nothing"
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel <= RTOL_F32, f"{what}: relative error {rel:.2e} > {RTOL_F32:.0e}"


# Heterogeneous requests: different prompts, seeds, lam, cfg, negative prompts, and two sampler groups.
REQUESTS = [
    {"prompt": "a red fox", "seed": 11, "lam": 0.3, "cfg": 2.0},
    {"prompt": "a blue car", "seed": 12},
    {"prompt": "a red fox", "seed": 13, "lam": 0.9, "cfg": 7.5, "negative_prompt": "blurry"},
    {"prompt": "a house", "seed": 14, "family": "euler", "steps": 2, "lam": 0.5},
    {"prompt": "a tree", "seed": 15, "lam": 0.0},
    {"prompt": "a boat", "seed": 16, "family": "euler", "steps": 2, "cfg": 3.0},
]


# --- validation (no Ray) -------------------------------------------------------------------------------
@pytest.mark.parametrize("body, err, words", [
    ({"prompt": "x", "lam": 1.5}, ConfigError, "lam must be a number in [0, 1]"),
    ({"prompt": "x", "family": "flow"}, ConfigError, "preset UNets predict epsilon"),
    ({"prompt": "x", "lam": "0.1"}, ConfigError, "lam must be"),
    ({"prompt": "x", "lam": float("nan")}, ConfigError, "lam must be"),
    ({"prompt": "x", "cfg": -1}, ConfigError, "cfg"),
    ({"prompt": "x", "family": "flux"}, ConfigError, "unknown family 'flux'"),
    ({"prompt": "x", "steps": 0}, ConfigError, "steps must be an integer in [1, 50]"),
    ({"prompt": "x", "steps": 51}, ConfigError, "steps must be"),
    ({"prompt": "x", "steps": 2, "guided_steps": 3}, ConfigError, "guided_steps must be an integer in [0, steps=2]"),
    ({"prompt": "x", "seed": "3"}, InputError, "seed must be an integer"),
    ({"prompt": "x", "seed": True}, InputError, "seed must be an integer"),
    ({"prompt": "x", "seed": -1}, InputError, "seed must be"),
    ({"prompt": "x", "seed": 2**32}, InputError, "seed must be"),
    ({"prompt": "x", "seed": 1.0}, InputError, "seed must be"),
    ({"seed": 1}, InputError, "missing required field 'prompt'"),
    ({"prompt": 7}, InputError, "prompt must be a string"),
    ({"prompt": "x" * 5000}, InputError, "at most 4096"),
    ({"prompt": "x", "sed": 1}, InputError, "unknown request field(s) ['sed']"),
    ({"prompt": "x", "output": "jpeg"}, InputError, "output must be one of"),
    (["x"], InputError, "must be a JSON object"),
])
def test_parse_request_rejects(body, err, words):
    with pytest.raises(err) as e:
        parse_request(body, SETTINGS)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)


def test_parse_request_defaults_and_values():
    r = parse_request({"prompt": "a cat"}, SETTINGS)
    assert (r.seed, r.lam, r.cfg, r.family, r.steps, r.guided_steps, r.output, r.negative_prompt) == \
        (0, 0.01, 7.5, "lcm", 4, 1, "latent", "")
    r = parse_request({"prompt": "a", "family": "euler", "steps": 1, "lam": 1, "cfg": 0, "seed": 2**32 - 1}, SETTINGS)
    assert (r.lam, r.cfg, r.group_key, r.seed) == (1.0, 0.0, ("euler", 1, 1), 2**32 - 1)
    assert parse_request({"prompt": "a", "family": "euler_a"}, SETTINGS).lam == 0.05  # the family default


def test_settings_validation_and_strings():
    s = settings_from_strings({"replicas": "3", "batch_wait_timeout_s": "0.02", "warm": "false",
                               "gpus_per_replica": "none", "max_ongoing_requests": "5"})
    assert (s.replicas, s.batch_wait_timeout_s, s.warm, s.gpus_per_replica, s.resolved_max_ongoing_requests) == \
        (3, 0.02, False, None, 5)
    assert ServeSettings(max_batch_size=6).resolved_max_ongoing_requests == 12
    s = settings_from_strings({"weights": "/models/Pair", "dtype": "bfloat16"})
    assert (s.weights, s.dtype) == ("/models/Pair", "bfloat16")
    assert settings_from_strings({"weights": "none"}).weights is None
    for bad, words in (({"replicas": "two"}, "not an int"), ({"replica": "2"}, "unknown serve setting"),
                       ({"warm": "maybe"}, "true or false")):
        with pytest.raises(ConfigError, match=words):
            settings_from_strings(bad)
    for kw, words in ((dict(replicas=0), "replicas"), (dict(preset="huge"), "unknown preset"),
                      (dict(device="tpu"), "device"), (dict(family="x"), "unknown family"),
                      (dict(batch_wait_timeout_s=-1), "batch_wait_timeout_s"), (dict(guided_steps=9), "guided_steps"),
                      (dict(dtype="int8"), "dtype must be one of"),
                      (dict(device="cpu", dtype="float16"), "float16 does not run on CPU"),
                      (dict(preset="tiny_flux"), "serves UNet presets")):
        with pytest.raises(ConfigError, match=words):
            ServeSettings(**kw)


def test_prompt_cond_is_deterministic_and_shaped():
    from distpp.presets import preset_info

    info = preset_info("tiny")
    a, b, c = prompt_cond(info, "a cat"), prompt_cond(info, "a cat"), prompt_cond(info, "a dog")
    assert a.encoder_hidden_states.shape == (1, info.tokens, info.width)
    assert a.encoder_hidden_states.dtype == torch.float32
    assert torch.equal(a.encoder_hidden_states, b.encoder_hidden_states)
    assert not torch.allclose(a.encoder_hidden_states, c.encoder_hidden_states)
    xl = prompt_cond(preset_info("tiny_xl"), "a cat")
    assert xl.text_embeds.shape == (1, 32) and xl.time_ids.shape == (1, 6)


def test_latent_png():
    from PIL import Image

    lat = np.random.default_rng(0).standard_normal((4, 5, 7)).astype(np.float32)
    img = np.asarray(Image.open(io.BytesIO(png_bytes(lat))))
    assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    want = np.round((np.clip(lat[:3].transpose(1, 2, 0), -3, 3) + 3) * 255 / 6)
    assert np.array_equal(img, want.astype(np.uint8))
    assert np.array_equal(latent_image(lat[:1])[..., 0], latent_image(lat[:1])[..., 2])  # 1 channel -> grey


# --- the worker a replica holds (no Ray) ----------------------------------------------------------------
def test_group_indices():
    reqs = [parse_request(b, SETTINGS) for b in REQUESTS]
    assert group_indices(reqs) == [[0, 1, 2, 4], [3, 5]]


def test_worker_batch_matches_direct_sampler(worker):
    reqs = [parse_request(b, SETTINGS) for b in REQUESTS]
    out = worker.run_batch(reqs)
    for i, (r, x) in enumerate(zip(reqs, out)):
        assert not isinstance(x, Exception), x
        assert_close(x, reference(worker, r), f"request {i}")
    # Distinct seeds and settings must give distinct samples (the batch is not one result copied).
    assert not np.allclose(out[0], out[1])


def test_worker_failing_group_spares_the_others(worker):
    class Failing(PresetWorker):
        def __init__(self, base):
            self.__dict__.update(base.__dict__)

        def run_group(self, reqs):
            if reqs[0].family == "euler":
                raise RuntimeError("simulated engine failure")
            return super().run_group(reqs)

    reqs = [parse_request(b, SETTINGS) for b in REQUESTS]
    out = Failing(worker).run_batch(reqs)
    for i, r in enumerate(reqs):
        if r.family == "euler":
            assert isinstance(out[i], RuntimeError) and "simulated" in str(out[i])
        else:
            assert_close(out[i], reference(worker, r), f"request {i}")


# --- a real local Ray Serve deployment ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback_netns() -> None:
    """The serve tier starts a real Ray: only inside a network namespace whose only interface is lo."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        pytest.fail(f"the serve tier runs only in a loopback-only network namespace (interfaces here: {names}); "
                    "run it as tests/in_loopback_netns.sh python -m pytest -m serve")


def listening_sockets() -> list[tuple[str, str]]:
    """(local address:port, owning process's command line) of every listening TCP socket in this network
    namespace (IPv4 and IPv6)."""
    owners = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owners[link[8:-1]] = cmd
        except OSError:  # the process exited meanwhile
            continue
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A":  # TCP_LISTEN
                    continue
                host, port = cols[1].split(":")
                raw = bytes.fromhex(host)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append((f"{ipaddress.ip_address(raw)}:{int(port, 16)}", owners.get(cols[9], "?")))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.fixture(scope="module")
def served():
    """(handle, base_url) of 2 tiny-preset CPU replicas on a fresh local Ray; shut down afterwards."""
    from distpp.serve import is_available

    if not is_available():  # not importorskip: ray must not be imported before init_local_ray
        pytest.skip('needs pip install ".[serve]"')
    require_loopback_netns()
    from distpp.serve.local_ray import init_local_ray

    port = _free_port()
    # 4 logical CPUs: the 2 preset replicas, the pipeline app's one (served_pipeline) and the backpressure
    # app's half (served_small).
    init_local_ray(num_cpus=4, log_to_driver=False)  # a fresh instance, all listeners on 127.0.0.1
    import ray
    from ray import serve

    from distpp.serve import build_app

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(SETTINGS), name="distpp_test", route_prefix="/")
        yield handle, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def http(base: str, path: str, body=None, raw: bytes | None = None, method: str | None = None,
         headers: bool = False):
    """(status, content-type, body bytes) of one loopback HTTP call; with ``headers``, the response
    headers (a dict, lower-case names) are a fourth item."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"content-type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=120)
        status = r.status
    except urllib.error.HTTPError as e:
        r, status = e, e.code
    with r:
        out = (status, r.headers.get("content-type", ""), r.read())
        return out + ({k.lower(): v for k, v in r.headers.items()},) if headers else out


@pytest.mark.serve
def test_local_ray_is_loopback_only(served):
    import ray

    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    sockets = listening_sockets()
    assert sockets
    # Ray 2.60's Serve replicas start an inter-deployment gRPC server on "[::]:0" (replica.py
    # _on_initialized; no option moves it): the one listener off loopback, documented in the README.
    off = [(a, who) for a, who in sockets if not is_loopback(a)]
    replica_grpc = [(a, who) for a, who in off if a.startswith(":::") and "ServeReplica" in who]
    assert off == replica_grpc, f"listeners off loopback: {[x for x in off if x not in replica_grpc]}"
    assert len(replica_grpc) <= len(process_rss_mib("ray::ServeReplica")), replica_grpc


@pytest.mark.serve
def test_served_concurrent_handle_and_http_match_direct_sampler(served, worker):
    handle, base = served
    bodies = [dict(b, seed=b["seed"] + 100 * k) for k in range(2) for b in REQUESTS]  # 12 requests
    outputs = ["latent", "latent_b64"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = [handle.sample.remote(b) for b in bodies]  # handle calls are already asynchronous
        http_futs = [pool.submit(http, base, "/sample", dict(b, output=outputs[i % 2])) for i, b in enumerate(bodies)]
        via_handle = [r.result(timeout_s=120) for r in responses]
        via_http = [f.result() for f in http_futs]

    replicas, batches = set(), []
    for i, (b, h, (status, ctype, raw)) in enumerate(zip(bodies, via_handle, via_http)):
        want = reference(worker, parse_request(b, SETTINGS))
        assert h["seed"] == b["seed"]
        assert_close(h["latent"], want, f"handle request {i}")
        assert status == 200 and ctype.startswith("application/json"), (status, raw[:300])
        j = json.loads(raw)
        if "latent_b64" in j:
            got = np.frombuffer(base64.b64decode(j["latent_b64"]), "<f4").reshape(j["shape"])
        else:
            got = np.asarray(j["latent"], dtype=np.float32)
        assert_close(got, want, f"HTTP request {i}")
        replicas |= {h["replica"], j["replica"]}
        batches += [h["batch_size"], j["batch_size"]]
    assert len(replicas) == 2, f"expected both replicas to serve, got {replicas}"
    assert max(batches) > 1, f"dynamic batching never merged requests: batch sizes {batches}"


@pytest.mark.serve
def test_served_png_health_and_errors(served):
    handle, base = served
    status, ctype, raw = http(base, "/sample", {"prompt": "a cat", "seed": 3, "output": "png"})
    assert status == 200 and ctype == "image/png" and raw[:8] == b"\x89PNG\r\n\x1a\n"
    status, _, raw = http(base, "/healthz")
    h = json.loads(raw)
    assert status == 200 and h["status"] == "ok" and h["latent_shape"] == [4, 16, 16] and h["device"] == "cpu"

    for body, raw_body, code, words in [
        ({"prompt": "x", "lam": 2.0}, None, 400, "lam must be a number in [0, 1]"),
        ({"prompt": "x", "family": "flux"}, None, 400, "unknown family 'flux'"),
        ({"prompt": "x", "seed": "7"}, None, 400, "seed must be an integer"),
        ({"prompt": "x", "steps": 3.5}, None, 400, "steps must be an integer"),
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"x" * 70000, 413, "send at most"),
    ]:
        status, ctype, raw = http(base, "/sample", body, raw=raw_body)
        err = json.loads(raw)
        assert status == code and ctype.startswith("application/json"), (status, raw[:200])
        assert words in err["error"], err
    status, _, raw = http(base, "/nowhere")
    assert status == 404 and "POST /sample" in json.loads(raw)["error"]
    status, _, _ = http(base, "/sample")
    assert status == 405
    with pytest.raises(ValueError, match="unknown family"):  # ConfigError through the handle
        handle.sample.remote({"prompt": "x", "family": "flux"}).result(timeout_s=60)


# --- service hardening (issue 13), on the same real deployment ------------------------------------------
def process_rss_mib(title: str) -> dict[int, float]:
    """{pid: resident MiB} of the processes whose command line starts with ``title`` (Ray names its
    actor processes "ray::<ActorClass>...")."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(title.encode()):
                    continue
            with open(f"/proc/{pid}/status") as f:
                rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        out[int(pid)] = rss_kib / 1024
    return out


REPLICA_TITLE = "ray::ServeReplica:distpp_test:SamplerDeployment"
PROXY_TITLE = "ray::ProxyActor"


def post_large_body(base: str, path: str, total: int, chunked: bool, chunk: int = 1 << 20):
    """POST ``total`` bytes (Content-Length, or chunked without a length) and stop sending as soon as the
    server answers. Returns (status or None, body bytes, bytes sent)."""
    import http.client
    import select

    host, port = base.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=120)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{framing}\r\n"
              "Expect: 100-continue\r\n\r\n".encode())
    piece = b" " * chunk
    frame = f"{chunk:x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    sent, answered = 0, False
    try:
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 120)
            if readable:
                peek = s.recv(64, socket.MSG_PEEK)
                if not peek.startswith(b"HTTP/1.1 100"):
                    answered = True
                    break
                s.recv(len(peek.split(b"\r\n\r\n")[0]) + 4)  # drop "100 Continue"
                continue
            if writable:
                s.sendall(frame)
                sent += chunk
        if not answered and chunked:
            s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, r.read(), sent
    except (ConnectionResetError, http.client.HTTPException):
        return None, b"", sent
    finally:
        s.close()


def concurrent_http(base: str, calls: list[tuple[str, dict | None, bytes | None]], headers: bool = False):
    """Send (path, body, raw) calls at once; returns http()'s tuples in call order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futs = [pool.submit(http, base, path, body, raw, headers=headers) for path, body, raw in calls]
        return [f.result() for f in futs]


def json_error(status: int, ctype: str, raw: bytes, codes) -> dict:
    assert status in codes and ctype.startswith("application/json"), (status, ctype, raw[:300])
    err = json.loads(raw)
    assert set(err) >= {"error", "type"}, err
    return err


def health_of_all_replicas(base: str, rounds: int = 10) -> dict[str, dict]:
    """GET /healthz until every replica answered (Serve routes each call to one replica, and idle
    sequential calls tend to the same one: each round sends 8 at once)."""
    seen = {}
    for _ in range(rounds):
        for status, _, raw in concurrent_http(base, [("/healthz", None, None)] * 8):
            assert status == 200, raw[:300]
            h = json.loads(raw)
            seen[h["replica"]] = h
        if len(seen) == SETTINGS.replicas:
            return seen
    pytest.fail(f"only replicas {sorted(seen)} answered /healthz in {rounds} rounds")


@pytest.mark.serve
def test_poisoned_text_is_refused_and_spares_its_batch(served, worker):
    _, base = served
    before = health_of_all_replicas(base)
    for trial in range(3):
        good = [{"prompt": f"good {k}", "seed": 400 + 10 * trial + k, "output": "latent_b64"} for k in range(7)]
        poison = {"prompt": "\ud800", "seed": 1} if trial != 1 else {"prompt": "ok", "negative_prompt": "x\udfff"}
        calls = [("/sample", b, None) for b in good[:3]] + [("/sample", None, json.dumps(poison).encode())] + \
            [("/sample", b, None) for b in good[3:]]
        out = concurrent_http(base, calls)
        err = json_error(*out[3], codes=(400,))
        assert "surrogate" in err["error"], err
        for b, (status, _, raw) in zip(good, out[:3] + out[4:]):
            assert status == 200, (status, raw[:300])
            j = json.loads(raw)
            got = np.frombuffer(base64.b64decode(j["latent_b64"]), "<f4").reshape(j["shape"])
            assert_close(got, reference(worker, parse_request(b, SETTINGS)), f"trial {trial} {b['prompt']}")
    after = health_of_all_replicas(base)
    assert set(after) == set(before), f"replicas replaced: {sorted(before)} -> {sorted(after)}"
    assert all(h["consecutive_failures"] == 0 for h in after.values()), after


@pytest.mark.serve
@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_large_body_is_refused_without_being_read(served, chunked):
    _, base = served
    before = process_rss_mib(REPLICA_TITLE)
    proxy_before = process_rss_mib(PROXY_TITLE)
    assert len(before) == SETTINGS.replicas and len(proxy_before) == 1, (before, proxy_before)
    total = 256 << 20
    status, raw, sent = post_large_body(base, "/sample", total, chunked)
    after, proxy_after = process_rss_mib(REPLICA_TITLE), process_rss_mib(PROXY_TITLE)
    assert status == 413, (status, raw[:300], sent)
    assert "send at most" in json.loads(raw)["error"]
    assert sent < total // 4, f"the client could send {sent} of {total} bytes: the server kept reading"
    growth = {pid: after.get(pid, 0) - rss for pid, rss in before.items()}
    assert max(growth.values()) <= 16, f"replica RSS grew by {growth} MiB"
    # The proxy's body limit (distpp.serve.http.BodyLimitMiddleware) bounds the proxy as well.
    proxy_growth = {pid: proxy_after.get(pid, 0) - rss for pid, rss in proxy_before.items()}
    assert max(proxy_growth.values()) <= 16, f"proxy RSS grew by {proxy_growth} MiB"


@pytest.mark.serve
@pytest.mark.parametrize("raw, words", [
    (b"[" * 30000, "not valid JSON"),
    (b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", "digits"),
    (b'{"prompt": "x", "lam": 1' + b"0" * 400 + b"}", "lam"),
    (b'{"prompt": "x", "cfg": 1' + b"0" * 400 + b"}", "cfg"),
    (b'{"prompt": "x", "cfg": NaN}', "not valid JSON"),
], ids=["nesting", "seed_digits", "lam_overflow", "cfg_overflow", "nan_literal"])
def test_malformed_numbers_and_nesting_are_400_json(served, raw, words):
    _, base = served
    err = json_error(*http(base, "/sample", raw=raw), codes=(400,))
    assert words in err["error"], err


@pytest.mark.serve
@pytest.mark.parametrize("output", ["latent", "latent_b64", "png"])
def test_float32_overflow_is_never_a_success(served, output):
    _, base = served
    err = json_error(*http(base, "/sample", {"prompt": "x", "cfg": 1e39, "output": output}), codes=(400,))
    assert "cfg" in err["error"], err
    # cfg = 1e38 is a float32 but overflows inside the guidance math: an error answer, never a 200.
    status, ctype, raw = http(base, "/sample", {"prompt": "x", "cfg": 1e38, "lam": 1.0, "output": output})
    err = json_error(status, ctype, raw, codes=(422,))
    assert "not finite" in err["error"], err


@pytest.fixture(scope="module")
def served_small(served):
    """base_url of the backpressure app (SMALL: 1 replica, 4 in flight, 2 queued) beside the preset app."""
    from ray import serve

    from distpp.serve import build_app

    serve.run(build_app(SMALL), name="distpp_small", route_prefix="/small")
    yield served[1] + "/small"
    serve.delete("distpp_small")


@pytest.mark.serve
def test_backpressure_and_cost_bound(served, served_small):
    _, base = served
    # A flood beyond what the replica holds and the proxy may queue (SMALL: 4 + 2 at once): the excess is
    # refused at once with Serve's backpressure answer (503 + Retry-After), everything admitted succeeds.
    # A max-cost request keeps the replica busy while the 48 arrive, so the queue fills.
    busy = {"prompt": "busy", "family": "ddim", "steps": SMALL.max_steps, "guided_steps": SMALL.max_steps}
    with ThreadPoolExecutor(50) as pool:
        holder = pool.submit(http, served_small, "/sample", dict(busy, seed=0))
        time.sleep(0.1)
        futs = [pool.submit(http, served_small, "/sample", {"prompt": f"flood {i}", "seed": i}, headers=True)
                for i in range(48)]
        flood = [f.result() for f in futs]
        assert holder.result()[0] == 200
    codes = [r[0] for r in flood]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    served_503 = [r for r in flood if r[0] == 503 and not r[1].startswith("application/json")]  # Serve's own
    assert served_503, f"no request was refused by Serve's queue bound: {codes}"
    assert all(r[3].get("retry-after") == str(math.ceil(SMALL.retry_after_s)) for r in flood if r[0] == 503)
    # Max-cost requests (ddim, max_steps) next to normal ones: beyond the in-flight cost bound they get a
    # 503 with Retry-After instead of queueing ahead of everyone; the normal requests are served.
    heavy = [("/sample", {"prompt": "heavy", "seed": i, "family": "ddim", "steps": SETTINGS.max_steps,
                          "guided_steps": SETTINGS.max_steps}, None) for i in range(6)]
    normal = [("/sample", {"prompt": "normal", "seed": i}, None) for i in range(4)]
    out = concurrent_http(base, heavy + normal, headers=True)
    heavy_codes, normal_codes = [r[0] for r in out[:6]], [r[0] for r in out[6:]]
    assert heavy_codes.count(503) > 0 and set(heavy_codes) <= {200, 503}, heavy_codes
    assert normal_codes == [200] * 4, [(r[0], r[2][:200]) for r in out[6:]]
    rejected = [r for r in out[:6] if r[0] == 503]
    assert all(r[3].get("retry-after") for r in rejected)
    assert any(json.loads(r[2])["type"] == "Overloaded" for r in rejected), [r[2][:200] for r in rejected]


@pytest.mark.serve
def test_http_fuzz_never_500(served):
    """Hypothesis fuzz of POST /sample (bounded count and time): every answer is a 200 with a finite
    result, a 4xx JSON error, or Serve's 503 backpressure answer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, base = served
    text = st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "\x00", "é" * 3000]))
    number = st.one_of(st.integers(-3, 60), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([10**400, 1e38, 1e39, -0.0, 2**32, True]))
    value = st.one_of(text, number, st.none(), st.lists(st.integers(), max_size=3))
    field = st.sampled_from(["prompt", "negative_prompt", "seed", "lam", "cfg", "family", "steps", "guided_steps",
                             "output", "bogus"])
    family = st.sampled_from(["lcm", "dmd2", "euler", "euler_a", "ddim", "flux"])
    body = st.fixed_dictionaries({"prompt": text}, optional={
        "seed": number, "lam": number, "cfg": number, "steps": st.integers(0, 6), "guided_steps": st.integers(-1, 6),
        "family": family, "output": st.sampled_from(["latent", "latent_b64", "png", "jpeg"]),
        "negative_prompt": text}).flatmap(lambda d: st.dictionaries(field, value, max_size=2).map(
            lambda extra: {**d, **extra}))
    raw = st.one_of(body.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64),
                    st.integers(1, 40000).map(lambda n: b"[" * n), st.just(b'{"prompt": "x", "seed": 1e400}'))

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw)
    def check(data):
        status, ctype, out = http(base, "/sample", raw=data)
        if status == 200:
            if ctype == "image/png":
                assert out[:8] == b"\x89PNG\r\n\x1a\n"
                return
            j = json.loads(out)
            lat = np.frombuffer(base64.b64decode(j["latent_b64"]), "<f4") if "latent_b64" in j else \
                np.asarray(j["latent"], dtype=np.float32)
            assert np.isfinite(lat).all(), data[:200]
        elif status == 503:
            return
        else:
            assert 400 <= status < 500 and ctype.startswith("application/json"), (status, out[:300], data[:200])
            assert set(json.loads(out)) >= {"error", "type"}

    check()
    assert all(h["consecutive_failures"] == 0 for h in health_of_all_replicas(base).values())


# --- pipeline mode: POST /generate on a tiny full text-to-image Pipeline --------------------------------
GEN_BUCKETS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def served_pipeline(served, tmp_path_factory):
    """(handle, base_url of the app, settings, reference Pipeline): a pipeline-mode app on the same local Ray,
    one replica, beside the preset app; the reference is a Pipeline of the same folders, graphs off."""
    from ray import serve

    from distpp import Pipeline
    from distpp.serve import build_app
    from tiny_repos import tiny_repos_for

    repos = tiny_repos_for(tmp_path_factory)
    settings = ServeSettings(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm", local_files_only=True,
                             device="cpu", steps=2, guided_steps=1, replicas=1, max_batch_size=8,
                             batch_buckets=GEN_BUCKETS, batch_wait_timeout_s=0.1, graphs=True)
    handle = serve.run(build_app(settings), name="distpp_gen", route_prefix="/pipe")
    ref = Pipeline.from_pretrained(repos["sd_lcm"], repos["sd_teacher"], "lcm", local_files_only=True, device="cpu",
                                   steps=2, guided_steps=1, graphs=False)
    yield handle, served[1] + "/pipe", settings, ref
    serve.delete("distpp_gen")


def gen_reference(ref, body: dict) -> np.ndarray:
    """The single-request Pipeline(...) image of a /generate body: [H, W, 3] float32."""
    x = ref([body["prompt"]], [body.get("negative_prompt", "")], seeds=[body.get("seed", 0)],
            guided_steps=body.get("guided_steps", 1), lam=body.get("lam", 0.01), cfg=body.get("cfg", 7.5),
            output_type="pt")
    return x[0].permute(1, 2, 0).numpy()


def b64_image(raw: bytes) -> tuple[np.ndarray, dict]:
    j = json.loads(raw)
    return np.frombuffer(base64.b64decode(j["image_b64"]), "<f4").reshape(j["shape"]), j


GEN_BODIES = [{"prompt": f"a cat {k}", "seed": 600 + k, "lam": 0.05 * k, "cfg": 1.0 + k,
               **({"negative_prompt": "blurry"} if k % 3 == 0 else {})} for k in range(8)]


@pytest.mark.serve
def test_generate_concurrent_requests_match_the_pipeline(served_pipeline):
    """8 concurrent /generate requests batched together (padded to a bucket): each float32 image equals its
    single-request Pipeline(...) result within 1e-5 and each PNG within 1/255."""
    from test_serve_generate import assert_image_close, assert_png_close

    handle, base, settings, ref = served_pipeline
    wants = [gen_reference(ref, b) for b in GEN_BODIES]
    out = concurrent_http(base, [("/generate", dict(b, output="image_b64"), None) for b in GEN_BODIES])
    batches = []
    for b, want, (status, ctype, raw) in zip(GEN_BODIES, wants, out):
        assert status == 200 and ctype.startswith("application/json"), (status, raw[:300])
        got, j = b64_image(raw)
        assert_image_close(got, want, f"seed {b['seed']}")
        batches.append(j["batch_size"])
    assert max(batches) > 1, f"dynamic batching never merged requests: batch sizes {batches}"
    pngs = concurrent_http(base, [("/generate", b, None) for b in GEN_BODIES])  # output "png" is the default
    for b, want, (status, ctype, raw) in zip(GEN_BODIES, wants, pngs):
        assert status == 200 and ctype == "image/png", (status, raw[:300])
        assert_png_close(raw, want, f"PNG seed {b['seed']}")
    h = json.loads(http(base, "/healthz")[2])
    assert h["mode"] == "pipeline" and h["batch_buckets"] == list(GEN_BUCKETS) and h["runtime"]["graphs"]
    if any(n not in GEN_BUCKETS for n in batches):
        assert h["runtime"]["padded_calls"] > 0, (batches, h["runtime"])
    got = handle.generate.remote(GEN_BODIES[1]).result(timeout_s=120)
    assert_image_close(got["image"], wants[1], "handle")


@pytest.mark.serve
def test_generate_hardening(served_pipeline):
    """Issue 13 on /generate: a poisoned request next to good ones fails alone with a 400; malformed
    bodies, float32 overflow, bad sizes and big bodies get their 4xx JSON; the wrong route is a 404."""
    from test_serve_generate import assert_image_close

    _, base, _, ref = served_pipeline
    good = GEN_BODIES[:3] + GEN_BODIES[4:7]
    calls = [("/generate", dict(b, output="image_b64"), None) for b in good]
    calls.insert(3, ("/generate", None, b'{"prompt": "\\ud800 cat"}'))
    out = concurrent_http(base, calls)
    assert "surrogate" in json_error(*out[3], codes=(400,))["error"]
    for b, (status, _, raw) in zip(good, out[:3] + out[4:]):
        assert status == 200, raw[:300]
        assert_image_close(b64_image(raw)[0], gen_reference(ref, b), f"seed {b['seed']}")
    for raw, code, words in [
        (b'{"prompt": "x", "cfg": 1e39}', 400, "float32's largest"),
        (b'{"prompt": "x", "height": 64, "width": 64}', 400, "sizes this deployment warmed"),
        (b"[" * 30000, 400, "not valid JSON"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "digits"),
        (b'{"prompt": "x", "cfg": 1e38, "lam": 1.0}', 422, "not finite"),
        (b" " * (MAX_BODY_BYTES + 1), 413, "send at most"),
    ]:
        err = json_error(*http(base, "/generate", raw=raw), codes=(code,))
        assert words in err["error"], err
    err = json_error(*http(base, "/sample", {"prompt": "x"}), codes=(404,))
    assert "use POST /generate" in err["error"]
    err = json_error(*http(served_pipeline[1].rsplit("/pipe", 1)[0], "/generate", {"prompt": "x"}), codes=(404,))
    assert "use POST /sample" in err["error"]
    assert json.loads(http(base, "/healthz")[2])["consecutive_failures"] == 0


# --- last: it replaces a replica ---------------------------------------------------------------------
@pytest.mark.serve
def test_served_replica_failure_keeps_other_requests(served, worker):
    """Kill one replica while requests are in flight: only requests it held may fail; every other
    request completes with the right result, and requests sent after the kill all succeed."""
    import ray

    handle, _ = served
    victim = handle.sample.remote({"prompt": "probe", "seed": 1}).result(timeout_s=120)["replica"]
    name = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::distpp_test#") and a["name"].endswith(victim))
    bodies = [{"prompt": "in flight", "seed": 200 + i} for i in range(12)]
    responses = [handle.sample.remote(b) for b in bodies]
    time.sleep(0.2)
    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
    failed, served_by = 0, []
    for b, r in zip(bodies, responses):
        try:
            out = r.result(timeout_s=120)
        except Exception:  # noqa: BLE001 - only requests held by the killed replica may end here
            failed += 1
            continue
        served_by.append(out["replica"])
        assert_close(out["latent"], reference(worker, parse_request(b, SETTINGS)), f"seed {b['seed']}")
    assert any(r != victim for r in served_by), f"the surviving replica answered none of {served_by}"
    assert failed <= SETTINGS.resolved_max_ongoing_requests, f"{failed} requests lost; the victim held at most " \
        f"{SETTINGS.resolved_max_ongoing_requests}"
    after = [{"prompt": "after", "seed": 300 + i} for i in range(6)]
    for b, out in zip(after, [r.result(timeout_s=120) for r in [handle.sample.remote(b) for b in after]]):
        assert out["replica"] != victim
        assert_close(out["latent"], reference(worker, parse_request(b, SETTINGS)), f"seed {b['seed']}")
