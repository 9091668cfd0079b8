"""Hostile clients against ddim-serve's front, over loopback, bounded in count and time: stalled and trickling
clients, too many connections, a large request among small ones, a full queue, shutdown during requests.

The front runs as in ddim-serve (uvicorn with the guarded protocol, the same app) with a replica in this process
(``LocalForwarder``): what is under test is the front and the replica's batcher, not Ray (tests/test_serve.py
and test_serve_faults.py run them on Ray)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from benchmarks.serve_hostile import HEAD, Stallers, connect
from test_serve_faults import request
from runtime.api import load
from runtime.common.shipped import SHIPPED_MODEL
from runtime.serving.core import Replica, ServeOptions
from runtime.serving.ingress import FrontOptions, LocalForwarder, ThreadedFront

MODEL = SHIPPED_MODEL / "model.onnx"


@pytest.fixture(scope="module")
def replica():
    return Replica(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=2, max_batch=4, batch_wait_ms=0))


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict, bytes]:
    return request(url, "/v1/samples", body, timeout)


def answer(s: socket.socket, timeout: float) -> tuple[int, dict]:
    """(status, JSON body) of what the server sent before closing; (0, {}) when it sent nothing."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    if not data:
        return 0, {}
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def test_300_stalled_clients_do_not_delay_a_normal_request(replica):
    """300 clients send headers and no body, 20 send half a head, 1 trickles its body: a normal request is
    answered at once; each of them gets a JSON 408 at its deadline and the connection is closed."""
    front = FrontOptions(header_timeout_s=3, body_timeout_s=3)
    with ThreadedFront(LocalForwarder(replica), front) as url:
        clients = Stallers(url, 300, 20, drip_s=0.3)
        stalled, halves, trickle = clients.stalled, clients.halves, clients.trickle
        opened = time.monotonic()
        t0 = time.perf_counter()
        status, _, body = post(url, {"num_images": 1, "steps": 3, "format": "npz"}, timeout=30)
        normal_s = time.perf_counter() - t0
        assert status == 200 and normal_s < 5, (status, normal_s)
        codes = [answer(s, 10)[0] for s in stalled]
        head_codes = [answer(s, 10) for s in halves]
        trickled = answer(trickle, 10)
        waited = time.monotonic() - opened
        assert codes.count(408) == 300, sorted(set(codes))
        assert {c for c, _ in head_codes} == {408}
        assert head_codes[0][1]["error"] == "request headers not received within 3 s"
        assert trickled == (408, {"error": "request body not received within 3 s"})
        assert waited < 15
        # The service is still whole.
        assert post(url, {"num_images": 1, "steps": 2})[0] == 200
        clients.close()


def test_a_client_leaving_mid_body_costs_nothing(replica, caplog):
    with ThreadedFront(LocalForwarder(replica)) as url:
        for _ in range(5):
            s = connect(url)
            s.sendall(HEAD + b'{"num')
            s.close()
        time.sleep(0.5)
        assert post(url, {"num_images": 1, "steps": 2})[0] == 200
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_connections_over_the_cap_get_a_json_503_and_malformed_heads_a_json_400(replica):
    with ThreadedFront(LocalForwarder(replica), FrontOptions(max_connections=20)) as url:
        idle = [connect(url) for _ in range(20)]
        time.sleep(0.2)
        extra = connect(url)
        status, body = answer(extra, 5)
        assert status == 503 and body["error"] == "over 20 open connections; retry later"
        for s in idle:
            s.close()
        time.sleep(0.3)
        bad = connect(url)
        bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body = answer(bad, 5)
        assert status == 400 and body["error"].startswith("malformed HTTP request")
        big = connect(url)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n")
        assert answer(big, 5) == (431, {"error": "request head over 16384 bytes"})
        assert post(url, {"num_images": 1, "steps": 2})[0] == 200


def test_a_small_request_is_answered_while_a_large_one_runs(replica):
    """A 4 x 500-step request (about 5 s here) is running; a 3-step request overtakes it at a step
    boundary and equals ddim-run's image; the large one completes, whole."""
    with ThreadedFront(LocalForwarder(replica)) as url:
        large: dict = {}
        worker = threading.Thread(target=lambda: large.update(r=post(url, {"num_images": 4, "steps": 500,
                                                                           "seed": 5, "format": "npz"})))
        t_large = time.perf_counter()
        worker.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        status, _, body = post(url, {"num_images": 1, "steps": 3, "seed": 9, "format": "npz"})
        small_s = time.perf_counter() - t0
        worker.join()
        large_s = time.perf_counter() - t_large
        assert status == 200
        ref = load(MODEL, "onnxruntime", "cpu", "fp32").sample(1, steps=3, seed=9).images
        np.testing.assert_array_equal(np.load(io.BytesIO(body))["images"], ref)
        assert large["r"][0] == 200 and np.load(io.BytesIO(large["r"][2]))["images"].shape[0] == 4
        assert small_s < large_s / 2, (small_s, large_s)
        assert small_s < 3, small_s


