"""``lmshare explain`` against a real cluster (controller and workers started by the CLI): where
a prompt's prefix is held, by whom, through which transport, and why it stops."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lmshare import ModelSignature
from lmshare.keys import signature_keys
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="explain-model", chunk_tokens=16)
CHUNK_BYTES = 64 * 1024


def doc(seed: int, chunks: int) -> list[int]:
    return [seed * 1000 + i for i in range(chunks * SIG.chunk_tokens)]


def payloads(chunks: int) -> list[bytes]:
    return [os.urandom(CHUNK_BYTES) for _ in range(chunks)]


def explain(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmshare", "explain", "--controller",
                           cluster.controller_address, *args],
                          capture_output=True, text=True, timeout=300)  # a hang guard:
    # with --tokenizer it imports transformers, which takes a minute on a busy small machine


@pytest.fixture
def cluster(keyed_cluster):
    return keyed_cluster(heartbeat_timeout_s=1.5)


def test_explain_says_where_each_chunk_is_and_why_the_prefix_stops(cluster, tmp_path):
    for name in ("ex-a", "ex-b", "ex-gone"):
        cluster.start_worker(name, "16MiB")
    a, b, gone = (cluster.client(n) for n in ("ex-a", "ex-b", "ex-gone"))
    prompt = doc(1, 5) + [5, 5, 5]  # five full chunks and a partial one
    data = payloads(3)  # one chunk's bytes are the same wherever it is stored
    a.put(SIG, prompt, data[:1])  # chunk 0 on ex-a
    b.put(SIG, prompt, data[:2])  # chunks 0-1 on ex-b
    gone.put(SIG, prompt, data)  # chunks 0-2 on ex-gone, which dies
    keys = signature_keys(SIG, prompt)
    wait_until(lambda: a.lookup_plan(SIG.namespace(), keys, count=False).peer == 2
               and cluster.stats().multi_holder_chunks == 2, 5, "the chunks indexed")
    a.lookup(SIG, prompt)  # ex-a's clients use this signature: --like-worker takes it
    wait_until(lambda: any(w.worker_id == "ex-a" and w.namespaces
                           for w in cluster.stats().workers), 5, "ex-a's namespace reported")
    cluster.workers["ex-gone"].process.send_signal(signal.SIGKILL)
    wait_until(lambda: any(w.worker_id == "ex-gone" and w.state == "dead"
                           for w in cluster.stats().workers), 5, "ex-gone declared dead")
    tokens_file = tmp_path / "prompt.json"
    tokens_file.write_text(json.dumps(prompt))

    result = explain(cluster, "--tokens", f"@{tokens_file}", "--like-worker", "ex-a", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["namespace"] == SIG.namespace().hex() and out["chunk_tokens"] == 16
    assert (out["hit_chunks"], out["local_chunks"], out["peer_chunks"]) == (2, 1, 1), out
    chunks = out["chunks"]
    assert [(c["result"], c["reason"]) for c in chunks] == [
        ("hit", "local"), ("hit", "peer"), ("miss", "holder_gone"), ("miss", "new_prefix"),
        ("miss", "new_prefix"), ("miss", "partial_chunk")]
    # same host, both offer shared memory: that is how ex-a would read ex-b's chunk
    assert chunks[1]["holders"] == [{"worker": "ex-b", "transport": "shm"}]
    assert "ex-gone died" in chunks[2]["detail"]
    assert (chunks[5]["first_token"], chunks[5]["end_token"]) == (80, 83)
    assert out["stop"]["chunk"] == 2 and out["stop"]["reason"] == "holder_gone"

    text = explain(cluster, "--tokens", ",".join(map(str, prompt)), "--like-worker", "ex-a")
    assert text.returncode == 0, text.stderr
    assert "it stops at chunk 2: holder_gone (its last holder ex-gone died)" in text.stdout
    assert "chunks 3-4" in text.stdout and "MISS new_prefix" in text.stdout

    # another signature (one field differs): no worker ever held a chunk of it
    other = json.dumps({"model": "explain-model", "chunk_tokens": 16, "kv_dtype": "float16"})
    out = json.loads(explain(cluster, "--tokens", "1,2,3," * 16, "--signature", other,
                             "--json").stdout)
    assert [c["reason"] for c in out["chunks"]] == ["unknown_namespace"] * 3
    # no view given: holders only
    out = json.loads(explain(cluster, "--tokens", f"@{tokens_file}", "--signature",
                             json.dumps(SIG.to_dict()), "--json").stdout)
    assert [c["reason"] for c in out["chunks"][:2]] == ["peer", "peer"]
    assert {h["worker"] for h in out["chunks"][0]["holders"]} == {"ex-a", "ex-b"}

    # bad input: one line saying what to do, exit 2
    for args, words in ((["--tokens", "1,x"], "token ids"),
                        (["--tokens", "1,2", "--like-worker", "nobody"], "no worker named"),
                        (["--text", "hello"], "--tokenizer"),
                        (["--tokens", "1,2"], "--like-worker")):
        bad = explain(cluster, *args)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr
    for client in (a, b, gone):
        client.close()


def test_explain_tokenizes_text_as_the_engine_does(cluster, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from lmshare.testing.tiny_model import build_tiny_tokenizer

    tokenizer_dir = build_tiny_tokenizer(tmp_path / "tok")
    text = " ".join(["river stone cloud window garden"] * 12)
    tokens = AutoTokenizer.from_pretrained(str(tokenizer_dir)).encode(text)
    cluster.start_worker("ex-text", "16MiB")
    with cluster.client("ex-text") as client:
        client.put(SIG, tokens, payloads(len(tokens) // 16))
        keys = signature_keys(SIG, tokens)
        wait_until(lambda: cluster.stats().chunks_indexed == len(keys), 5, "chunks indexed")
        result = explain(cluster, "--text", text, "--tokenizer", str(tokenizer_dir),
                         "--signature", json.dumps(SIG.to_dict()), "--worker", "ex-text",
                         "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens"] == len(tokens) and out["local_chunks"] == len(keys) > 0
