"""The ``lmshare`` command: controller | worker | drain | router | status | explain | dashboard | demo | bench | keygen.

With the demo and LocalCluster, the composition root: the only code that knows every part (the
demo and LocalCluster start the parts as processes through this module). The parts are imported lazily so that, for example,
``lmshare controller`` never imports torch or the dashboard.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

from lmshare.errors import ConfigError, LMShareError
from lmshare.units import parse_address, parse_size

log = logging.getLogger("lmshare")

EXIT_USAGE = 2


def _positive(text: str) -> float:
    """An option's number of seconds (or rate): finite and above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def _non_negative(text: str) -> float:
    """A number of seconds, 0 allowed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def _positive_size(text: str) -> int:
    """A size option (``64MiB``) above zero bytes."""
    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _key(args: argparse.Namespace):
    """The cluster key of this command (``--key-file``, ``$LMSHARE_KEY_FILE``), or None with
    ``--insecure``; refuses to go on with neither."""
    from lmshare.credentials import resolve_key

    return resolve_key(args.key_file, args.insecure)


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="the cluster key (from `lmshare keygen`; default $LMSHARE_KEY_FILE)")
    p.add_argument("--insecure", action="store_true",
                   help="run without a cluster key: no authentication, no encryption")


def _add_tenant_limit_options(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--tenant-quota", action="append", default=[], metavar="TENANT=SIZE",
                   help=f"bytes a tenant may hold {where} (repeat, or comma-separate; '-' "
                        "names the cluster key's own chunks)")
    p.add_argument("--tenant-ttl", action="append", default=[], metavar="TENANT=SECONDS",
                   help="how long a tenant's chunks stay cached after they are stored "
                        "(repeat, or comma-separate)")


def _tenant_limits(args: argparse.Namespace) -> dict:
    from lmshare.tenancy import parse_quotas, parse_ttls

    return {"tenant_quotas": parse_quotas(args.tenant_quota),
            "tenant_ttls": parse_ttls(args.tenant_ttl)}


def _cmd_keygen(args: argparse.Namespace) -> int:
    from lmshare.credentials import describe, generate_key_file

    if args.rotate:
        from lmshare.credentials import rotate_key_file

        if not args.key_file or args.tenant or args.out:
            raise ConfigError("keygen --rotate STEP rewrites the cluster key file given with "
                              "--key-file (no --out, no --tenant)")
        key = rotate_key_file(args.key_file, args.rotate)
        print(f"{args.key_file}: {args.rotate} done; it now holds {describe(key)}. Copy it to "
              "every host, remake the tenants' credentials (keygen --tenant NAME --replace), "
              "then send SIGHUP to every controller and worker", flush=True)
        return 0
    if not args.out:
        raise ConfigError("keygen needs --out FILE (or --rotate STEP --key-file FILE)")
    if args.tenant:
        from lmshare.credentials import generate_tenant_file, load_key_file

        if not args.key_file:
            raise ConfigError("keygen --tenant NAME derives the tenant's credential from the "
                              "cluster key: pass --key-file CLUSTER_KEY")
        key = generate_tenant_file(load_key_file(args.key_file), args.tenant, args.out,
                                   replace=args.replace)
        print(f"credential of tenant {args.tenant} ({key.fingerprint}) written to {args.out} "
              "(mode 600); give it to that tenant's workers (--key-file), and name the tenant "
              "in the controller's --tenants", flush=True)
        return 0
    key = generate_key_file(args.out)
    print(f"cluster key {key.fingerprint} written to {args.out} (mode 600); give it to every "
          "controller, worker and client of the cluster with --key-file or LMSHARE_KEY_FILE",
          flush=True)
    return 0


def _cmd_controller(args: argparse.Namespace) -> int:
    from lmshare.controller import ControllerConfig, ControllerService
    from lmshare.shards import Shard
    from lmshare.signals import SignalLatch

    shard = Shard.parse(args.shard)
    key = _key(args)
    service = ControllerService(ControllerConfig(
        host=args.host, port=args.port, lookup_port=args.lookup_port,
        heartbeat_interval_s=args.heartbeat_interval, shard=shard,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_message_bytes=args.max_message_bytes, key=key,
        tenants=tuple(t.strip() for t in (args.tenants or "").split(",") if t.strip()),
        **_tenant_limits(args)))
    if args.metrics_port is not None:
        from lmshare.controller.metrics import start_controller_metrics

        start_controller_metrics(service, args.metrics_port, args.host)
    election = None
    if args.etcd:
        from lmshare.controller.election import LeaderElection

        etcd_host, etcd_port = parse_address(args.etcd)
        advertise = args.advertise or f"{args.host}:{service.port}"
        # each shard elects its own leader
        election_key = args.election_key if shard.count == 1 else \
            f"{args.election_key}/shard-{shard.index}-of-{shard.count}"
        election = LeaderElection(etcd_host, etcd_port, advertise, key=election_key,
                                  ttl_s=args.election_ttl,
                                  on_change=service.on_leadership_change)
        service.election = election
        election.start()
    signals = SignalLatch().install()  # SIGHUP: a key rotation step
    role = f" (etcd election at {args.etcd})" if election else ""
    if shard.count > 1:
        role += f" as shard {shard}"
    security = f"cluster key {key.fingerprint}" if key else "INSECURE: no cluster key"
    print(f"lmshare controller listening on {args.host}:{service.port} (lookups also on "
          f"{service.lookup_port}){role}; {security}",
          flush=True)
    try:
        service.serve_forever(signals)
    finally:
        if election is not None:
            election.stop()  # hands leadership over at once
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from lmshare.control import parse_controllers
    from lmshare.shards import parse_shard_addresses
    from lmshare.worker import WorkerAgent, WorkerConfig
    from lmshare.worker.config import resolve_transports

    first, *others = (parse_controllers(group) for group in parse_shard_addresses(args.controller))
    (host, port), *standbys = first
    key = _key(args)
    config = WorkerConfig(key=key,
        controller_host=host, controller_port=port, standby_controllers=tuple(standbys),
        shard_controllers=tuple(tuple(group) for group in others),
        cache_bytes=args.cache_size,
        slab_bytes=args.slab_size, host=args.host, port=args.port,
        endpoint=args.endpoint, connect_timeout_s=args.connect_timeout,
        fetch_timeout_s=args.fetch_timeout, checksum=args.checksum,
        drain_timeout_s=args.drain_timeout,
        transports=resolve_transports(args.transports), digests=not args.no_digests,
        encrypt=args.encrypt, **_tenant_limits(args), **({"name": args.name} if args.name else {}))
    agent = WorkerAgent(config).start()
    if args.metrics_port is not None:
        from lmshare.worker.metrics import start_worker_metrics

        try:
            start_worker_metrics(agent, args.metrics_port)
        except BaseException:
            agent.shutdown()  # leave no registration or shared memory behind
            raise
    print(f"lmshare worker {agent.worker_id} registered in "
          f"{agent.link.last_register_s * 1000:.2f} ms; peers on "
          f"{agent.peer_server.host}:{agent.peer_server.port}, clients on {agent.endpoint}; "
          + (f"key {key.fingerprint}" + (f" (tenant {key.tenant})" if key.tenant else "")
             if key else "INSECURE: no cluster key"), flush=True)
    agent.run()
    return 0


def _cluster_stats(controller: str, timeout_s: float, key=None):
    """The controller's ClusterStats (``lmshare status``; with shards, every shard's part)."""
    from lmshare.control import shard_clients
    from lmshare.stats import fetch_shard_stats

    clients = shard_clients(controller, timeout_s, key)
    try:
        return fetch_shard_stats(clients)
    finally:
        for client in clients:
            client.close()


def _cmd_status(args: argparse.Namespace) -> int:
    stats = _cluster_stats(args.controller, args.timeout, _key(args))
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2, default=str))
        return 0
    from rich.console import Console

    from lmshare.status_view import status_report

    # a pipe or file gets the whole table instead of one squeezed to 80 columns
    Console(width=None if sys.stdout.isatty() else 200).print(status_report(stats))
    return 0


def _read_text(path: str, what: str = "") -> str:
    """A text file ``lmshare explain`` was pointed at; ConfigError naming ``what`` it should
    hold when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}{path} ({exc.strerror})") from None