def test_a_full_queue_is_a_503_with_retry_after():
    tight = Replica(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=2, max_batch=4, batch_wait_ms=0,
                                 max_queue_s=1.0))
    with ThreadedFront(LocalForwarder(tight)) as url:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=post(url, {"num_images": 4, "steps": 200})))
        worker.start()
        time.sleep(0.5)
        status, headers, body = post(url, {"num_images": 4, "steps": 200})
        assert status == 503, body
        assert json.loads(body)["error"].startswith("the service is busy: this request would finish in about")
        assert int(headers["retry-after"]) >= 1
        worker.join()
        assert first["r"][0] == 200  # an idle replica admits anything in its limits
        assert tight.core.stats.refused == 1


def test_shutdown_finishes_or_answers_in_flight_requests_in_json(replica):
    """Draining: a request that finishes within the grace period gets its images; one that does not gets a JSON
    503; the listener is closed for new ones."""
    front = ThreadedFront(LocalForwarder(replica), FrontOptions(grace_s=1.0))
    with front as url:
        got: dict = {}
        quick = threading.Thread(target=lambda: got.update(quick=post(url, {"num_images": 1, "steps": 20})))
        slow = threading.Thread(target=lambda: got.update(slow=post(url, {"num_images": 4, "steps": 400})))
        slow.start()
        time.sleep(0.3)
        quick.start()
        time.sleep(0.2)
        front.drain()
        quick.join(30)
        slow.join(30)
        assert got["quick"][0] == 200
        status, headers, body = got["slow"]
        assert status == 503 and json.loads(body)["error"].startswith("the service is shutting down")
    with pytest.raises(ConnectionRefusedError):
        connect(url)


# -- GET /metrics and the API token: the front's own, tested on it alone ---------------------------------------------

TOKEN = "test-token-" + "0123456789abcdef"


