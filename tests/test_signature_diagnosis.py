"""Signature mismatch diagnosis: workers report the signatures their clients use, and the
controller names the fields that differ when a namespace is shared with nobody."""

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmshare import ModelSignature
from lmshare.controller.signatures import SignatureBook
from lmshare.keys import signature_keys
from lmshare.signatures import differences, from_wire, to_wire
from lmshare.stats import ClusterStats
from lmshare.testing.waiting import wait_until
from lmshare.worker.namespaces import MAX_NAMESPACES, NamespaceLog

BF16 = ModelSignature(model="diag-model", kv_dtype="bfloat16", tokenizer_hash="tok-1",
                      kv_layout="layers=2,block=16,attn=FLASH", chunk_tokens=16)
F16 = dataclasses.replace(BF16, kv_dtype="float16", tokenizer_hash="tok-2",
                          kv_layout="layers=2,block=16,attn=TRITON")


def test_differences_name_each_field_and_hide_opaque_values():
    diffs = {d.field: d for d in differences(F16, BF16)}
    assert set(diffs) == {"kv_dtype", "tokenizer_hash", "kv_layout.attn"}
    assert diffs["kv_dtype"].describe("node-b") == "kv_dtype float16 vs bfloat16"
    assert diffs["tokenizer_hash"].describe("node-b") == "tokenizer_hash differs from node-b's"
    assert diffs["kv_layout.attn"].describe("node-b") == "kv_layout.attn TRITON vs FLASH"
    secret = dataclasses.replace(BF16, tenant="acme/salt:secret")
    [tenant] = differences(secret, BF16)
    assert tenant.describe("node-b") == "tenant differs from node-b's"
    assert "secret" not in tenant.mine + tenant.theirs


def test_a_reported_signature_must_hash_to_its_namespace():
    assert from_wire(to_wire(BF16), BF16.namespace()) == BF16
    assert from_wire(to_wire(BF16), F16.namespace()) is None  # another namespace's
    assert from_wire({**to_wire(BF16), "chunk_tokens": "16"}, BF16.namespace()) is None
    assert from_wire({**to_wire(BF16), "extra": 1}, BF16.namespace()) is None
    assert from_wire({**to_wire(BF16), "tp_rank": 5}, BF16.namespace()) is None
    assert to_wire(dataclasses.replace(BF16, rope_scaling="x" * 5000)) is None  # too long


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(to_wire(BF16))),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=50),
                                 st.binary(max_size=20))))
def test_any_reported_fields_are_refused_or_taken_never_raise(fields):
    data = {**to_wire(BF16), **fields}
    signature = from_wire(data, BF16.namespace())
    assert signature is None or signature == BF16


def test_the_book_diagnoses_only_namespaces_nobody_else_uses():
    book = SignatureBook()
    book.update("a", "", {BF16.namespace(): BF16})
    book.update("c", "", {BF16.namespace(): BF16})
    book.update("b", "", {F16.namespace(): F16})
    assert book.mismatches("a") == [] and book.mismatches("c") == []
    [mismatch] = book.mismatches("b")
    assert mismatch.peer == "a" and mismatch.peer_namespace == BF16.namespace().hex()
    assert "kv_dtype float16 vs bfloat16" in mismatch.text
    # another tenant's workers are never compared (nor named)
    book.update("t", "acme", {F16.namespace(): dataclasses.replace(F16)})
    book.remove("a")
    book.remove("c")
    assert book.mismatches("b") == [] and book.mismatches("t") == []
    other_model = dataclasses.replace(F16, model="another")
    book.update("d", "", {other_model.namespace(): other_model})
    assert book.mismatches("d") == []  # a different model is no mismatch


def test_the_worker_keeps_only_signatures_that_match_bounded():
    log = NamespaceLog()
    log.record(BF16.namespace(), 16)
    assert not log.describe(BF16.namespace(), to_wire(F16))  # does not hash to it
    assert not log.describe(F16.namespace(), to_wire(F16))  # not a namespace in use
    assert log.describe(BF16.namespace(), to_wire(BF16))
    assert log.heartbeat_fields()["signatures"] == {BF16.namespace(): to_wire(BF16)}
    assert "signatures" not in log.heartbeat_fields()  # unchanged: not every heartbeat
    for n in range(3 * MAX_NAMESPACES):
        sig = dataclasses.replace(BF16, revision=str(n))
        log.record(sig.namespace(), 16)
        log.describe(sig.namespace(), to_wire(sig))
    assert len(log.heartbeat_fields()["signatures"]) <= MAX_NAMESPACES
    log.on_heartbeat_reply({"mismatches": {BF16.namespace(): "x" * 10_000, b"short": "y",
                                           F16.namespace(): 7}})
    assert len(log.mismatch(BF16.namespace())) <= 600
    assert log.mismatch(F16.namespace()) == ""
    log.on_heartbeat_reply({"mismatches": "not a map"})  # ignored


