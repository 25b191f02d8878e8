"""Share KV bytes between two workers from Python.

Run against a cluster you started yourself:
    lmshare controller --port 7800
    lmshare worker --controller 127.0.0.1:7800 --cache-size 1GiB --name node-a
    lmshare worker --controller 127.0.0.1:7800 --cache-size 1GiB --name node-b
    python examples/python_client.py node-a node-b
"""

from __future__ import annotations

import os
import sys
import time

import lmshare


def main(writer: str, reader: str) -> None:
    sig = lmshare.ModelSignature(model="example-model", kv_dtype="bfloat16", chunk_tokens=256)
    prompt = list(range(1000, 1000 + 4 * 256 + 17))  # 4 full chunks and a partial one
    chunks = [os.urandom(1 << 20) for _ in range(4)]  # the KV bytes of each full chunk

    with lmshare.Client(worker=writer) as a, lmshare.Client(worker=reader) as b:
        print(f"stored {a.put(sig, prompt, chunks)} new chunks on {writer}")
        deadline = time.monotonic() + 5
        while b.lookup(sig, prompt).tokens < 4 * 256 and time.monotonic() < deadline:
            time.sleep(0.05)  # admits reach the controller within a few tens of ms
        print(f"{reader} sees: {b.lookup(sig, prompt)}")
        fetched = b.get(sig, prompt)
        print(f"{reader} got {len(fetched)} chunks, identical: {fetched == chunks}")
        print(f"{reader} now: {b.lookup(sig, prompt)}")


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("node-a", "node-b")))