def _prompt_tokens(args: argparse.Namespace) -> list[int]:
    """The prompt of ``lmshare explain``: token ids, or text through ``--tokenizer``."""
    if args.tokens is not None:
        text = args.tokens
        if text.startswith("@"):
            text = _read_text(text[1:], "the token ids in ")
        try:
            tokens = [int(t) for t in text.replace(",", " ").replace("[", " ").replace(
                "]", " ").split()]
        except ValueError:
            raise ConfigError("--tokens takes token ids separated by commas or spaces (or "
                              "@FILE holding them, e.g. a JSON list)") from None
        if any(t < 0 for t in tokens):
            raise ConfigError("--tokens: token ids are not negative")
        return tokens
    text = args.text
    if args.text_file is not None:
        text = _read_text(args.text_file)
    if not args.tokenizer:
        raise ConfigError("a text prompt needs --tokenizer DIR (the tokenizer the engine "
                          "serves), or give token ids with --tokens")
    from lmshare.router.tokens import Tokenizer

    tokens = Tokenizer(args.tokenizer).completion_tokens(
        {"prompt": text, "add_special_tokens": not args.no_special_tokens})
    return list(tokens or [])


def _explain_signature(args: argparse.Namespace, stats) -> tuple[bytes, int]:
    """(namespace, chunk tokens) of ``lmshare explain``."""
    from lmshare.explain import signature_of_worker
    from lmshare.keys import KEY_BYTES, ModelSignature

    if args.like_worker:
        return signature_of_worker(stats, args.like_worker, args.namespace or "")
    if args.signature:
        text = args.signature
        if text.startswith("@"):
            text = _read_text(text[1:], "the signature in ")
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--signature is not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise ConfigError("--signature takes a JSON object of ModelSignature fields, e.g. "
                              '\'{"model": "meta-llama/Llama-3.1-8B", "chunk_tokens": 256}\'')
        try:
            signature = ModelSignature.from_dict(fields)
        except TypeError as exc:
            raise ConfigError(f"--signature: {exc}") from None
        return signature.namespace(), signature.chunk_tokens
    if args.namespace:
        try:
            namespace = bytes.fromhex(args.namespace)
        except ValueError:
            namespace = b""
        if len(namespace) != KEY_BYTES or not args.chunk_tokens:
            raise ConfigError(f"--namespace takes {2 * KEY_BYTES} hex digits (as `lmshare "
                              "status --json` shows them) and needs --chunk-tokens")
        return namespace, args.chunk_tokens
    raise ConfigError("say whose model signature to explain the prompt under: --like-worker "
                      "NAME, --signature JSON, or --namespace HEX with --chunk-tokens")


