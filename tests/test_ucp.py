"""UCX one-sided GET (lmshare.transports.ucp) between two OS processes.

The owner is ``python -m benchmarks.ucp_probe --owner SIZE``: a /dev/shm-backed mmap filled with a
known pattern, registered with UCX, progressed by a ``UcpServer``; it publishes its worker
address, rkey and base address on stdout. This process is the reader.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("libucx", reason="UCX not installed (pip install lmshare[ucx])")

from lmshare.errors import ConfigError, TransferError
from lmshare.transports import ucp

if not ucp.ucx_available():
    pytest.skip("libucp cannot be loaded", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
probe = importlib.import_module("benchmarks.ucp_probe")

MiB = 1 << 20
POOL = 64 * MiB
EXPECTED = probe.pattern(POOL)
TLS = ["sm,self", "tcp,self"]


def test_struct_layouts_match_ucx_1_21_headers():
    # Sizes printed by gcc against the libucx 1.21 wheel's include/ucp/api/ucp.h (x86-64).
    for name, (struct, size) in ucp.STRUCT_SIZES.items():
        assert ctypes.sizeof(struct) == size, name
    assert ucp.ucx_version().startswith("1.")


def test_missing_ucx_is_a_config_error():
    code = textwrap.dedent("""
        import ctypes.util, os, sys
        sys.modules["libucx"] = None          # as if the wheel were not installed
        ctypes.util.find_library = lambda name: None
        os.environ["LMSHARE_LIBUCP"] = "/nonexistent/libucp.so"
        from lmshare.errors import ConfigError
        from lmshare.transports import ucp
        assert not ucp.ucx_available()
        try:
            ucp.UcpContext()
        except ucp.UcxUnavailable as exc:
            assert isinstance(exc, ConfigError) and "lmshare[ucx]" in str(exc)
            print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert issubclass(ucp.UcxUnavailable, ConfigError)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tls,wakeup", [("sm,self", False), ("tcp,self", False),
                                        ("tcp,self", True)])
def test_get_exact_bytes(tls, wakeup):
    with probe.owner_process(POOL, tls, wakeup=wakeup) as (_proc, info), \
            probe.reader_context(tls) as ctx:
        assert info["size"] == POOL
        ep = ctx.connect(info["address"], error_handling=probe.error_handling_for(tls))
        base, rkey = info["base"], info["rkey"]
        for offset, size in [(0, 4 * MiB), (5 * MiB + 123, 4 * MiB), (24 * MiB + 4095, 32 * MiB),
                             (POOL - 4 * MiB, 4 * MiB)]:
            dst = bytearray(size)
            ep.get_into(dst, base + offset, rkey, time.monotonic() + 30)
            assert dst == EXPECTED[offset:offset + size], (offset, size)
        # Several GETs in flight at once into a registered destination "pool".
        dst_pool = bytearray(16 * MiB)
        view = memoryview(dst_pool)
        offsets = [3 * MiB, 40 * MiB + 1, 11 * MiB, 60 * MiB]
        with ctx.map(dst_pool) as region:
            ep.get_many([(view[i * 4 * MiB:(i + 1) * 4 * MiB], base + off)
                         for i, off in enumerate(offsets)], rkey, time.monotonic() + 30, region)
        view.release()
        for i, off in enumerate(offsets):
            assert dst_pool[i * 4 * MiB:(i + 1) * 4 * MiB] == EXPECTED[off:off + 4 * MiB]
        ep.close()


@pytest.mark.timeout(60)
def test_shared_memory_get_needs_no_owner_progress():
    """Over cma a GET is a true one-sided read: it completes from a SIGSTOPped owner."""
    with probe.owner_process(8 * MiB, "sm,self") as (proc, info), \
            probe.reader_context("sm,self") as ctx:
        _sigstop(proc.pid)
        try:
            ep = ctx.connect(info["address"], error_handling=False)
            dst = bytearray(4 * MiB)
            ep.get_into(dst, info["base"] + 100, info["rkey"], time.monotonic() + 5)
            assert dst == EXPECTED[100:100 + 4 * MiB]
            ep.close()
        finally:
            os.kill(proc.pid, signal.SIGCONT)


def _sigstop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is really stopped (kill() returns before that)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "tT":
        assert time.monotonic() < deadline, "owner did not stop"
        time.sleep(0.001)


