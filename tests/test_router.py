"""``lmshare router`` as operators run it (through the CLI) in front of small fake OpenAI
servers, each its own process: passthrough, policies by load, failures and clear errors."""

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.fake_openai import FakeServer as Fake
from lmshare.testing.fake_openai import get_json as _get
from lmshare.testing.waiting import wait_until


def post(port: int, path: str, body, timeout: float = 20.0):
    """(status, headers, raw body) of a POST to the router."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, raw, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(runtime_dir=tmp_path / "cluster", key_file=None)
    fakes: list[Fake] = []

    def fake(name: str, *extra: str) -> Fake:
        fakes.append(Fake(name, tmp_path, *extra))
        return fakes[-1]

    c.fake = fake
    try:
        yield c
    finally:
        c.stop()
        for f in fakes:
            f.kill()


def router(cluster, backends, policy="round-robin", *extra: str) -> int:
    port = free_port()
    cluster.start_router(port, *(f"{b.url}={b.name}" if isinstance(b, Fake) else b
                                 for b in backends),
                         policy=policy, extra=extra)
    return port


def test_round_robin_passes_requests_and_streams_through_unchanged(cluster):
    a, b = cluster.fake("a"), cluster.fake("b")
    port = router(cluster, [a, b])
    raw = b'{"model": "fake-model", "prompt": "hello \\u00e9", "max_tokens": 3,  "extra": [1]}'
    seen = []
    for _ in range(4):
        status, headers, body = post(port, "/v1/completions", raw)
        assert status == 200
        reply = json.loads(body)
        assert reply["echo"] == raw.decode()  # the body arrived byte for byte
        assert headers["X-LMShare-Backend"] == reply["backend"]
        seen.append(reply["backend"])
    assert sorted(seen) == ["a", "a", "b", "b"] and seen[0] != seen[1]

    # a large answer arrives whole
    status, _, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 30000})
    assert status == 200 and len(json.loads(body)["choices"][0]["text"].split()) == 30000

    # a stream arrives as the backend sent it, event by event, ending with [DONE]
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 5}

    def events(raw: bytes) -> list:
        # each event's choices (the fake's request counter in the id differs)
        return [json.loads(e[6:])["choices"] if e != b"data: [DONE]" else e
                for e in raw.split(b"\n\n") if e]

    for _ in range(2):
        status, headers, body = post(port, "/v1/chat/completions", chat)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        fake = {"a": a, "b": b}[headers["X-LMShare-Backend"]]
        direct = urllib.request.urlopen(urllib.request.Request(
            f"{fake.url}/v1/chat/completions", data=json.dumps(chat).encode()), timeout=10).read()
        assert events(body) == events(direct) and len(events(body)) == 6

    status, models = _get(f"http://127.0.0.1:{port}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["fake-model"]
    status, health = _get(f"http://127.0.0.1:{port}/health")
    assert status == 200 and sorted(health["up"]) == ["a", "b"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'lmshare_router_requests_total{code="200",endpoint="completions"} 5.0' in metrics
    assert 'lmshare_router_decisions_total{policy="round-robin",reason="rotation"} 7.0' in metrics
    assert "lmshare_router_backend_in_flight{" in metrics


def test_least_loaded_sends_requests_away_from_a_busy_backend(cluster):
    a, b = cluster.fake("a", "--token-delay", "0.2"), cluster.fake("b", "--token-delay", "0.2")
    port = router(cluster, [a, b], "least-loaded")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, port, "/v1/completions",
                           {"prompt": "long", "max_tokens": 40, "stream": True}, 30)
        wait_until(lambda: sum(f.served() for f in (a, b)) == 1, 10, "the slow request started")
        busy = "a" if a.served() else "b"
        for _ in range(3):
            status, headers, _ = post(port, "/v1/completions", {"prompt": "q", "max_tokens": 1})
            assert status == 200 and headers["X-LMShare-Backend"] != busy
        assert slow.result()[0] == 200


def test_a_dead_backend_is_retried_elsewhere_then_503_with_reasons(cluster):
    a, b = cluster.fake("a"), cluster.fake("b")
    port = router(cluster, [a, b], "round-robin", "--health-interval", "30")
    a.kill()  # the router has not noticed: requests sent to a are retried on b
    for _ in range(4):
        status, headers, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 1})
        assert status == 200, body
        assert json.loads(body)["backend"] == "b"
    status, health = _get(f"http://127.0.0.1:{port}/health")
    assert list(health["down"]) == ["a"] and health["up"] == ["b"]
    b.kill()
    status, _, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 1})
    error = json.loads(body)["error"]
    assert status == 502 and "every backend tried failed" in error["message"]
    status, _, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 1})
    error = json.loads(body)["error"]
    assert status == 503 and "no backend is up" in error["message"]
    assert "a: " in error["message"] and "b: " in error["message"]
    status, health = _get(f"http://127.0.0.1:{port}/health")
    assert status == 503 and health["status"] == "unavailable"


def test_a_backend_answering_503_is_retried_and_bad_requests_get_400(cluster):
    a, b = cluster.fake("a", "--fail-status", "503"), cluster.fake("b")
    port = router(cluster, [a, b], "round-robin", "--health-interval", "30")
    for _ in range(3):
        status, _, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 1})
        assert status == 200 and json.loads(body)["backend"] == "b"
    status, _, body = post(port, "/v1/completions", b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]["message"]
    status, _, body = post(port, "/v1/completions", b"[1, 2]")
    assert status == 400
    status, _, body = post(port, "/v1/completions", {"model": "other", "prompt": "p"})
    assert status == 404 and "fake-model" in json.loads(body)["error"]["message"]


def test_a_backend_killed_mid_stream_ends_the_stream_with_an_error(cluster):
    a = cluster.fake("a", "--token-delay", "0.2")
    port = router(cluster, [a], "round-robin")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "p", "max_tokens": 100, "stream": True}), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    first = reply.readline()
    assert first.startswith(b"data: ")
    a.kill()
    started = time.monotonic()
    rest = reply.read()  # ends: no hang
    assert time.monotonic() - started < 10
    assert b'"type": "backend_failed"' in rest and b"[DONE]" not in rest
    conn.close()


def test_router_starts_without_torch_and_says_what_the_prefix_policies_need():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import lmshare.cli, lmshare.router.service\n"
            "from lmshare.router.tokens import Tokenizer\n"
            "try:\n    Tokenizer('x')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError") and "pip install transformers" in out.stdout
    usage = subprocess.run([sys.executable, "-m", "lmshare", "router", "--insecure",
                            "--backend", "http://127.0.0.1:1=w"], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "needs --controller" in usage.stderr
    usage = subprocess.run([sys.executable, "-m", "lmshare", "router", "--backend", "ftp://x"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "URL[=WORKER]" in usage.stderr


def test_a_backend_that_stalls_past_the_read_timeout_is_retried_elsewhere(cluster):
    a, b = cluster.fake("a", "--token-delay", "20"), cluster.fake("b")
    port = router(cluster, [a, b], "round-robin", "--read-timeout", "1")
    for _ in range(3):
        started = time.monotonic()
        status, headers, body = post(port, "/v1/completions", {"prompt": "p", "max_tokens": 1})
        assert status == 200 and headers["X-LMShare-Backend"] == "b", body
        assert time.monotonic() - started < 10
    assert a.served() >= 1  # a got requests, and they went on to b