def _cmd_explain(args: argparse.Namespace) -> int:
    from lmshare.control import shard_clients
    from lmshare.explain import ShardedController, explain, render
    from lmshare.stats import fetch_cluster_stats

    tokens = _prompt_tokens(args)
    clients = shard_clients(args.controller, args.timeout, _key(args))
    try:
        stats = fetch_cluster_stats(clients[0])  # the workers, as every shard knows them
        namespace, chunk_tokens = _explain_signature(args, stats)
        result = explain(ShardedController(clients, args.timeout), stats, namespace,
                         chunk_tokens, tokens, args.worker or args.like_worker or "")
    finally:
        for client in clients:
            client.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def _cmd_drain(args: argparse.Namespace) -> int:
    from lmshare.client import Client

    # the worker answers once its chunks are handed off (at most its --drain-timeout)
    with Client(worker=args.worker, endpoint=args.endpoint or None, timeout_s=args.timeout,
                key_file=args.key_file or None) as client:
        report = client.drain()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"worker {report['worker_id']} drained in {report['seconds']:.2f} s: "
          f"{report['chunks']} chunks, {report['unique']} held only there, "
          f"{report['copied']} of {report['assigned']} handed to {report['peers']} peers"
          + (f" ({report['note']})" if report.get("note") else "")
          + "; it deregisters and exits", flush=True)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from lmshare.control import shard_clients
    from lmshare.dashboard import print_once, run_dashboard

    shard_clients(args.controller)  # a bad address is a usage error, not a retry loop
    key = _key(args)
    if args.once:
        return print_once(args.controller, timeout_s=args.timeout, key=key, router=args.router)
    return run_dashboard(args.controller, refresh_s=args.refresh, key=key, router=args.router)


