"""UCX one-sided GET throughput probe: ``measure(size_bytes, tls) -> GB/s``.

An owner process maps a /dev/shm-backed buffer with ``lmshare.transports.ucp`` and publishes its
worker address, rkey and base address on stdout; this process GETs from it. GB = 1e9 bytes.

    python -m benchmarks.ucp_probe                 # 4 MiB and 32 MiB over sm and tcp
    python -m benchmarks.ucp_probe --owner SIZE    # the owner side (used by measure and tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import table

ROOT = Path(__file__).resolve().parents[1]
PATTERN_SEED = 20261125
MARKER = "UCP-PROBE-OWNER "


def pattern(size: int, seed: int = PATTERN_SEED) -> bytes:
    """The known bytes the owner fills its buffer with."""
    return random.Random(seed).randbytes(size)


def _shm_mapping(size: int) -> mmap.mmap:
    """A shared mapping of a /dev/shm file (unlinked at once: the mapping keeps it)."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="lmshare-ucp-probe-", dir=directory)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)


def owner_main(size: int, wakeup: bool = False) -> int:
    """Owner side: map ``size`` bytes of patterned shared memory, publish one JSON line on
    stdout, progress until stdin closes."""
    from lmshare.transports.ucp import UcpContext, UcpServer

    buf = _shm_mapping(size)
    buf[:] = pattern(size)
    ctx = UcpContext(wakeup=wakeup, name="probe-owner")
    region = ctx.map(buf)
    server = UcpServer(ctx).start()
    info = {"address": ctx.address.hex(), "rkey": region.pack_rkey().hex(),
            "base": region.address, "size": size, "pid": os.getpid()}
    sys.stdout.write(MARKER + json.dumps(info) + "\n")  # UCX may log to stdout too
    sys.stdout.flush()
    sys.stdin.read()  # until the reader closes our stdin
    server.stop()
    ctx.close()
    buf.close()
    return 0


def ucx_env(tls: str) -> dict[str, str]:
    env = dict(os.environ, UCX_TLS=tls, UCX_WARN_UNUSED_ENV_VARS="n")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def owner_process(size: int, tls: str, wakeup: bool = False,
                  timeout: float = 60.0) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Start an owner process; yields ``(process, info)`` with bytes fields decoded."""
    cmd = [sys.executable, "-m", "benchmarks.ucp_probe", "--owner", str(size)]
    if wakeup:
        cmd.append("--wakeup")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ucx_env(tls), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        import selectors

        end = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(max(0.0, end - time.monotonic())):
                    raise TimeoutError("UCX owner process did not publish its address")
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"UCX owner process exited with {proc.wait()}")
                if line.startswith(MARKER):
                    break
        info = json.loads(line[len(MARKER):])
        info["address"] = bytes.fromhex(info["address"])
        info["rkey"] = bytes.fromhex(info["rkey"])
        yield proc, info
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def reader_context(tls: str, wakeup: bool = False) -> Iterator[object]:
    """A UcpContext made with ``UCX_TLS=tls`` (UCX reads it at ucp_init)."""
    from lmshare.transports.ucp import UcpContext

    saved = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = tls
    try:
        ctx = UcpContext(wakeup=wakeup, name="probe-reader")
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved
    try:
        yield ctx
    finally:
        ctx.close()


def error_handling_for(tls: str) -> bool:
    """Peer error handling unless the path is shared memory only (cma refuses it)."""
    return "tcp" in tls.split(",")


def measure(size_bytes: int, tls: str, repeats: int = 5, register: bool = False) -> float:
    """Median GB/s of one-sided GETs of ``size_bytes`` from an owner process over ``tls``
    (a UCX_TLS value such as ``"sm,self"`` or ``"tcp,self"``)."""
    with owner_process(size_bytes, tls) as (_proc, info), reader_context(tls) as ctx:
        dst = bytearray(size_bytes)
        region = ctx.map(dst) if register else None
        ep = ctx.connect(info["address"], error_handling=error_handling_for(tls))
        ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 30, region)  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            ep.get_into(dst, info["base"], info["rkey"], time.monotonic() + 30, region)
            rates.append(size_bytes / (time.perf_counter() - start) / 1e9)
        ep.close()
        if region is not None:
            region.close()
        return statistics.median(rates)


def run(repeats: int = 5) -> tuple[str, dict]:
    """Markdown table and raw numbers, in the form ``python -m benchmarks`` collects."""
    sizes = {"4 MiB": 4 << 20, "32 MiB": 32 << 20}
    data = {tls: {label: measure(size, tls, repeats) for label, size in sizes.items()}
            for tls in ("sm,self", "tcp,self")}
    rows = [[tls] + [f"{gbps:.2f}" for gbps in by_size.values()] for tls, by_size in data.items()]
    text = ("UCX one-sided GET (owner process → this process), median of "
            f"{repeats}, GB/s\n\n" + table(["UCX_TLS", *sizes], rows))
    return text, data


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner", type=int, metavar="SIZE", help="run the owner side")
    parser.add_argument("--wakeup", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.owner:
        return owner_main(args.owner, args.wakeup)
    from lmshare.transports.ucp import ucx_available, ucx_version

    if not ucx_available():
        print("UCX is not available (pip install lmshare[ucx])", file=sys.stderr)
        return 1
    print(f"UCX {ucx_version()}, GB = 1e9 bytes")
    print(run(args.repeats)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
