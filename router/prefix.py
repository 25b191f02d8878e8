"""Which backend's worker holds how much of a prompt: one controller lookup per request, under
a deadline; and each backend's KV namespace, learned from what its worker reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmshare.errors import ControllerUnavailable, LMShareError, RemoteError
from lmshare.keys import KEY_BYTES, chunk_keys
from lmshare.protocol import ErrorCode
from lmshare.router.backends import Backend
from lmshare.router.controller_link import AsyncShardLinks

log = logging.getLogger(__name__)

MAX_LOOKUP_CHUNKS = 4096
MAX_STATS_PAGES = 16


@dataclass
class PrefixAnswer:
    """Leading chunks of the prompt each worker holds (by backend name), or why unknown."""

    held_chunks: dict[str, int]
    chunk_tokens: int
    error: str = ""  # a policy reason (policy.LOOKUP_TIMEOUT, ...) when the lookup failed
    seconds: float = 0.0


def held_by_worker(holders: Sequence[object]) -> dict[str, int]:
    """From a lookup reply's ``holders`` (per chunk, the workers holding it): how many leading
    chunks each worker holds."""
    held: dict[str, int] = {}
    alive: set[str] | None = None
    for index, chunk in enumerate(holders):
        names = {w for w in chunk if isinstance(w, str)} if isinstance(chunk, (list, tuple)) \
            else set()
        alive = names if alive is None else alive & names
        if not alive:
            break
        for name in alive:
            held[name] = index + 1
    return held


async def lookup_prefix(link: AsyncShardLinks, backends: Sequence[Backend],
                        tokens: Sequence[int], timeout_s: float) -> PrefixAnswer:
    """Ask the controller once who holds the prompt's leading chunks (the candidates' namespace);
    never waits longer than ``timeout_s``."""
    from lmshare.router import policy

    signed = [b for b in backends if b.namespace and b.chunk_tokens]
    if not signed:
        return PrefixAnswer({}, 0, policy.NO_SIGNATURE)
    # Backends behind one model share one namespace; with several, the most common one.
    counts: dict[tuple[bytes, int], int] = {}
    for b in signed:
        counts[(b.namespace, b.chunk_tokens)] = counts.get((b.namespace, b.chunk_tokens), 0) + 1
    namespace, chunk_tokens = max(counts, key=counts.__getitem__)
    # vLLM computes at least the prompt's last token: only chunks before it can be hits.
    keys = chunk_keys(namespace, tokens[: max(0, len(tokens) - 1)], chunk_tokens)
    keys = keys[:MAX_LOOKUP_CHUNKS]
    if not keys:
        return PrefixAnswer({}, chunk_tokens, policy.SHORT)
    started = time.perf_counter()
    try:
        reply = await link.lookup(timeout_s, namespace, keys)
    except ControllerUnavailable as exc:
        log.debug("prefix lookup: %s", exc)
        return PrefixAnswer({}, chunk_tokens, policy.LOOKUP_TIMEOUT,
                            time.perf_counter() - started)
    except RemoteError as exc:
        seconds = time.perf_counter() - started
        if exc.code == ErrorCode.UNKNOWN_NAMESPACE:  # nothing stored under it yet: a miss
            return PrefixAnswer({}, chunk_tokens, "", seconds)
        log.warning("prefix lookup refused: %s", exc)
        return PrefixAnswer({}, chunk_tokens, policy.LOOKUP_ERROR, seconds)
    seconds = time.perf_counter() - started
    holders = reply.get("holders")
    held = held_by_worker(holders if isinstance(holders, list) else [])
    names = {b.spec.worker: b.name for b in signed
             if (b.namespace, b.chunk_tokens) == (namespace, chunk_tokens)}
    return PrefixAnswer({names[w]: n for w, n in held.items() if w in names}, chunk_tokens, "",
                        seconds)


def _namespace_of(view: dict) -> tuple[bytes, int] | None:
    """The namespace a worker's clients used most, from its ``namespaces`` report (hostile
    input: checked)."""
    best: tuple[int, bytes, int] | None = None
    for entry in view.get("namespaces") or []:
        if not isinstance(entry, dict):
            continue
        try:
            namespace = bytes.fromhex(str(entry.get("namespace", "")))
            chunk_tokens = int(entry.get("chunk_tokens", 0))
            uses = int(entry.get("lookups", 0))
        except (TypeError, ValueError):
            continue
        if len(namespace) != KEY_BYTES or not 0 < chunk_tokens <= 1 << 20:
            continue
        if best is None or uses > best[0]:
            best = (uses, namespace, chunk_tokens)
    return (best[1], best[2]) if best is not None else None


async def refresh_signatures(link: AsyncShardLinks, backends: Sequence[Backend],
                             timeout_s: float) -> bool:
    """Read each backend's KV namespace from its worker's report in the controller's stats.
    False when the controller did not answer (the namespaces known so far are kept)."""
    views: dict = {}
    for _ in range(MAX_STATS_PAGES):  # the controller pages its worker list
        try:
            reply = await link.call("stats", timeout_s, offset=len(views))
        except LMShareError as exc:
            log.debug("signature refresh: %s", exc)
            return False
        stats = reply.get("stats")
        workers = stats.get("workers") if isinstance(stats, dict) else None
        if not isinstance(workers, list) or not workers:
            break
        views.update((w.get("worker_id"), w) for w in workers if isinstance(w, dict))
        total = stats.get("workers_total")
        if not isinstance(total, int) or len(views) >= total:
            break
    for backend in backends:
        view = views.get(backend.spec.worker)
        if view is None or view.get("state") not in ("alive", "suspect"):
            continue
        found = _namespace_of(view)
        if found is not None and found != (backend.namespace, backend.chunk_tokens):
            log.info("backend %s: KV namespace %s, %d tokens a chunk (from worker %s)",
                     backend.name, found[0].hex()[:12], found[1], backend.spec.worker)
            backend.namespace, backend.chunk_tokens = found
    return True