def _cmd_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess
    from pathlib import Path

    checkout = Path(args.source).resolve()
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise ConfigError(f"no benchmarks/ folder in {checkout}; run `lmshare bench` from a "
                          "source checkout of lmshare (or pass --source DIR)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.names], cwd=checkout,
                           env=env)


def _cmd_router(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from lmshare.router import RouterConfig, parse_backend, serve

    config = RouterConfig(
        backends=[parse_backend(text) for text in args.backend], host=args.host,
        port=args.port, policy=args.policy, controller=args.controller or "",
        key=_key(args) if args.controller else None, tokenizer=args.tokenizer,
        lookup_timeout_s=args.lookup_timeout, load_margin=args.load_margin,
        connect_timeout_s=args.connect_timeout, read_timeout_s=args.read_timeout,
        health_interval_s=args.health_interval, retries=args.retries)

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        await serve(config, ready=lambda port: print(
            f"lmshare router ({config.policy}) on http://{config.host}:{port} in front of "
            f"{len(config.backends)} backends", flush=True))

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        pass
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lmshare.demo import run_demo

    dashboard = None
    if not args.no_dashboard:
        from lmshare.dashboard import run_dashboard as dashboard
    return run_demo(args, dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmshare", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", help="debug | info | warning | error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("controller", help="run the controller")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7800, help="control port (default 7800)")
    p.add_argument("--lookup-port", type=int, default=0, metavar="PORT",
                   help="port of the lookup socket, served before worker traffic (advertised to "
                        "workers and routers; default 0 = any free port: pin it where a "
                        "firewall must let it through)")
    p.add_argument("--heartbeat-interval", type=_positive, default=1.0, metavar="S")
    p.add_argument("--heartbeat-timeout", type=_positive, default=5.0, metavar="S",
                   help="declare a worker dead after this long without heartbeats (default 5)")
    p.add_argument("--max-message-bytes", default="64MiB", type=_positive_size)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics")
    p.add_argument("--etcd", default=None, metavar="HOST:PORT",
                   help="elect one leader among several controllers through this etcd "
                        "(needs lmshare[etcd]); standbys take over when the leader dies")
    p.add_argument("--advertise", default=None, metavar="HOST:PORT",
                   help="the address workers use for this controller (default --host:--port)")
    p.add_argument("--election-key", default="/lmshare/controller/leader",
                   help="etcd key of the election (a shard's: this key + /shard-K-of-N)")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="index only the keys of shard K of N (counted from 0; workers list the "
                        "N shards in order: --controller 'A;B;...'); default 0/1 = every key")
    p.add_argument("--election-ttl", type=_positive, default=2.0, metavar="S",
                   help="leader lease in etcd; a dead leader is replaced after about this long")
    p.add_argument("--tenants", default="", metavar="NAME[,NAME...]",
                   help="tenants whose credentials (lmshare keygen --tenant) are admitted; each "
                        "tenant's workers see and fetch only each other's chunks")
    _add_tenant_limit_options(p, "across the cluster")
    _add_key_options(p)
    p.set_defaults(func=_cmd_controller)

    p = commands.add_parser("worker", help="run a worker beside a vLLM instance")
    p.add_argument("--controller", required=True, metavar="HOST:PORT[,HOST:PORT...][;...]",
                   help="the controller; several = etcd-elected leader and standbys; "
                        "controller shards (--shard K/N) in order, separated by ';'")
    p.add_argument("--cache-size", default="8GiB", type=_positive_size,
                   help="shared-memory pool size (default 8GiB)")
    p.add_argument("--name", default=None, help="worker name, unique in the cluster "
                                                "(default HOSTNAME-PID)")
    p.add_argument("--slab-size", default="256KiB", type=_positive_size,
                   help="pool allocation unit (default 256KiB)")
    p.add_argument("--host", default="", help="data-plane address to listen on and advertise "
                                              "(default: the address that reaches the controller)")
    p.add_argument("--port", type=int, default=0, help="data-plane port (default: any free port)")
    p.add_argument("--endpoint", default="", help="local client endpoint (default: an IPC "
                                                  "socket named after the worker)")
    p.add_argument("--connect-timeout", type=_positive, default=5.0, metavar="S")
    p.add_argument("--fetch-timeout", type=_positive, default=5.0, metavar="S",
                   help="deadline of one peer fetch (default 5)")
    p.add_argument("--checksum", action="store_true", help="verify a CRC32 of every peer chunk")
    p.add_argument("--drain-timeout", type=_non_negative, default=10.0, metavar="S",
                   help="on SIGTERM or `lmshare drain`, hand the chunks only this worker holds "
                        "to peers with free space for at most this long, then leave "
                        "(default 10; 0 = leave at once)")
    p.add_argument("--no-digests", action="store_true",
                   help="do not record chunk digests as chunks are stored, nor check fetched "
                        "chunks against them (checking is on by default)")
    _add_tenant_limit_options(p, "in this worker's pool")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt KV bytes in transit on TCP (AES-256-GCM, keys per connection "
                        "from the key handshake); a peer that asks gets it either way")
    p.add_argument("--transports", default="auto",
                   help="data paths to offer and use: shm (same-host shared memory), ucx "
                        "(needs lmshare[ucx]), tcp (always on); default auto = shm, ucx where "
                        "RDMA hardware is present, tcp")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics")
    _add_key_options(p)
    p.set_defaults(func=_cmd_worker)

    p = commands.add_parser("router", help="OpenAI-compatible load balancer in front of vLLM "
                                           "servers, routing by cached prefix and load")
    p.add_argument("--backend", action="append", required=True, metavar="URL[=WORKER]",
                   help="a vLLM server and the lmshare worker beside it (repeat for each)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--policy", default="prefix+load",
                   help="round-robin | least-loaded | prefix | prefix+load (default)")
    p.add_argument("--controller", default=None, metavar="HOST:PORT[,HOST:PORT...][;...]",
                   help="the lmshare controller (needed by the prefix policies); controller "
                        "shards in order, separated by ';'")
    p.add_argument("--tokenizer", default="", metavar="DIR_OR_ID",
                   help="the served model's tokenizer (default: what the backends report)")
    p.add_argument("--lookup-timeout", type=_positive, default=0.05, metavar="S",
                   help="deadline of the controller lookup; later = route by load (default 0.05)")
    p.add_argument("--load-margin", type=int, default=2, metavar="N",
                   help="prefix+load: requests in flight a holder may have beyond the "
                        "least-loaded backend before a request goes elsewhere (default 2)")
    p.add_argument("--connect-timeout", type=_positive, default=3.0, metavar="S")
    p.add_argument("--read-timeout", type=_positive, default=300.0, metavar="S",
                   help="longest silence of a backend during a response (default 300)")
    p.add_argument("--health-interval", type=_positive, default=1.0, metavar="S")
    p.add_argument("--retries", type=int, default=-1, metavar="N",
                   help="other backends tried after one fails (default: all)")
    _add_key_options(p)
    p.set_defaults(func=_cmd_router)

    p = commands.add_parser("drain", help="make a worker on this host hand the chunks only it "
                                          "holds to peers, then leave (as on SIGTERM)")
    p.add_argument("--worker", required=True, metavar="NAME", help="the worker's --name")
    p.add_argument("--endpoint", default="", help="its local endpoint (default: from the name)")
    p.add_argument("--timeout", type=_positive, default=60.0, metavar="S",
                   help="how long to wait for its answer (default 60; the worker stops "
                        "handing off after its own --drain-timeout)")
    p.add_argument("--json", action="store_true", help="print the drain report as JSON")
    p.add_argument("--key-file", default="", help="the cluster key (default $LMSHARE_KEY_FILE): "
                                                  "the worker must prove it holds it")
    p.set_defaults(func=_cmd_drain)

    p = commands.add_parser("status", help="print the cluster's workers and numbers")
    p.add_argument("--controller", default="127.0.0.1:7800", metavar="HOST:PORT[;...]",
                   help="the controller; controller shards in order, separated by ';'")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=_positive, default=3.0, metavar="S")
    _add_key_options(p)
    p.set_defaults(func=_cmd_status)

    p = commands.add_parser("explain", help="where a prompt's prefix is held, chunk by chunk, "
                                            "and why it stops where it stops")
    p.add_argument("--controller", default="127.0.0.1:7800", metavar="HOST:PORT[;...]",
                   help="the controller; controller shards in order, separated by ';'")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--tokens", metavar="IDS", help="the prompt as token ids (1,2,3 or "
                                                        "@FILE)")
    prompt.add_argument("--text", metavar="TEXT", help="the prompt as text (needs --tokenizer)")
    prompt.add_argument("--text-file", metavar="FILE", help="the prompt's text in a file")
    p.add_argument("--tokenizer", metavar="DIR", help="the tokenizer the engine serves")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="tokenize without adding special tokens (BOS...)")
    p.add_argument("--like-worker", metavar="NAME",
                   help="the model signature worker NAME's clients use (and its view)")
    p.add_argument("--signature", metavar="JSON", help="the model signature as ModelSignature "
                                                       "fields in JSON (or @FILE)")
    p.add_argument("--namespace", metavar="HEX", help="a namespace (with --chunk-tokens), or "
                                                      "which of --like-worker's")
    p.add_argument("--chunk-tokens", type=int, default=0, metavar="N")
    p.add_argument("--worker", metavar="NAME", help="explain as this worker would look it up "
                                                    "(default: --like-worker's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=_positive, default=3.0, metavar="S")
    _add_key_options(p)
    p.set_defaults(func=_cmd_explain)

    p = commands.add_parser("dashboard", help="live terminal dashboard of a cluster")
    p.add_argument("--controller", default="127.0.0.1:7800", metavar="HOST:PORT[;...]",
                   help="the controller; controller shards in order, separated by ';'")
    p.add_argument("--refresh", type=_positive, default=0.5, metavar="S",
                   help="seconds between frames (at most 0.5; default 0.5)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--router", default="", metavar="URL",
                   help="also show an lmshare router's panel (e.g. http://127.0.0.1:8000)")
    p.add_argument("--timeout", type=_positive, default=3.0, metavar="S",
                   help="deadline of the controller's answer with --once (default 3)")
    _add_key_options(p)
    p.set_defaults(func=_cmd_dashboard)

    p = commands.add_parser("demo", help="embedded local cluster with synthetic shared-prefix "
                                         "traffic and the live dashboard")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--duration", type=_positive, default=None, metavar="S",
                   help="stop after this many seconds (default: run until q or Ctrl-C)")
    p.add_argument("--port", type=int, default=0, help="controller port (default: a free port)")
    p.add_argument("--no-dashboard", action="store_true", help="print a summary instead")
    p.add_argument("--rate", type=_positive, default=10.0, metavar="N",
                   help="requests per second of the synthetic workload (default 10)")
    p.add_argument("--cache-size", default="256MiB", help="each worker's pool (default 256MiB)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="cluster key of the demo's processes (default: a new one of its own)")
    p.set_defaults(func=_cmd_demo)

    p = commands.add_parser("keygen", help="make a cluster key (give it to every process)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write it (created with mode 600; never overwritten)")
    p.add_argument("--tenant", default=None, metavar="NAME",
                   help="make tenant NAME's credential instead, from the cluster key given "
                        "with --key-file: its workers reach only each other")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="the cluster key (--tenant, --rotate)")
    p.add_argument("--rotate", default=None, choices=["add-next", "promote", "retire"],
                   help="one step of a key rotation, written over --key-file at once: add-next "
                        "(a new key, accepted but not used yet), promote (use it; the old one "
                        "stays accepted), retire (drop the old one); after each step copy the "
                        "file everywhere and send SIGHUP to every process (docs/security.md)")
    p.add_argument("--replace", action="store_true",
                   help="with --tenant: replace --out (remaking a tenant's credential after a "
                        "rotation step)")
    p.set_defaults(func=_cmd_keygen)

    p = commands.add_parser("bench", help="run the benchmarks of a source checkout "
                                          "(results: BENCHMARKS.md format)")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--source", default=".", help="the checkout (default: this folder)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except LMShareError as exc:
        print(f"lmshare {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `lmshare status --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