def _progress_for(ctx, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctx.progress()
        time.sleep(0.001)


@pytest.mark.timeout(60)
def test_deadline_on_stopped_owner_over_tcp():
    """Over tcp GET needs the owner's progress: a SIGSTOPped owner costs the deadline, no more,
    and the abandoned buffer is never written afterwards."""
    tls = "tcp,self"
    with probe.owner_process(8 * MiB, tls) as (proc, info), probe.reader_context(tls) as ctx:
        ep = ctx.connect(info["address"])  # peer error handling (the default)
        dst = bytearray(4 * MiB)
        ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 10)  # wired up
        dst[:] = bytes(len(dst))
        _sigstop(proc.pid)
        try:
            start = time.monotonic()
            with pytest.raises(TransferError, match="deadline"):
                ep.get_into(dst, info["base"], info["rkey"], start + 1.0)
            elapsed = time.monotonic() - start
            assert 1.0 <= elapsed < 1.75, elapsed
            assert ep.broken
            with pytest.raises(TransferError, match="reconnect"):
                ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 1.0)
            snapshot = bytes(dst)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        _progress_for(ctx, 1.0)
        assert dst == snapshot, "a late reply wrote into an abandoned buffer"
        assert proc.poll() is None, "the owner died"
        assert ctx.generation == 0
        ep2 = ctx.connect(info["address"])
        ep2.get_into(dst, info["base"] + 7, info["rkey"], time.monotonic() + 10)
        assert dst == EXPECTED[7:7 + 4 * MiB]
        ep2.close()
        ep.close()


@pytest.mark.timeout(60)
def test_deadline_without_error_handling_resets_worker():
    """Without peer error handling a stalled tcp GET cannot be canceled; the reader resets its
    worker so the late reply has nowhere to land. (The owner may then abort on resume: UCX
    1.21 treats the vanished peer as fatal in that mode. Same-host cma is the mode's use.)"""
    tls = "tcp,self"
    with probe.owner_process(8 * MiB, tls) as (proc, info), probe.reader_context(tls) as ctx:
        old_address = ctx.address
        ep = ctx.connect(info["address"], error_handling=False)
        dst = bytearray(4 * MiB)
        ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 10)
        dst[:] = bytes(len(dst))
        _sigstop(proc.pid)
        try:
            start = time.monotonic()
            with pytest.raises(TransferError, match="deadline"):
                ep.get_into(dst, info["base"], info["rkey"], start + 1.0)
            assert time.monotonic() - start < 1.75
            snapshot = bytes(dst)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert ctx.generation == 1 and ctx.address != old_address
        _progress_for(ctx, 1.0)
        assert dst == snapshot, "a late reply wrote into an abandoned buffer"
        ep.close()


def test_teardown_at_interpreter_exit_without_close():
    code = textwrap.dedent("""
        import mmap, time
        from lmshare.transports.ucp import UcpContext, UcpServer
        owner, reader = UcpContext(name="owner"), UcpContext(name="reader", wakeup=True)
        buf = mmap.mmap(-1, 1 << 20); buf[:5] = b"hello"
        region = owner.map(buf)
        UcpServer(owner).start(); UcpServer(reader).start()
        ep = reader.connect(owner.address)
        dst = bytearray(5)
        ep.get_into(dst, region.address, region.pack_rkey(), time.monotonic() + 10)
        assert dst == b"hello"
        print("ok", flush=True)
    """)
    env = probe.ucx_env("tcp,sm,self")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "Fatal" not in out.stderr and "ERROR" not in out.stderr, out.stderr


def test_bad_arguments():
    with ucp.UcpContext() as ctx:
        with pytest.raises(ValueError):
            ctx.map(bytes(16))  # read-only
        with pytest.raises(ValueError):
            ctx.map(bytearray(0))
        region = ctx.map(bytearray(4096))
        assert region.contains(region.address, 4096)
        assert not region.contains(region.address + 1, 4096)
        assert len(region.pack_rkey()) > 0
    assert ctx.closed
    with pytest.raises(TransferError):
        ctx.connect(b"x" * 16)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_throughput_probe_measures_every_transport():
    """The probe behind ``python -m benchmarks.ucp_probe`` measures a rate over each transport
    (the figures themselves are the benchmark's, on a quiet machine)."""
    for tls in TLS:
        rate = probe.measure(4 * MiB, tls, 1)
        assert math.isfinite(rate) and rate > 0, (tls, rate)


@pytest.mark.timeout(60)
def test_dead_owner_fails_fast_with_error_handling():
    """With peer error handling a killed owner is reported by UCX: no need to wait out the
    deadline, and the endpoint says so."""
    tls = "tcp,self"
    with probe.owner_process(8 * MiB, tls) as (proc, info), probe.reader_context(tls) as ctx:
        ep = ctx.connect(info["address"])
        dst = bytearray(4 * MiB)
        ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 10)
        proc.kill()
        proc.wait()
        start = time.monotonic()
        with pytest.raises(TransferError):
            ep.get_into(dst, info["base"], info["rkey"], start + 10)
        assert time.monotonic() - start < 5
        assert ep.broken
        ep.close()
