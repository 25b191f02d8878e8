"""``lmshare explain``: where a prompt's prefix is held, chunk by chunk, and why it stops.

The controller's ``explain`` request says, for each chunk key, which live workers hold it, or
which worker let it go last and how (left or died: ``holder_gone``; evicted it: ``evicted``);
the cluster's stats say how the asking worker reaches each holder (the transport it would use).
The classification follows the workers' own (lmshare/misses.py): the available prefix is
``local`` or ``peer``; from the first chunk not available on, a chunk held nowhere keeps its own
reason, one still held behind the stop takes the stop's. What only a real lookup can know
(a fetch that fails, a late answer, a peer skipped because recomputing wins) is in the
workers' metrics and the connector's log, not here. With the controller's keys in shards,
:class:`ShardedController` asks each shard about its own keys and puts the answers together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lmshare import misses
from lmshare.control import FailoverControllerClient, call_all
from lmshare.errors import ConfigError, ErrorCode, LMShareError, RemoteError
from lmshare.keys import KEY_BYTES, chunk_keys
from lmshare.shards import split_by_shard
from lmshare.stats import ClusterStats, WorkerView, printable
from lmshare.transports.base import PeerInfo
from lmshare.transports.choice import choose_transport


class _Controller(Protocol):
    def call(self, type_: str, **fields: Any) -> dict[str, Any]: ...


class ShardedController:
    """The controller shards (one client each, in shard order) as one controller to explain
    with: an ``explain`` asks every shard about its own keys at once and puts the answers
    together in the keys' order; a shard that fails fails the whole explanation (it is a
    diagnosis: half of one would mislead). With one shard, its client as it is."""

    def __init__(self, clients: Sequence[FailoverControllerClient], timeout_s: float) -> None:
        self.clients = list(clients)
        self.timeout_s = timeout_s

    def call(self, type_: str, **fields: Any) -> dict[str, Any]:
        if type_ != "explain" or len(self.clients) == 1:
            return self.clients[0].call(type_, **fields)
        keys = fields["keys"]
        positions = split_by_shard(keys, len(self.clients))
        asked = [shard for shard, where in enumerate(positions) if where]
        results = call_all([(self.clients[shard], "explain",
                             {**fields, "keys": [keys[i] for i in positions[shard]]})
                            for shard in asked], self.timeout_s)
        merged: dict[str, Any] = {"known": False, "chunks": [None] * len(keys), "workers": {},
                                  "departed": {}}
        for shard, reply in zip(asked, results):
            if isinstance(reply, LMShareError):
                raise reply
            chunks = reply.get("chunks")
            if not isinstance(chunks, list) or len(chunks) != len(positions[shard]):
                raise RemoteError(ErrorCode.BAD_MESSAGE,
                                  f"controller shard {shard}'s explain reply is malformed")
            for position, entry in zip(positions[shard], chunks):
                merged["chunks"][position] = entry
            for name in ("workers", "departed"):
                if isinstance(reply.get(name), dict):
                    merged[name].update(reply[name])
            merged["known"] = merged["known"] or reply.get("known") is True
        return merged


@dataclass
class ChunkExplained:
    """One chunk of the prompt (tokens ``[first_token, end_token)``)."""

    index: int
    first_token: int
    end_token: int
    result: str  # "hit" | "miss"
    reason: str  # local / peer, or a miss reason
    holders: list[dict[str, str]] = field(default_factory=list)  # {"worker", "transport"}
    detail: str = ""


@dataclass
class Explanation:
    """The whole prompt, as ``--json`` prints it."""

    namespace: str
    chunk_tokens: int
    tokens: int
    worker: str  # whose view ("" = none: holders only, no local/peer)
    hit_chunks: int
    hit_tokens: int
    local_chunks: int
    peer_chunks: int
    stop: dict[str, Any]  # {"chunk", "reason", "detail"} ({} when the whole prompt is held)
    chunks: list[ChunkExplained]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signature_of_worker(stats: ClusterStats, name: str, namespace: str = ""
                        ) -> tuple[bytes, int]:
    """(namespace, chunk tokens) that worker ``name``'s clients look up: the most used
    one, or ``namespace`` (hex) among them. ConfigError when there is none to take."""
    view = _worker(stats, name)
    reported = [n for n in view.namespaces if isinstance(n, dict)]
    if namespace:
        reported = [n for n in reported if n.get("namespace") == namespace.lower()]
    if not reported:
        if namespace:
            raise ConfigError(f"worker {name} reports no clients looking up namespace "
                              f"{namespace}; its namespaces: "
                              f"{', '.join(str(n.get('namespace')) for n in view.namespaces) or 'none'}")
        raise ConfigError(f"worker {name} reports no namespace yet (its clients have not "
                          "looked anything up); give the signature with --signature")
    chosen = max(reported, key=lambda n: n.get("lookups", 0))
    try:
        ns = bytes.fromhex(str(chosen["namespace"]))
        chunk_tokens = int(chosen["chunk_tokens"])
    except (KeyError, ValueError, TypeError):
        raise ConfigError(f"worker {name} reported a malformed namespace") from None
    if len(ns) != KEY_BYTES or chunk_tokens <= 0:
        raise ConfigError(f"worker {name} reported a malformed namespace")
    return ns, chunk_tokens


def _worker(stats: ClusterStats, name: str) -> WorkerView:
    for view in stats.workers:
        if view.worker_id == name:
            return view
    known = ", ".join(sorted(w.worker_id for w in stats.workers)) or "none"
    raise ConfigError(f"no worker named {name!r} in the cluster (workers: {known})")


def _transport(viewer: WorkerView | None, info: Any) -> str:
    if viewer is None or not isinstance(info, dict):
        return ""
    try:
        peer = PeerInfo(str(info["worker_id"]), str(info["host"]), int(info["data_port"]),
                        str(info.get("host_id", "")),
                        tuple(str(t) for t in info.get("transports", ("tcp",))))
        return choose_transport(viewer.host_id, tuple(viewer.transports), peer)
    except (KeyError, TypeError, ValueError):
        return ""


def explain(controller: _Controller, stats: ClusterStats, namespace: bytes, chunk_tokens: int,
            tokens: list[int], worker: str = "") -> Explanation:
    """Explain ``tokens`` under ``namespace`` as worker ``worker`` would look it up ("" =
    no worker's view). Raises what ``controller.call`` raises."""
    viewer = _worker(stats, worker) if worker else None
    keys = chunk_keys(namespace, tokens, chunk_tokens)
    reply = controller.call("explain", namespace=namespace, keys=keys) if keys else {
        "known": True, "chunks": [], "workers": {}, "departed": {}}
    chunks = reply.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != len(keys):
        raise RemoteError(ErrorCode.BAD_MESSAGE, "the controller's explain reply is malformed")
    infos = reply.get("workers") if isinstance(reply.get("workers"), dict) else {}
    departed = reply.get("departed") if isinstance(reply.get("departed"), dict) else {}
    known = reply.get("known") is True
    rows: list[ChunkExplained] = []
    own: list[str | None] = []  # each chunk's own miss reason (None: available)
    for index, entry in enumerate(chunks):
        holders, how, who = (entry if isinstance(entry, list) and len(entry) == 3
                             else ([], "", ""))
        holders = [printable(h) for h in holders if isinstance(h, str)]
        who = printable(who) if isinstance(who, str) else ""
        row = ChunkExplained(index, index * chunk_tokens, (index + 1) * chunk_tokens, "hit",
                             "", [{"worker": h, "transport": _transport(viewer, infos.get(h))}
                                  for h in holders])
        if viewer is not None and viewer.worker_id in holders:
            row.reason, row.detail = misses.LOCAL, f"held by {viewer.worker_id} itself"
            own.append(None)
        elif holders:
            row.reason = misses.PEER
            row.detail = "held by " + ", ".join(
                f"{h['worker']} (via {h['transport']})" if h["transport"] else h["worker"]
                for h in row.holders)
            own.append(None)
        else:
            row.result = "miss"
            if not known:
                row.reason = misses.UNKNOWN_NAMESPACE
            elif how == "gone":
                state = departed.get(who, "gone")
                row.reason = misses.HOLDER_GONE
                row.detail = f"its last holder {who} {'died' if state == 'dead' else 'left'}" \
                    if state in ("dead", "left") else f"its last holder {who} is gone"
            elif how == "evicted":
                row.reason = misses.EVICTED
                row.detail = "evicted here" if viewer is not None and who == viewer.worker_id \
                    else f"evicted by {who}"
            else:
                row.reason = misses.NEW_PREFIX
            own.append(row.reason)
        rows.append(row)
    stop_at = next((i for i, reason in enumerate(own) if reason is not None), len(rows))
    stop: dict[str, Any] = {}
    if stop_at < len(rows):
        first = rows[stop_at]
        stop = {"chunk": stop_at, "reason": first.reason,
                "detail": first.detail or misses.DESCRIPTIONS[first.reason]}
        for row in rows[stop_at:]:
            if row.result == "hit":  # held, but behind the stop: a hit is always a prefix
                row.detail = f"{row.detail}; behind chunk {stop_at}, which is missed"
                row.result, row.reason = "miss", first.reason
    tail = len(tokens) - len(keys) * chunk_tokens
    if tail > 0:
        rows.append(ChunkExplained(len(keys), len(keys) * chunk_tokens, len(tokens), "miss",
                                   misses.PARTIAL_CHUNK,
                                   detail=f"{tail} tokens, fewer than a chunk of {chunk_tokens}"))
        if not stop:
            stop = {"chunk": len(keys), "reason": misses.PARTIAL_CHUNK,
                    "detail": misses.DESCRIPTIONS[misses.PARTIAL_CHUNK]}
    hit = rows[:stop_at]
    local = sum(1 for r in hit if r.reason == misses.LOCAL)
    return Explanation(namespace.hex(), chunk_tokens, len(tokens), worker, stop_at,
                       stop_at * chunk_tokens, local, len(hit) - local, stop, rows)


def render(explanation: Explanation) -> str:
    """The text ``lmshare explain`` prints: one line per run of chunks alike, then the
    verdict."""
    e = explanation
    lines = [f"namespace {e.namespace}, {e.chunk_tokens} tokens per chunk, {e.tokens} prompt "
             f"tokens" + (f", as worker {e.worker} looks it up" if e.worker else "")]
    runs: list[list[ChunkExplained]] = []
    for row in e.chunks:
        if runs and (runs[-1][-1].reason, runs[-1][-1].detail) == (row.reason, row.detail):
            runs[-1].append(row)
        else:
            runs.append([row])
    for run in runs:
        first, last = run[0], run[-1]
        label = f"chunk {first.index}" if len(run) == 1 else f"chunks {first.index}-{last.index}"
        what = first.reason if first.result == "hit" else f"MISS {first.reason}"
        lines.append(f"  {label:<14} tokens {first.first_token}-{last.end_token - 1:<10} "
                     f"{what}" + (f": {first.detail}" if first.detail else ""))
    held = f"{e.hit_chunks} chunks ({e.hit_tokens} tokens)"
    if e.worker:
        held += f": {e.local_chunks} local + {e.peer_chunks} from peers"
    if e.stop:
        lines.append(f"prefix held: {held}; it stops at chunk {e.stop['chunk']}: "
                     f"{e.stop['reason']} ({e.stop['detail']})")
    else:
        lines.append(f"prefix held: {held}: the whole prompt")
    return "\n".join(lines)