def test_stats_make_every_mismatch_name_printable():
    stats = ClusterStats.from_dict({
        "controller_id": "c", "controller_epoch": 1, "uptime_s": 1.0, "workers": [],
        "chunks_indexed": 0, "multi_holder_chunks": 0, "namespaces": 0, "lookups": 0,
        "lookup_p50_us": 0.0, "lookup_p99_us": 0.0,
        "mismatches": [{"worker": "evil\x1b[2J", "differs": "a\x1b]0;owned\x07b" * 100,
                        "fields": [{"field": "kv_dtype\x1b[31m"}] * 100}, "junk"]})
    [mismatch] = stats.mismatches
    assert "\x1b" not in mismatch["worker"] + mismatch["differs"]
    assert len(mismatch["differs"]) <= 600 and len(mismatch["fields"]) <= 32


@pytest.fixture
def cluster(keyed_cluster, shm_dir):
    return keyed_cluster(heartbeat_timeout_s=2.0)


def lmshare_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "lmshare", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_dashboard_and_lookups_say_which_fields_differ(cluster):
    """Two engines of one model, one with another KV dtype, tokenizer and attention backend:
    neither shares KV with the other, and `lmshare status`, the dashboard and the lookups of
    the odd one out say why; an engine that matches the first is diagnosed with nothing."""
    for name in ("diag-a", "diag-b", "diag-c"):
        cluster.start_worker(name, "32MiB", "--transports", "tcp")
    tokens = list(range(64))
    with cluster.client("diag-a") as a, cluster.client("diag-b") as b, \
            cluster.client("diag-c") as c:
        a.put(BF16, tokens, [b"x" * 1000] * 4)
        a.lookup(BF16, tokens)
        c.lookup(BF16, tokens)
        assert b.lookup(F16, tokens).tokens == 0  # another namespace: nothing to share

        def diagnosed() -> str:
            said = b.lookup_plan(F16.namespace(), signature_keys(F16, tokens),
                                 chunk_tokens=16).mismatch
            # until diag-a's report arrives, diag-c (same namespace) is the nearest peer; with
            # both in, the first by name is named
            return said if "diag-a serves" in said else ""
        said = wait_until(diagnosed, 15, "diag-a's name in diag-b's diagnosis")
        for part in ("diag-a serves diag-model with another signature", "kv_dtype float16 vs bfloat16",
                     "tokenizer_hash differs from diag-a's", "kv_layout.attn TRITON vs FLASH"):
            assert part in said
        # diag-c uses diag-a's namespace: once both reported it, diag-a is diagnosed with nothing
        wait_until(lambda: a.lookup_plan(BF16.namespace(), signature_keys(BF16, tokens),
                                         chunk_tokens=16).mismatch == "", 15,
                   "diag-a's lookups to carry no diagnosis")

    address = ("--controller", cluster.controller_address)
    status = lmshare_cli("status", *address)
    [line] = [ln for ln in status.splitlines() if "signature mismatch" in ln]
    assert "diag-b vs diag-a (diag-model): tokenizer_hash differs from diag-a's; kv_dtype " \
        "float16 vs bfloat16; kv_layout.attn TRITON vs FLASH" in line
    report = json.loads(lmshare_cli("status", "--json", *address))
    [mismatch] = report["mismatches"]
    assert mismatch["worker"] == "diag-b" and mismatch["peer"] == "diag-a"
    assert {"field": "kv_dtype", "mine": "float16", "theirs": "bfloat16"} in mismatch["fields"]
    frame = lmshare_cli("dashboard", "--once", *address)
    assert "signature mismatches: 1 namespace" in frame, frame
    assert "diag-b vs diag-a (diag-model): tokenizer_hash differs" in frame, frame

    # the odd worker leaves: nothing is left to diagnose
    cluster.workers["diag-b"].terminate()
    wait_until(lambda: not cluster.stats().mismatches, 10, "the mismatch to go with its worker")