def fetch(url: str, path: str, headers: dict | None = None, body: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of a GET (or a POST of ``body``)."""
    req = urllib.request.Request(f"{url}{path}", headers=headers or {}, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """GET /metrics parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, head, body = fetch(url, "/metrics", headers)
    assert status == 200 and head["content-type"].startswith("text/plain; version=0.0.4"), (status, body)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def count(samples: dict, route: str, status: int) -> float:
    return samples.get(("ddim_serve_requests_total", frozenset({("route", route), ("status", str(status))})), 0.0)


def test_metrics_count_every_answer_the_front_sends_and_the_batches_replicas_ran():
    """Each status the front answers is counted under its route, the protocol's own refusals under route none
    (connection cap, malformed head, head deadline); the replica's batches (6 images at max batch 4: 4 + 2), its
    images and the request's queue wait and sampling time come from its answer."""
    fresh = Replica(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=2, max_batch=4, batch_wait_ms=0,
                                 batching="request"))  # request-level: a batch is a whole run (step-level: a call)
    front = ThreadedFront(LocalForwarder(fresh), FrontOptions(header_timeout_s=1, body_timeout_s=1,
                                                              max_connections=6))
    with front as url:
        idle = [connect(url) for _ in range(6)]
        time.sleep(0.2)
        assert answer(connect(url), 5)[0] == 503  # over the connection cap
        for s in idle:
            s.close()
        assert post(url, {"num_images": 6, "steps": 2, "format": "npz"})[0] == 200
        assert post(url, {"eta": 2})[0] == 422
        assert post(url, {"pad": "x" * 70_000})[0] == 413
        assert fetch(url, "/no-such-route")[0] == 404
        assert fetch(url, "/v1/samples")[0] == 405
        trickle, silent, bad, big = connect(url), connect(url), connect(url), connect(url)
        trickle.sendall(HEAD + b'{"num')
        bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
        assert [answer(s, 5)[0] for s in (bad, big, trickle, silent)] == [400, 431, 408, 408]
        front.loop.call_soon_threadsafe(front.app.state.draining.set)  # draining, the listener still open
        time.sleep(0.1)
        assert post(url, {"num_images": 1, "steps": 2})[0] == 503
        got = scrape(url)
        status, head, body = fetch(url, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert head["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    for route, status, n in [("/v1/samples", 200, 1), ("/v1/samples", 422, 1), ("/v1/samples", 413, 1),
                             ("/v1/samples", 408, 1), ("/v1/samples", 405, 1), ("/v1/samples", 503, 1),
                             ("other", 404, 1), ("/healthz", 431, 1), ("none", 400, 1), ("none", 503, 1)]:
        assert count(got, route, status) == n, (route, status, {k: v for k, v in got.items() if "requests_t" in k[0]})
    assert count(got, "none", 408) >= 1  # the silent client (and any idle socket not closed in time)
    assert got[("ddim_serve_images_sampled_total", frozenset())] == 6
    batch = {dict(labels).get("le"): v for (name, labels), v in got.items() if name == "ddim_serve_batch_size_bucket"}
    assert (batch["1.0"], batch["2.0"], batch["4.0"], batch["+Inf"]) == (0, 1, 2, 2)
    assert got[("ddim_serve_batch_size_sum", frozenset())] == 6
    assert got[("ddim_serve_queue_wait_seconds_count", frozenset())] == 1
    assert got[("ddim_serve_sampling_seconds_count", frozenset())] == 1
    assert got[("ddim_serve_sampling_seconds_sum", frozenset())] > 0
    assert got[("ddim_serve_requests_in_flight", frozenset())] == 1  # the scrape itself


def test_replica_totals_never_go_back_across_restarts_and_late_answers():
    """Totals are per replica life: an older (smaller) report changes nothing, a restarted replica's totals add."""
    from runtime.serving.core import Answer, Report
    from runtime.serving.metrics import FrontMetrics

    metrics = FrontMetrics()

    def seen() -> tuple[float, float, float]:
        get = metrics.registry.get_sample_value
        return (get("ddim_serve_images_sampled_total"), get("ddim_serve_batch_size_count"),
                get("ddim_serve_batch_size_sum"))

    metrics.replica_answer(Answer(200, b"", report=Report("a", {4: 2, 1: 1}, 9, 0.1, 0.2)))
    metrics.replica_answer(Answer(200, b"", report=Report("a", {4: 1}, 4, 0.1, 0.2)))  # overtaken by the first
    assert seen() == (9, 3, 9)
    metrics.replica_answer(Answer(503, b"", report=Report("b", {2: 1}, 2)))  # the restarted replica
    assert seen() == (11, 4, 11)
    assert metrics.registry.get_sample_value("ddim_serve_queue_wait_seconds_count") == 2  # 200s only


def test_an_api_token_guards_every_route_but_healthz(replica, caplog):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadedFront(LocalForwarder(replica), FrontOptions(api_token=TOKEN)) as url:
        assert fetch(url, "/healthz")[0] == 200  # a load balancer's probe needs no token
        for path in ("/v1/model", "/metrics", "/docs", "/openapi.json", "/no-such-route"):
            status, head, body = fetch(url, path)
            assert (status, head["www-authenticate"]) == (401, "Bearer"), path
            assert json.loads(body) == {"error": "authentication required: send the header "
                                                 "'Authorization: Bearer TOKEN'"}
        status, head, body = fetch(url, "/v1/samples", body={"num_images": 1, "steps": 2})
        assert status == 401 and head["connection"] == "close"  # its body is never read
        status, head, body = fetch(url, "/v1/model", {"Authorization": f"Bearer {TOKEN}x"})
        assert (status, head["www-authenticate"], json.loads(body)) == (
            401, 'Bearer error="invalid_token"', {"error": "invalid bearer token"})
        assert fetch(url, "/v1/model", {"Authorization": f"Basic {TOKEN}"})[0] == 401
        assert fetch(url, "/v1/model", {"Authorization": "Bearer"})[0] == 401
        assert fetch(url, "/v1/samples", {"Authorization": f"bearer {TOKEN}"},  # the scheme is case-insensitive
                     {"num_images": 1, "steps": 2})[0] == 200
        assert fetch(url, "/v1/model", auth)[0] == 200
        schema = json.loads(fetch(url, "/openapi.json", auth)[2])
        assert schema["security"] == [{"bearer": []}] and schema["paths"]["/healthz"]["get"]["security"] == []
        got = scrape(url, auth)
    assert count(got, "/v1/model", 401) == 4 and count(got, "/v1/samples", 401) == 1
    assert count(got, "/healthz", 200) == 1 and count(got, "/v1/samples", 200) == 1
    assert TOKEN not in caplog.text and TOKEN not in repr(FrontOptions(api_token=TOKEN))
    with pytest.raises(ValueError) as exc:
        FrontOptions(api_token="sh0rt")
    assert "needs at least 16" in str(exc.value) and "sh0rt" not in str(exc.value)
