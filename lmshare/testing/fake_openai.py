"""A small fake OpenAI-compatible server (aiohttp) for router tests: it answers
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (streamed or not) with text
naming itself, and echoes the request body it received, so a test sees where a request went
and that it arrived unchanged. Run it as its own process::

    python -m lmshare.testing.fake_openai --port 8001 --name a [--token-delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web


def build_app(name: str, model: str, token_delay_s: float, fail_status: int) -> web.Application:
    served = {"count": 0}

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "owned_by": "fake", "root": model}]})

    async def generate(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        served["count"] += 1
        if fail_status:
            return web.json_response({"error": {"message": f"{name} fails on purpose"}},
                                     status=fail_status)
        body = json.loads(raw)
        count = int(body.get("max_tokens") or 4)
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            await asyncio.sleep(token_delay_s * count)
            text = " ".join(f"{name}{i}" for i in range(count))
            choice = {"index": 0, "finish_reason": "length",
                      **({"message": {"role": "assistant", "content": text}} if chat
                         else {"text": text})}
            return web.json_response({"id": f"{name}-{served['count']}", "model": model,
                                      "object": "chat.completion" if chat else "text_completion",
                                      "created": int(time.time()), "choices": [choice],
                                      "backend": name, "echo": raw.decode()})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(count):
            await asyncio.sleep(token_delay_s)
            delta = {"delta": {"content": f"{name}{i} "}} if chat else {"text": f"{name}{i} "}
            event = {"id": f"{name}-{served['count']}", "backend": name,
                     "choices": [{"index": 0, **delta}]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"served": served["count"]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/fake/stats", stats)
    return app


def get_json(url: str, quiet: bool = False):
    """(status, JSON body) of a GET; None for an unreachable server when ``quiet``."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        if quiet:
            return None
        raise


class FakeServer:
    """This module's server as its own process (``kill`` it like a crashed backend)."""

    def __init__(self, name: str, log_dir: str | Path, *extra: str) -> None:
        from lmshare.local_cluster import free_port
        from lmshare.testing.waiting import wait_until

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(log_dir) / f"fake-{name}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmshare.testing.fake_openai", "--port", str(self.port),
             "--name", name, *extra], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: get_json(f"{self.url}/v1/models", quiet=True), 20, f"fake {name} up")

    def served(self) -> int:
        """Generation requests it received."""
        return get_json(f"{self.url}/fake/stats")[1]["served"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)
        self.log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--token-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--fail-status", type=int, default=0,
                        help="answer every generation request with this HTTP status")
    args = parser.parse_args(argv)
    app = build_app(args.name, args.model, args.token_delay, args.fail_status)
    print(f"fake openai {args.name} on {args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
