"""Prefix routing through the CLI: a real controller and workers (separate processes), fake
OpenAI servers as the backends, and ``lmshare router`` asking the controller who holds a
prompt's KV. The KV namespace comes from what each worker's clients look up."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from lmshare import ModelSignature
from lmshare.keys import signature_keys
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.fake_openai import FakeServer as Fake
from lmshare.testing.waiting import wait_until

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SIG = ModelSignature(model="router-test", chunk_tokens=16)
WORDS = "river stone cloud window garden number letter city ocean forest light paper".split()


def text(seed: int, words: int = 120) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(words))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from lmshare.testing.tiny_model import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def setup(tmp_path, monkeypatch, shm_dir):
    c = LocalCluster(heartbeat_timeout_s=2.0, runtime_dir=tmp_path / "cluster")
    monkeypatch.setenv("LMSHARE_KEY_FILE", c.key_file)
    c.start_controller("--heartbeat-interval", "0.2")
    fakes = {}
    try:
        for name in ("a", "b"):
            c.start_worker(name)
        c.fake = lambda name, *extra: fakes.setdefault(name, Fake(name, tmp_path, *extra))
        yield c
    finally:
        c.stop()
        for f in fakes.values():
            f.kill()


def store(cluster, worker: str, tokens: list[int]) -> int:
    """Store KV of ``tokens``' full chunks in ``worker`` and look them up there (as a vLLM
    connector does, which tells the worker its namespace); returns the chunk count."""
    chunks = len(signature_keys(SIG, tokens))
    with cluster.client(worker) as client:
        client.put(SIG, tokens, [os.urandom(1024) for _ in range(chunks)])
        assert client.lookup(SIG, tokens).local_tokens == chunks * SIG.chunk_tokens
    with cluster.client("a" if worker == "b" else "b") as other:  # sees them via the controller
        wait_until(lambda: other.lookup(SIG, tokens, peers=True).tokens
                   == chunks * SIG.chunk_tokens, 10, "chunks indexed")
    return chunks


def start_router(cluster, tokenizer_dir, policy: str, *extra: str) -> int:
    port = free_port()
    a, b = cluster.fake("a", "--token-delay", "0.1"), cluster.fake("b", "--token-delay", "0.1")
    cluster.start_router(port, f"{a.url}=a", f"{b.url}=b", policy=policy,
                         extra=["--tokenizer", str(tokenizer_dir), "--lookup-timeout", "0.5",
                                *extra])
    return port


def post(port: int, path: str, body, timeout: float = 20.0):
    """(status, headers, raw body) of a POST to the router."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def router_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/router/stats", timeout=30) as r:
        return json.loads(r.read())


def wait_for_signatures(port: int, names: set[str]) -> None:
    def ready():
        stats = router_stats(port)
        known = {b["name"] for b in stats["backends"] if b["namespace"] == SIG.namespace().hex()
                 and b["chunk_tokens"] == SIG.chunk_tokens}
        return stats["tokenizer"].startswith("loaded") and names <= known
    wait_until(ready, 30, f"router knows the tokenizer and {sorted(names)}'s namespace")


def test_prefix_routes_documents_and_chat_system_prompts_to_their_holder(setup, tokenizer_dir,
                                                                        tok):
    doc_a, doc_b = text(1), text(2)
    store(setup, "a", tok.encode(doc_a))
    system = [{"role": "system", "content": text(3)}]
    chat_tokens = tok.encode(tok.apply_chat_template(
        system + [{"role": "user", "content": "first question"}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False)
    store(setup, "b", tok.encode(doc_b))
    store(setup, "b", chat_tokens[:len(tok.encode(f"<s>system: {text(3)}",
                                                  add_special_tokens=False)) - 1])
    port = start_router(setup, tokenizer_dir, "prefix")
    wait_for_signatures(port, {"a", "b"})

    for question in ("what is it?", "who wrote it?", "why?"):
        for doc, holder in ((doc_a, "a"), (doc_b, "b")):
            status, headers, _ = post(port, "/v1/completions",
                                      {"prompt": f"{doc} {question}", "max_tokens": 2})
            assert status == 200
            assert (headers["X-LMShare-Backend"], headers["X-LMShare-Route"]) == (holder, "hit")
    # chats sharing the system prompt go where it is cached, whatever the user asks
    for question in ("hello there", "another chat entirely", "third"):
        status, headers, _ = post(port, "/v1/chat/completions", {
            "messages": system + [{"role": "user", "content": question}], "max_tokens": 2})
        assert status == 200
        assert (headers["X-LMShare-Backend"], headers["X-LMShare-Route"]) == ("b", "hit")
    # a document nobody holds goes by load
    status, headers, _ = post(port, "/v1/completions", {"prompt": text(9), "max_tokens": 2})
    assert status == 200 and headers["X-LMShare-Route"] == "miss"

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'lmshare_router_decisions_total{policy="prefix",reason="hit"} 9.0' in metrics
    assert 'lmshare_router_decisions_total{policy="prefix",reason="miss"} 1.0' in metrics
    assert "lmshare_router_lookup_seconds_count 10.0" in metrics
    # the dashboard's router panel
    once = subprocess.run([sys.executable, "-m", "lmshare", "dashboard", "--once",
                           "--controller", setup.controller_address, "--router",
                           f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert once.returncode == 0, once.stderr
    assert f"router http://127.0.0.1:{port} · prefix" in once.stdout
    assert "requests 10 · hit 90% · miss 10%" in once.stdout


def test_prefix_load_sends_a_busy_holders_request_elsewhere(setup, tokenizer_dir, tok):
    from concurrent.futures import ThreadPoolExecutor

    doc = text(4)
    store(setup, "a", tok.encode(doc))
    port = start_router(setup, tokenizer_dir, "prefix+load", "--load-margin", "1")
    wait_for_signatures(port, {"a"})
    slow = {"prompt": f"{doc} long answer", "max_tokens": 60, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(post, port, "/v1/completions", slow, 30) for _ in range(2)]
        wait_until(lambda: setup.fake("a").served() == 2, 10, "two requests at the holder")
        status, headers, _ = post(port, "/v1/completions", {"prompt": f"{doc} q", "max_tokens": 1})
        assert status == 200
        assert (headers["X-LMShare-Backend"], headers["X-LMShare-Route"]) == ("b", "overloaded")
        assert all(f.result()[0] == 200 for f in busy)
    status, headers, _ = post(port, "/v1/completions", {"prompt": f"{doc} q", "max_tokens": 1})
    assert (headers["X-LMShare-Backend"], headers["X-LMShare-Route"]) == ("a", "hit")


def test_a_silent_controller_costs_no_more_than_the_lookup_deadline(setup, tokenizer_dir, tok):
    doc = text(5)
    store(setup, "a", tok.encode(doc))
    port = start_router(setup, tokenizer_dir, "prefix+load")
    wait_for_signatures(port, {"a"})
    setup.controller.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            started = time.monotonic()
            status, headers, _ = post(port, "/v1/completions", {"prompt": doc, "max_tokens": 1})
            assert status == 200 and headers["X-LMShare-Route"] == "lookup_timeout"
            assert time.monotonic() - started < 0.5 + 2.0
    finally:
        setup.controller.process.send_signal(signal.SIGCONT)
    wait_until(lambda: post(port, "/v1/completions", {"prompt": doc, "max_tokens": 1})[1]
               ["X-LMShare-Route"] == "hit", 15, "prefix routing back with the controller")
