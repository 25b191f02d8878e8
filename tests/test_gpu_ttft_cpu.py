"""The GPU TTFT proof (benchmarks/gpu_ttft.py) kept alive on CPU: tiny model, same code paths.

Runs the script as CI would run it on a machine without a GPU: recompute, local pool hit,
same-host peer (another process's pool mapped read-only), TCP peer (TcpPeerServer →
TcpTransport + PoolSink), and checks every hit's greedy continuation and loaded KV against
recompute, and that the Markdown report prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
CASES = ("recompute", "local", "peer-shm", "peer-tcp")


@pytest.mark.slow
def test_gpu_ttft_runs_on_cpu_and_hits_match_recompute(shm_dir, tmp_path):
    out = tmp_path / "ttft.json"
    env = dict(os.environ, LMSHARE_SHM_DIR=str(shm_dir), PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_ttft", "--device", "cpu", "--tiny",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the report: the TTFT table, the bandwidth table and the correctness table
    assert "| prompt tokens | KV GB | recompute ms |" in proc.stdout
    assert "| 513 |" in proc.stdout and "| 1025 |" in proc.stdout
    assert "TCP fetch" in proc.stdout
    assert "NO" not in proc.stdout.split("full prefill == split", 1)[1]

    results = json.loads(out.read_text())
    assert [row["prompt_tokens"] for row in results["rows"]] == [513, 1025]
    for row in results["rows"]:
        assert row["chunks"] == row["cached_tokens"] // 256
        assert len(row["reference_split"]) == results["gen_tokens"] == 8
        for name in CASES:
            case = row[name]
            assert "error" not in case, case.get("error")
            assert len(case["samples_ms"]) >= 3
            assert case["ttft_ms"] > 0
        for name in CASES[1:]:
            assert row[name]["match"], (name, row[name]["tokens"], row["reference_split"])
            assert row[name]["kv_identical"], name
            assert row[name]["tokens"] == row["reference_split"]
        assert all(value > 0 for value in row["bandwidth_GBps"].values())
    # every shared-memory region was removed (the holder's and this process's pools)
    assert not list(shm_dir.glob("lmshare-*"))

    # a saved result renders the same report again
    from benchmarks import gpu_ttft

    rendered = gpu_ttft.report(results)
    assert rendered.splitlines()[-1] in proc.stdout
    assert "| 1025 | 0.001 |" in rendered
