"""The controller's index at fleet size, in one controller process with nothing else in it:
10,000 registered workers announce 10M chunks (1,000 each, with digests) through the
controller's own message handler, then lookups, streaming batches and a 1M-key full sync.

Counts CPU time of the controller's thread (not wall time), so it shows what the controller's
design costs, apart from a shared machine's scheduling. Runs today's controller and the one
before the compact index side by side, each in its own process:
``python -m benchmarks.control_plane_index [--workers N] [--keys N] [--baseline REV]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "fcf2635"  # main before the compact index


def _child(workers: int, keys: int, steps: int, digests: bool) -> dict:
    """Runs inside the measured tree's process."""
    import msgpack
    import numpy as np

    from lmshare import protocol
    from lmshare.controller import ControllerConfig, ControllerService

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    service = ControllerService(ControllerConfig(port=0))
    ns = b"\x5a" * 16
    try:  # the garbage collector's settings of the controller's loop, where the tree has them
        from lmshare.controller import gc_policy

        gc_policy.rare_full_collections()
    except ImportError:
        pass

    def answer(type_: str, **fields) -> tuple[dict, float]:
        frames = [b"id", protocol.encode(protocol.request(type_, 1, **fields))]
        started = time.thread_time()
        reply = service.answer(frames)[1]
        while service.index.pending:
            service.index.absorb()
        return msgpack.unpackb(reply), time.thread_time() - started

    def keys_of(worker: int, generation: int, count: int) -> list[bytes]:
        raw = np.random.default_rng([worker, generation]).bytes(16 * count)
        return [raw[i:i + 16] for i in range(0, len(raw), 16)]

    epochs = {}
    heartbeat_cpu = []
    for w in range(workers):
        epochs[w] = answer("register", worker_id=f"fw{w:05d}", host="127.0.0.1",
                           data_port=20000 + w % 40000, transports=["tcp"],
                           capacity_bytes=64 << 30, host_id=f"host{w // 8}")[0]["epoch"]
    base_rss = rss()
    per_worker = keys // workers
    step = per_worker // steps
    curve = []
    admit_cpu = 0.0
    seqs = dict.fromkeys(range(workers), 0)
    for s in range(steps):
        for w in range(workers):
            new = keys_of(w, s, step)
            seqs[w] += 1
            extra = {"digests": {k: k for k in new}} if digests else {}
            admit_cpu += answer("batch", worker_id=f"fw{w:05d}", epoch=epochs[w], seq=seqs[w],
                                admit={ns: new}, evict=[], **extra)[1]
        lookups = []
        for i in range(2000):
            w = (i * 7919) % workers
            reply, spent = answer("lookup", namespace=ns, keys=keys_of(w, 0, 16))
            assert reply["matched"] == 16
            lookups.append(spent * 1e6)
        for w in range(0, workers, max(1, workers // 2000)):
            heartbeat_cpu.append(answer("heartbeat", worker_id=f"fw{w:05d}", epoch=epochs[w],
                                        seq=seqs[w], stats={"used_bytes": 1 << 30})[1])
        lookups.sort()
        curve.append({"keys": (s + 1) * step * workers, "rss": rss(),
                      "lookup_cpu_us": {"p50": lookups[len(lookups) // 2],
                                        "p99": lookups[int(len(lookups) * 0.99)],
                                        "max": lookups[-1]}})
    indexed = curve[-1]["keys"]
    # streaming: 64 admits + 64 evictions per batch
    stream = []
    for i in range(1000):
        w = (i * 31) % workers
        new = keys_of(w, 1000 + i, 64)
        seqs[w] += 1
        extra = {"digests": {k: k for k in new}} if digests else {}
        stream.append(answer("batch", worker_id=f"fw{w:05d}", epoch=epochs[w], seq=seqs[w],
                             admit={ns: new}, evict=keys_of(w, steps - 1, step)[:64],
                             **extra)[1])
    # a 1M-key full sync from one worker, in the parts a worker sends; every step timed
    # (made part by part: a list of 1M keys would be walked by the garbage collector's first
    # collections after it, ~10 ms, which a controller's loop does not do)
    sync_count = min(1_000_000, keys // 10)
    from lmshare.worker.control_link import SYNC_PART_KEYS as part_keys  # as this tree sends
    seqs[0] += 1
    steps_cpu = []
    slow: list = []  # (CPU s, what the step did, sync part, of which in the garbage collector)
    import gc

    collecting = [0.0, 0.0, -1]  # CPU s spent collecting so far, when the running one
    # started, and the oldest generation collected since the step began

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collecting[1] = time.thread_time()
        else:
            collecting[0] += time.thread_time() - collecting[1]
            collecting[2] = max(collecting[2], info["generation"])
    gc.callbacks.append(on_gc)

    def absorb_pending(part: int | str) -> int:
        """The loop's slices between messages; how many."""
        index, count = service.index, 0
        while index.pending:
            kind = ("grow: move" if index._old is not None else "grow: switch"
                    if index._next is not None and index._touched.is_set() else "sweep"
                    if index._sweeps else "add")
            started, in_gc, collecting[2] = time.thread_time(), collecting[0], -1
            index.absorb()
            steps_cpu.append(time.thread_time() - started)
            if kind == "grow: move" and index._old is None:
                kind = "grow: last move, frees the old table"
            slow.append((steps_cpu[-1], kind, part, collecting[0] - in_gc, collecting[2]))
            count += 1
        return count

    parts = -(-sync_count // part_keys)
    # each other worker heartbeats 5 times over the sync (which takes ~7 s of the loop's time
    # at 10M chunks: the default interval is 1 s), and a lookup comes between parts
    beats_per_part = max(1, 5 * (workers - 1) // parts)
    beating = 0

    def timed(kind: str, part: int, type_: str, **fields) -> None:
        frames = [b"id", protocol.encode(protocol.request(type_, 1, **fields))]
        started, in_gc, collecting[2] = time.thread_time(), collecting[0], -1
        service.answer(frames)
        steps_cpu.append(time.thread_time() - started)
        slow.append((steps_cpu[-1], kind, part, collecting[0] - in_gc, collecting[2]))

    for part, start in enumerate(range(0, sync_count, part_keys)):
        for _ in range(beats_per_part):  # other workers' messages between the parts
            beating = beating % (workers - 1) + 1
            timed("heartbeat", part, "heartbeat", worker_id=f"fw{beating:05d}",
                  epoch=epochs[beating], seq=seqs[beating], stats={"used_bytes": 1 << 30})
        w = (part * 7919) % workers
        timed("lookup", part, "lookup", namespace=ns, keys=keys_of(w, 0, 16))
        chunk = keys_of(0, 10**6 + part, min(part_keys, sync_count - start))
        extra = {"digests": {k: k for k in chunk}} if digests else {}
        frames = [b"id", protocol.encode(protocol.request(
            "sync", 1, worker_id="fw00000", epoch=epochs[0], seq=seqs[0], part=part,
            final=start + part_keys >= sync_count, entries={ns: chunk}, **extra))]
        started, in_gc, collecting[2] = time.thread_time(), collecting[0], -1
        service.answer(frames)
        steps_cpu.append(time.thread_time() - started)
        slow.append((steps_cpu[-1], "sync message", part, collecting[0] - in_gc, collecting[2]))
        absorb_pending(part)
    # a growth the sync started: its thread touches the new table, then the loop moves keys
    while service.index._next is not None or service.index.pending:
        if not absorb_pending("after"):
            time.sleep(0.01)  # the loop polls for messages meanwhile
    stats_cpu = []
    for _ in range(3):
        started = time.thread_time()
        answer("stats")
        stats_cpu.append(time.thread_time() - started)
    stream.sort()
    heartbeat_cpu.sort()
    return {"workers": workers, "indexed": indexed, "digests": digests,
            "rss_registered": base_rss, "rss": curve[-1]["rss"],
            "bytes_per_key": (curve[-1]["rss"] - base_rss) / indexed,
            "admit_cpu_us_per_key": admit_cpu / indexed * 1e6,
            "heartbeat_cpu_us": heartbeat_cpu[len(heartbeat_cpu) // 2] * 1e6,
            "stream_batch_cpu_us": {"p50": stream[len(stream) // 2] * 1e6,
                                    "p99": stream[int(len(stream) * 0.99)] * 1e6},
            "sync": {"keys": sync_count, "steps": len(steps_cpu),
                     "slowest_step_ms": max(steps_cpu) * 1e3,
                     "steps_over_10ms": sum(s > 0.010 for s in steps_cpu),
                     "cpu_s": sum(steps_cpu),
                     "by_kind": by_kind(slow),
                     # [CPU ms, kind, sync part, of which collecting garbage, the oldest
                     # generation collected (-1: none)]
                     "slowest": [[round(t * 1e3, 1), k, p, round(g * 1e3, 1), gen]
                                 for t, k, p, g, gen in
                                 sorted(slow, key=lambda s: -s[0])[:12]]},
            "stats_page_cpu_ms": min(stats_cpu) * 1e3, "curve": curve}


def by_kind(steps: list) -> dict:
    """Per kind of loop step: how many, CPU ms p50 / p99 / max, how many over 5 and 10 ms."""
    kinds: dict[str, list[float]] = {}
    for spent, kind, *_ in steps:
        kinds.setdefault(kind, []).append(spent * 1e3)
    out = {}
    for kind, times in kinds.items():
        times.sort()
        out[kind] = {"steps": len(times), "p50": round(times[len(times) // 2], 2),
                     "p99": round(times[int(len(times) * 0.99)], 2), "max": round(times[-1], 2),
                     "over_5ms": sum(t > 5 for t in times), "over_10ms": sum(t > 10 for t in times)}
    return out


def plot(results: dict, path: str) -> None:
    """Controller RSS and lookup CPU time against indexed chunks, per controller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        if "curve" not in r:
            continue
        keys = [p["keys"] / 1e6 for p in r["curve"]]
        ax1.plot(keys, [p["lookup_cpu_us"]["p99"] for p in r["curve"]], marker="o",
                 label=f"{label}: p99")
        ax1.plot(keys, [p["lookup_cpu_us"]["p50"] for p in r["curve"]], marker=".",
                 linestyle="--", label=f"{label}: p50")
        ax2.plot(keys, [p["rss"] / 2**30 for p in r["curve"]], marker="o", label=label)
    ax1.set(xlabel="indexed chunks (millions)", ylabel="µs of controller CPU",
            title="a 16-key lookup, inside the controller")
    ax2.axhline(1.5, color="grey", linewidth=0.8, linestyle=":")
    ax2.set(xlabel="indexed chunks (millions)", ylabel="controller RSS (GiB)",
            title="controller memory (10,000 workers registered)")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=10_000)
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-digests", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.workers, args.keys, args.steps, not args.no_digests)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="lmshare-index-") as tmp:
        trees = [("compact index (now)", ROOT, ["--no-digests"]),
                 ("compact index (now), digests", ROOT, [])]
        if args.baseline:
            tree = Path(tmp) / "baseline"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            # without digests: its digest records cost ~220 µs an admit once 1M are recorded
            trees.append((f"dict index ({args.baseline})", tree, ["--no-digests"]))
        for label, tree, extra in trees:
            print(f"{label}: {args.keys:,} keys from {args.workers:,} workers ...",
                  file=sys.stderr, flush=True)
            started = time.monotonic()
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", "--workers",
                 str(args.workers), "--keys", str(args.keys), "--steps", str(args.steps),
                 *extra], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                results[label] = {"error": out.stderr[-500:]}
                continue
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
            results[label]["wall_s"] = time.monotonic() - started
    json.dump(results, sys.stdout, indent=1)
    print()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "control_plane_index.json").write_text(json.dumps(results, indent=1))
    plot(results, str(out / "control_plane_index.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
