"""A vLLM engine in its own process, driven over a pipe: for tests and benchmarks.

Run as ``python -m lmshare.testing.vllm_engine --model DIR [--worker NAME] ...``. The process
builds one offline ``vllm.LLM`` (with the LMShareConnector when ``--worker`` is given), then
reads JSON requests, one a line, on stdin::

    {"prompt_token_ids": [...], "max_tokens": 16}

and answers each on its result channel with one line ``{"token_ids": [...], "seconds": ...,
"num_cached_tokens": ...}`` (or ``{"error": "..."}``). The result channel is the original
stdout; everything vLLM prints goes to stderr. The first line, ``{"ready": true, ...}``, comes
once the engine is up. :class:`EngineProcess` is the parent-side handle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lmshare.errors import LMShareError

log = logging.getLogger(__name__)


def _connector_config(args: argparse.Namespace) -> Any:
    from vllm.config import KVTransferConfig

    connector = args.connector or ("lmshare" if args.worker or args.endpoint else "none")
    if connector == "none":
        return None
    if connector == "offload":  # vLLM's own CPU offloading: the siloed cache users would pick
        return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                kv_connector_extra_config={"cpu_bytes_to_use":
                                                           args.offload_bytes})
    extra: dict[str, Any] = {"chunk_tokens": args.chunk_tokens, "peers": not args.no_peers,
                             "async_save": not args.sync_save}
    if args.worker:
        extra["worker"] = args.worker
    if args.endpoint:
        extra["endpoint"] = args.endpoint
    if args.tenant:
        extra["tenant"] = args.tenant
    if args.no_direct:
        extra["same_host_direct"] = False
    return KVTransferConfig(
        kv_connector="LMShareConnector", kv_connector_module_path="lmshare.integrations.vllm",
        kv_role="kv_both", kv_connector_extra_config=extra)


def _build_llm(args: argparse.Namespace):
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    transfer = _connector_config(args)
    if transfer is not None:
        kwargs["kv_transfer_config"] = transfer
    if not args.multiprocess:
        kwargs["distributed_executor_backend"] = "uni"
    if args.num_blocks:
        kwargs["num_gpu_blocks_override"] = args.num_blocks
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.load_format:
        kwargs["load_format"] = args.load_format
    return LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
               block_size=args.block_size, enforce_eager=not args.cuda_graphs, seed=0,
               enable_prefix_caching=not args.no_prefix_caching,
               skip_tokenizer_init=args.skip_tokenizer,
               disable_log_stats=not args.stats, **kwargs)


def _varied_dummy_weights() -> None:
    """vLLM's dummy weights (uniform +-1e-3, norms included) make every output token the same.
    Instead: uniform(+-0.02) matrices and 1.0 vectors, seeded by the order vLLM initializes
    them, so outputs vary with the prompt and are identical across engines. Installed in every
    process of the engine (vLLM's engine core re-imports this module) when
    $LMSHARE_VARIED_DUMMY_WEIGHTS is set."""
    import itertools

    import torch
    from vllm.model_executor.model_loader import dummy_loader

    counter = itertools.count()

    @torch.no_grad()
    def initialize(model: Any, model_config: Any = None, *args: Any, **kwargs: Any) -> None:
        for param in model.state_dict().values():
            seed = next(counter)
            if not torch.is_floating_point(param) or param.device.type == "meta":
                continue
            if param.dim() < 2:
                param.fill_(1.0)
                continue
            generator = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(-0.02, 0.02, generator=generator)

    dummy_loader.initialize_dummy_weights = initialize


if os.environ.get("LMSHARE_VARIED_DUMMY_WEIGHTS"):
    _varied_dummy_weights()


def _request_output(out: Any) -> dict[str, Any]:
    metrics = getattr(out, "metrics", None)
    return {"token_ids": list(out.outputs[0].token_ids),
            "num_cached_tokens": getattr(out, "num_cached_tokens", None),
            # engine-measured time to first token (with --stats), else None
            "ttft": getattr(metrics, "first_token_latency", None) or None}


def serve(args: argparse.Namespace) -> int:
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own output goes to stderr
    started = time.monotonic()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _build_llm(args)
    results.write(json.dumps({"ready": True, "start_seconds": time.monotonic() - started,
                              "pid": os.getpid(), "namespace": _connector_namespace()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if request.get("flush"):
                _flush_connector_saves(llm)
                results.write(json.dumps({"flushed": True}) + "\n")
                continue
            if request.get("reset_prefix_cache"):  # vLLM's own (GPU) prefix cache only
                results.write(json.dumps({"reset": bool(llm.reset_prefix_cache())}) + "\n")
                continue
            params = SamplingParams(max_tokens=int(request.get("max_tokens", 16)),
                                    temperature=0.0, ignore_eos=True,
                                    detokenize=not args.skip_tokenizer)
            batch = request.get("batch")  # several prompts at once: vLLM batches them
            prompts = batch if batch is not None else [request["prompt_token_ids"]]
            t0 = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                   params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            if batch is not None:
                reply = {"outputs": [_request_output(o) for o in outputs], "seconds": seconds}
            else:
                reply = {**_request_output(outputs[0]), "seconds": seconds}
        except Exception as exc:  # reported to the parent
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        results.write(json.dumps(reply) + "\n")
    return 0


def _connector_namespace() -> str | None:
    """The lmshare namespace of this engine (single-process mode: the connector lives here)."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    except ImportError:
        return None
    if not has_kv_transfer_group():
        return None
    signature = getattr(get_kv_transfer_group(), "signature", None)
    return signature.namespace().hex() if signature is not None else None


def _flush_connector_saves(llm: Any, timeout_s: float = 10.0) -> None:
    """Wait for background stores (single-process mode only: the connector lives here)."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    except ImportError:
        return
    if has_kv_transfer_group():
        saver = getattr(get_kv_transfer_group(), "_saver", None)
        if saver is not None:
            saver.flush(timeout_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--worker", default="", help="lmshare worker name (omit: no lmshare)")
    p.add_argument("--endpoint", default="", help="lmshare worker endpoint instead of a name")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--no-peers", action="store_true", help="siloed: local hits only")
    p.add_argument("--sync-save", action="store_true", help="store chunks inline")
    p.add_argument("--tenant", default="")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--num-blocks", type=int, default=0,
                   help="cap vLLM's own KV cache at this many blocks (0: sized by vLLM)")
    p.add_argument("--stats", action="store_true",
                   help="keep vLLM's request stats on and report each request's TTFT")
    p.add_argument("--multiprocess", action="store_true",
                   help="vLLM's default engine-core process (else single-process mode)")
    p.add_argument("--connector", choices=("lmshare", "offload", "none"), default="",
                   help="KV connector (default: lmshare with --worker/--endpoint, else none); "
                        "offload = vLLM's own OffloadingConnector (CPU)")
    p.add_argument("--offload-bytes", type=int, default=8 << 30,
                   help="CPU memory of the OffloadingConnector")
    p.add_argument("--no-direct", action="store_true",
                   help="lmshare: no direct reads of same-host peers' pools")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="vLLM's default compiled + CUDA-graph mode (else enforce_eager)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.0)
    p.add_argument("--load-format", default="", help="e.g. dummy: no weights files")
    p.add_argument("--skip-tokenizer", action="store_true",
                   help="token ids in and out only (no tokenizer in the model folder)")
    return p


class EngineError(LMShareError):
    """The engine process failed, exited, or gave no answer in time (its log tail is in the
    message)."""


class EngineProcess:
    """Parent-side handle of one engine process. Every wait has a deadline."""

    def __init__(self, model: str | Path, *, worker: str = "", log_path: str | Path,
                 env: dict[str, str] | None = None, extra_args: Sequence[str] = (),
                 multiprocess: bool = False, python: str = sys.executable) -> None:
        args = [python, "-m", "lmshare.testing.vllm_engine", "--model", str(model),
                *(["--worker", worker] if worker else []), *extra_args]
        if multiprocess:
            args.append("--multiprocess")
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")  # closed in close()
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, env=full_env, text=True, bufsize=1,
                                        start_new_session=True)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,),
                                        daemon=True)
        self._reader.start()
        self.info: dict[str, Any] = {}

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _next(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if self.process.poll() is not None and not self._lines:
                    raise EngineError(f"engine exited ({self.process.returncode}): "
                                      f"{self.log_tail()}")
                if left <= 0:
                    raise EngineError(f"engine gave no answer within {timeout_s:.0f}s: "
                                      f"{self.log_tail()}")
                self._cond.wait(min(left, 0.5))
            return json.loads(self._lines.pop(0))

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, Any]:
        self.info = self._next(timeout_s)
        return self.info

    def generate(self, token_ids: Sequence[int], max_tokens: int = 16,
                 timeout_s: float = 300.0) -> dict[str, Any]:
        self._send({"prompt_token_ids": list(token_ids), "max_tokens": max_tokens})
        reply = self._next(timeout_s)
        if "error" in reply:
            raise EngineError(reply["error"])
        return reply

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_tokens: int = 16,
                       timeout_s: float = 600.0) -> dict[str, Any]:
        """Several prompts in one ``generate`` call (vLLM schedules them together):
        ``{"outputs": [...], "seconds": wall time}``."""
        self._send({"batch": [list(p) for p in prompts], "max_tokens": max_tokens})
        reply = self._next(timeout_s)
        if "error" in reply:
            raise EngineError(reply["error"])
        return reply

    def reset_prefix_cache(self, timeout_s: float = 60.0) -> bool:
        """Empty vLLM's own prefix cache (not the connector's); False if vLLM refused."""
        self._send({"reset_prefix_cache": True})
        return bool(self._next(timeout_s).get("reset"))

    def flush(self, timeout_s: float = 30.0) -> None:
        self._send({"flush": True})
        self._next(timeout_s)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise EngineError(f"engine is gone: {self.log_tail()}") from None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                self.process.wait(timeout_s)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                pass
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers: the engine's children
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("engine process %d did not exit", self.process.pid)
        self._log.close()


def main(argv: Sequence[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
