"""Round-robin long-document QA traffic against the servers started by ``launch.py``.

    python examples/vllm_cluster/client.py --model MODEL [--docs 4] [--questions 4]

Every document gets several questions; requests alternate between the servers, so the second
question about a document usually lands on the other server: with lmshare that server fetches
the document's KV from its neighbour's worker instead of recomputing it. Prints the time to
first token of each request, a summary, and each worker's hit counters.
Uses the completions API (the tiny test model has no chat template). Standard library only,
plus lmshare for the worker counters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request


def complete(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, str]:
    """(time to first token, total time, text) of one streamed completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    text = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0].get("text", "")
            if first is None:
                first = time.perf_counter() - start
            text.append(piece)
    total = time.perf_counter() - start
    return (first if first is not None else total), total, "".join(text)


def document(index: int, words: int) -> str:
    from lmshare.testing.tiny_model import make_prompt

    return f"Document {index}.\n" + make_prompt(words, seed=1000 + index)


def worker_counters(names: list[str]) -> dict[str, dict]:
    try:
        from lmshare.client import Client
        from lmshare.errors import LMShareError
    except ImportError:
        return {}
    out = {}
    for name in names:
        try:
            with Client(worker=name, timeout_s=2.0) as client:
                out[name] = client.stats()["counters"]
        except LMShareError as exc:
            out[name] = {"error": str(exc)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model the servers serve (as launched)")
    p.add_argument("--servers", nargs="+",
                   default=["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
    p.add_argument("--workers", nargs="+", default=["node-a", "node-b"])
    p.add_argument("--run-dir", default="/tmp/lmshare-vllm-cluster",
                   help="launch.py's --run-dir (to find the workers' sockets)")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--doc-words", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("LMSHARE_RUNTIME_DIR", os.path.join(args.run_dir, "sockets"))

    seen: set[int] = set()
    first_ttft, repeat_ttft = [], []
    print(f"{'doc':>4} {'q':>3} {'server':<24} {'ttft ms':>9} {'total ms':>9}  first seen")
    for question in range(args.questions):
        for doc in range(args.docs):
            # a document's successive questions go to successive servers
            server = args.servers[(doc + question) % len(args.servers)]
            prompt = (f"{document(doc, args.doc_words)}\n\nQuestion {question}: what does "
                      f"document {doc} say about item {question}?\nAnswer:")
            ttft, total, _text = complete(server, args.model, prompt, args.max_tokens)
            new = doc not in seen
            seen.add(doc)
            (first_ttft if new else repeat_ttft).append(ttft)
            print(f"{doc:>4} {question:>3} {server:<24} {ttft * 1000:>9.1f} {total * 1000:>9.1f}"
                  f"  {'yes' if new else ''}", flush=True)
    if first_ttft:
        print(f"\nmean TTFT, first time a document is seen: {statistics.mean(first_ttft) * 1000:.1f}"
              f" ms ({len(first_ttft)} requests)")
    if repeat_ttft:
        print(f"mean TTFT, document seen before (any server): "
              f"{statistics.mean(repeat_ttft) * 1000:.1f} ms ({len(repeat_ttft)} requests)")
    for name, counters in worker_counters(args.workers).items():
        shown = {k: counters.get(k) for k in ("local_hit_chunks", "peer_hit_chunks",
                                              "miss_chunks", "entries", "bytes_fetched")}
        print(f"worker {name}: {counters.get('error') or shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
