"""Pure rendering: one :class:`~lmshare.stats.ClusterStats` (plus view state) → one rich frame.

No I/O here, so a frame can be tested (and exported as a picture) from a known ClusterStats.
The frame fits ``width`` × ``height``: with more workers than rows it pages, sorted by
``ViewState.sort``.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from lmshare.stats import ClusterEvent, ClusterStats, RouterStats, WorkerView
from lmshare.status_view import mismatch_line, shard_line, tenant_name
from lmshare.units import format_size

SORTS = ("state", "name", "used", "chunks", "peer", "served")
SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"alive": "green", "draining": "cyan", "suspect": "yellow", "dead": "red",
               "left": "dim"}
EVENT_STYLE = {"join": "green", "leave": "cyan", "dead": "bold red", "restart": "magenta",
               "refused": "yellow", "resync": "blue"}
_STATE_ORDER = {"dead": 0, "suspect": 1, "alive": 2, "left": 3}
# why chunks were missed: grey for what is expected (new documents, prompt tails), red for
# what an operator can fix
MISS_STYLE = {"new_prefix": "grey62", "partial_chunk": "grey62", "recompute_faster": "cyan",
              "peers_off": "grey62"}
TALL = 40  # from this height on, the hit history gets one sparkline per kind


@dataclass
class ViewState:
    """What the frame shows besides the stats: set by the app (keys, connection state)."""

    controller: str = ""
    sort: str = "state"
    page: int = 0
    error: str | None = None  # why the last poll failed (controller unreachable)
    error_for_s: float = 0.0  # how long the controller has been unreachable
    footer: str = ""  # an extra status line (the demo's workload numbers)
    keys_help: bool = True
    router: str = ""  # a router's URL (``--router``): its panel is shown
    router_stats: RouterStats | None = None
    router_error: str | None = None


# ---------------------------------------------------------------------- formatting helpers
def format_duration(seconds: float) -> str:
    """``59s``, ``2m05s``, ``3h07m``, ``2d04h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short_size(nbytes: float) -> str:
    """Four-ish characters: ``0``, ``512``, ``12K``, ``3.4M``, ``1.2G``."""
    value = float(nbytes)
    if value < 1:
        return "0"
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.1f}{unit}" if value < 10 and unit else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def bar(fraction: float, width: int, style: str = "dodger_blue2") -> Text:
    """A horizontal bar. One colour: a full cache is normal (LRU evicts), not an alarm."""
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    return Text.assemble(("█" * full, style), ("░" * (width - full), "grey37"))


def sparkline(values: list[float], width: int, top: float | None = None) -> str:
    """The last ``width`` values as block characters, scaled to ``top`` (default: the max)."""
    values = values[-width:] if width > 0 else []
    if not values:
        return ""
    top = top if top is not None else max(values)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def percent(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "–"


def worker_hit_fractions(w: WorkerView) -> tuple[float, float, float]:
    """(local, peer, miss) fractions of the chunks this worker was asked for, since it started."""
    c = w.counters
    total = c.local_hit_chunks + c.peer_hit_chunks + c.miss_chunks
    if not total:
        return (0.0, 0.0, 0.0)
    return (c.local_hit_chunks / total, c.peer_hit_chunks / total, c.miss_chunks / total)


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts ``worker-2`` before ``worker-10``."""
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"(\d+)", name) if part]


def sort_workers(workers: list[WorkerView], key: str) -> list[WorkerView]:
    """Workers in display order: ``state`` puts dead and suspect first, the rest are by size."""
    by_name = sorted(workers, key=lambda w: _natural(w.worker_id))
    if key == "state":
        return sorted(by_name, key=lambda w: _STATE_ORDER.get(w.state, 9))
    if key == "used":
        return sorted(by_name, key=lambda w: -w.counters.used_bytes)
    if key == "chunks":
        return sorted(by_name, key=lambda w: -w.chunks_indexed)
    if key == "peer":
        return sorted(by_name, key=lambda w: -worker_hit_fractions(w)[1])
    if key == "served":
        return sorted(by_name, key=lambda w: -w.served_bytes_per_s)
    return by_name


# ---------------------------------------------------------------------- layout budget
@dataclass(frozen=True)
class Budget:
    """How many worker rows and event lines fit (``None`` height: everything)."""

    worker_rows: int
    event_rows: int
    pages: int


def budget(stats: ClusterStats | None, height: int | None, state: ViewState) -> Budget:
    workers = len(stats.workers) if stats else 0
    events = len(stats.events) if stats else 0
    if height is None:
        return Budget(max(1, workers), min(events, 10), 1)
    hits = 6 if height >= TALL else 3
    fixed = 1 + 2 + hits + 2 + 1 + 1 + (1 if state.footer else 0)  # title..footer
    fixed += router_lines(state)
    fixed += mismatch_lines(stats)
    fixed += shard_lines(stats)
    fixed += tenant_lines(stats)
    remaining = max(2, height - fixed)
    want_events = min(events, 20 if height >= TALL else 10)
    reserve = min(want_events, 3)
    rows = max(1, min(workers, remaining - reserve)) if workers else 1
    event_rows = max(0, min(want_events, remaining - rows))
    pages = max(1, -(-workers // rows)) if workers else 1
    return Budget(rows, event_rows, pages)


# ---------------------------------------------------------------------- sections
def _line(text: Text, width: int) -> Text:
    """One screen line: never wraps (the layout budget counts lines)."""
    text.no_wrap = True
    text.truncate(width, overflow="ellipsis")
    return text


def _title(stats: ClusterStats | None, width: int, state: ViewState) -> Text:
    where = state.controller or "controller"
    if state.error is not None:
        text = Text(f" lmshare · {where} UNREACHABLE for {format_duration(state.error_for_s)}"
                    f" · retrying · {'showing last data' if stats else 'no data yet'} ",
                    style="bold white on red")
        return _line(text, width)
    if stats is None:
        return _line(Text(f" lmshare · connecting to controller {where} … ",
                          style="bold black on yellow"), width)
    left = f" lmshare · controller {where} · up {format_duration(stats.uptime_s)}"
    left += f" · epoch {stats.controller_epoch}"
    if width >= 100:
        left += f" · id {stats.controller_id}"
    clock = time.strftime("%H:%M:%S ")
    pad = max(1, width - len(left) - len(clock))
    return _line(Text(left + " " * pad + clock, style="bold white on dark_blue"), width)


def _summary(stats: ClusterStats, width: int) -> list[Text]:
    alive, suspect, dead = stats.count("alive"), stats.count("suspect"), stats.count("dead")
    workers = Text.assemble(
        ("workers ", "bold"), (f"{alive} alive", "green"), " · ",
        (f"{suspect} suspect", "yellow" if suspect else "dim"), " · ",
        (f"{dead} dead", "bold red" if dead else "dim"), "   ",
        ("chunks ", "bold"), f"{stats.chunks_indexed:,} indexed · ",
        f"{stats.multi_holder_chunks:,} on >1 worker")
    if width >= 100:
        workers.append(f" · {stats.namespaces} namespace{'s' * (stats.namespaces != 1)}")
    cached, capacity = stats.bytes_cached, stats.capacity_bytes
    fraction = cached / capacity if capacity else 0.0
    tail = f" {format_size(cached)} of {format_size(capacity)} ({fraction:.0%})"
    cache = Text.assemble(("cache   ", "bold"),
                          bar(fraction, max(10, min(50, width - 8 - len(tail) - 2))), tail)
    return [_line(workers, width), _line(cache, width)]


def _hits(stats: ClusterStats, width: int, tall: bool) -> list[Text]:
    local, peer, miss = stats.hit_rates()
    history = stats.hit_history
    window = len(history)
    head = Text.assemble(
        (f"hits {window}s ", "bold"), ("local ", "green"), (f"{local:.0%}", "bold green"), " · ",
        ("peer ", "cyan"), (f"{peer:.0%}", "bold cyan"), " · ", ("miss ", "red"),
        (f"{miss:.0%}", "bold red"), "   ", ("lookup ", "bold"),
        f"p50 {stats.lookup_p50_us:,.0f}µs p99 {stats.lookup_p99_us:,.0f}µs",
        f" · {stats.lookups:,} lookups")
    if stats.refused_messages:
        head.append(f" · {stats.refused_messages} refused", style="yellow")
    refused_connections = sum(stats.refused_connections.values()) + sum(
        w.counters.refused_connections for w in stats.workers)
    if refused_connections:
        head.append(f" · {refused_connections} unauthenticated connections refused",
                    style="red")
    spark_width = max(10, width - 16)
    ratio = [((h[0] + h[1]) / sum(h)) if sum(h) else 0.0 for h in history]
    now = f" {ratio[-1]:.0%}" if ratio else ""
    lines = [_line(head, width), _line(_miss_reasons(stats, window), width),
             Text.assemble(("hit%  ", "bold"),
                           (sparkline(ratio, spark_width - len(now), top=1.0), "green"), now)]
    if tall:
        top = max((max(h) for h in history), default=0)
        for index, (name, style) in enumerate((("local", "green"), ("peer", "cyan"),
                                               ("miss", "red"))):
            series = [float(h[index]) for h in history]
            rate = f" {series[-1]:.0f}/s" if series else ""
            lines.append(Text.assemble((f"{name:<6}", style),
                                       (sparkline(series, spark_width - 7, top=top), style),
                                       rate))
    return lines


def _miss_reasons(stats: ClusterStats, window: int) -> Text:
    """``missed 60s  new_prefix 61% · evicted 30% · holder_gone 9%``: why the window's missed
    chunks were missed, most first (docs/operations.md says what to do about each)."""
    reasons = {r: n for r, n in stats.miss_reasons.items() if n > 0}
    line = Text.assemble((f"missed {window}s ", "bold"))
    total = sum(reasons.values())
    if not total:
        line.append("nothing", style="dim")
        return line
    for index, (reason, count) in enumerate(sorted(reasons.items(), key=lambda i: -i[1])):
        if index:
            line.append(" · ")
        line.append(f"{reason} ", style=MISS_STYLE.get(reason, "red"))
        line.append(percent(count, total), style="bold")
    return line


MAX_ROUTER_BACKENDS = 8
MAX_MISMATCH_LINES = 3


def mismatch_lines(stats: ClusterStats | None) -> int:
    """Lines of the signature-mismatch section (0 when there is none)."""
    shown = min(len(stats.mismatches), MAX_MISMATCH_LINES) if stats else 0
    return shown + 1 if shown else 0


def _mismatch_panel(stats: ClusterStats, width: int) -> list[RenderableType]:
    count = len(stats.mismatches)
    parts: list[RenderableType] = [Rule(
        f"signature mismatches: {count} namespace{'s' * (count != 1)} shared with no other "
        "worker", style="yellow", align="left")]
    parts.extend(_line(mismatch_line(m), width) for m in stats.mismatches[:MAX_MISMATCH_LINES])
    return parts


MAX_SHARD_LINES = 8


def shard_lines(stats: ClusterStats | None) -> int:
    """Lines of the controller shards' section (0 without shards)."""
    count = len(stats.shards) if stats else 0
    return min(count, MAX_SHARD_LINES) + (count > MAX_SHARD_LINES)


def _shard_panel(stats: ClusterStats, width: int) -> list[RenderableType]:
    """A line per controller shard: its part of the index, or that it does not answer."""
    parts: list[RenderableType] = [_line(shard_line(view), width)
                                   for view in stats.shards[:MAX_SHARD_LINES]]
    hidden = stats.shards[MAX_SHARD_LINES:]
    if hidden:
        down = sum(1 for view in hidden if view.error)
        chunks = sum(view.chunks_indexed for view in hidden)
        parts.append(_line(Text(f"… {len(hidden)} more shards, {chunks:,} chunks"
                                + (f", {down} unreachable" if down else ""),
                                style="red" if down else "dim"), width))
    return parts


MAX_TENANT_LINES = 6


def tenant_lines(stats: ClusterStats | None) -> int:
    """Lines of the tenants' section (0 when no tenant has figures)."""
    named = [t for t in stats.tenants if t.tenant] if stats else []
    return min(len(stats.tenants), MAX_TENANT_LINES) + 1 if named else 0


def _tenant_panel(stats: ClusterStats, width: int) -> list[RenderableType]:
    """Per tenant (every tenant for the operator's key; a tenant's own for its credential):
    what it holds against its quota, its acquires' hit rate, what its limits cost it."""
    count = len(stats.tenants)
    parts: list[RenderableType] = [Rule(f"tenants: {count}", style="grey37", align="left")]
    for t in stats.tenants[:MAX_TENANT_LINES]:
        asked = t.hit_chunks + t.miss_chunks
        quota = f"/{short_size(t.quota_bytes)}" if t.quota_bytes else ""
        ttl = f" ttl {format_duration(t.ttl_s)}" if t.ttl_s else ""
        parts.append(_line(Text.assemble(
            (f"{tenant_name(t.tenant):<12} ", "bold"),
            f"{t.workers}w {t.entries} ch {short_size(t.used_bytes)}{quota}{ttl} · "
            f"hit {percent(t.hit_chunks, asked)} of {asked} · evicted {t.quota_evictions} "
            f"refused {t.quota_refusals} expired {t.expired}"), width))
    return parts


def router_lines(state: ViewState) -> int:
    """Lines of the router panel (0 without ``--router``)."""
    if not state.router:
        return 0
    backends = len(state.router_stats.backends) if state.router_stats else 0
    return 2 + min(backends, MAX_ROUTER_BACKENDS)


def _router_panel(state: ViewState, width: int) -> list[RenderableType]:
    r = state.router_stats
    title = f"router {state.router}" + (f" · {r.policy}" if r else "")
    lines: list[RenderableType] = [Rule(title, style="grey37", align="left")]
    if state.router_error is not None or r is None:
        lines.append(_line(Text(f"router unreachable: {state.router_error or 'no data yet'}",
                                style="yellow"), width))
        return lines
    decided = sum(r.decisions.values())
    head = Text.assemble(("requests ", "bold"), f"{r.requests:,}")
    for reason, count in sorted(r.decisions.items(), key=lambda item: -item[1]):
        style = {"hit": "green", "overloaded": "cyan", "miss": "red"}.get(reason, "")
        head.append(" · ")
        head.append(f"{reason} {percent(count, decided)}", style=style)
    if r.retries:
        head.append(f" · {r.retries} retried", style="yellow")
    if r.lookups:
        head.append(f" · lookup {r.lookup_mean_ms:.2f}ms")
    if r.prompt_tokens:
        head.append(f" · {percent(r.held_tokens, r.prompt_tokens)} of prompt tokens cached "
                    "where sent")
    lines.append(_line(head, width))
    for b in r.backends[:MAX_ROUTER_BACKENDS]:
        state_text = ("up", "green") if b.up else (f"DOWN {b.reason}", "bold red")
        line = Text.assemble(f"  {b.name:<12} ", (f"{state_text[0]:<5}", state_text[1]),
                             f" in flight {b.in_flight:>3} ({short_size(b.in_flight_tokens)} tok)"
                             f" · {b.requests:,} requests · {b.failures} failures")
        if not b.chunk_tokens and r.policy.startswith("prefix"):
            line.append(" · namespace not known yet", style="yellow")
        lines.append(_line(line, width))
    return lines


#: Optional worker-table columns, dropped in this order until the table fits the width.
OPTIONAL_COLUMNS = (("address", "transports", "via", "bytes"), ("address", "transports", "via"),
                    ("address", "via"), ("address",), ())
_MEASURE = Console(width=1000, file=io.StringIO(), color_system=None)


def _worker_table(stats: ClusterStats, width: int, rows: int, page: int) -> Table:
    """The page of workers, with as many optional columns as fit in ``width``."""
    workers = stats.workers[page * rows:(page + 1) * rows]
    for optional in OPTIONAL_COLUMNS:
        table = _build_table(workers, set(optional))
        if _MEASURE.measure(table).maximum <= width:
            return table
    return table  # the narrowest: rich squeezes the name column


def _build_table(workers: list[WorkerView], optional: set[str]) -> Table:
    full = "bytes" in optional
    table = Table(box=None, padding=(0, 1), pad_edge=False, expand=False, header_style="bold",
                  show_edge=False)
    table.add_column("worker", no_wrap=True, overflow="ellipsis",
                     max_width=20 if "address" in optional else 12)
    if "address" in optional:
        table.add_column("address", no_wrap=True, overflow="ellipsis", max_width=22)
    if "transports" in optional:
        table.add_column("transports" if full else "transp", no_wrap=True, overflow="ellipsis",
                         max_width=12)
    if "via" in optional:
        table.add_column("to peers via" if full else "via", no_wrap=True, overflow="ellipsis",
                         max_width=16)
    table.add_column("state", no_wrap=True)
    table.add_column("heartbeat" if full else "hb", justify="right", no_wrap=True)
    table.add_column("used / capacity" if full else "used", no_wrap=True)
    table.add_column("chunks", justify="right", no_wrap=True)
    table.add_column("local hit" if full else "loc%", justify="right", no_wrap=True)
    table.add_column("peer hit" if full else "peer%", justify="right", no_wrap=True)
    table.add_column("served/s" if full else "srv/s", justify="right", no_wrap=True)
    table.add_column("fetched/s" if full else "fch/s", justify="right", no_wrap=True)
    table.add_column("in-flight" if full else "infl", justify="right", no_wrap=True)
    for w in workers:
        c = w.counters
        gone = w.state in ("dead", "left")
        fraction = c.used_bytes / c.capacity_bytes if c.capacity_bytes else 0.0
        used = Text.assemble(bar(fraction, 10 if full else 5), f" {fraction:4.0%}")
        if full:
            used.append(f" {short_size(c.used_bytes)}/{short_size(c.capacity_bytes)}")
        local, peer, _ = worker_hit_fractions(w)
        asked = c.local_hit_chunks + c.peer_hit_chunks + c.miss_chunks
        cells: list[Text | str] = [Text(w.worker_id, style="bold" if not gone else "dim")]
        if "address" in optional:  # Text, not str: names are never read as markup
            cells.append(Text(w.address))
        if "transports" in optional:
            cells.append(Text(",".join(w.transports)))
        if "via" in optional:
            via = getattr(w, "peer_transports", None) or {}
            cells.append(Text(" ".join(f"{t}×{n}" for t, n in sorted(via.items())) or "–"))
        cells += [
            Text(w.shown_state, style=STATE_STYLE.get(w.shown_state, "")),
            Text(f"{w.heartbeat_age_s:.1f}s",
                 style="yellow" if w.state == "suspect" else "dim" if gone else ""),
            used, f"{w.chunks_indexed:,}",
            f"{local:.0%}" if asked else "–", f"{peer:.0%}" if asked else "–",
            short_size(w.served_bytes_per_s), short_size(w.fetched_bytes_per_s),
            str(c.in_flight_fetches),
        ]
        table.add_row(*cells, style="dim" if gone else None)
    return table


def _event_line(event: ClusterEvent, width: int) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    line = Text.assemble((stamp, "dim"), " ", (f"{event.kind:<7}", EVENT_STYLE.get(event.kind, "")),
                         " ", event.detail)
    return _line(line, width)


def _footer(state: ViewState, pages: int, page: int, width: int) -> list[Text]:
    lines = []
    if state.keys_help:
        keys = Text.assemble(("q", "bold reverse"), " quit  ", ("s", "bold reverse"),
                             f" sort ({state.sort})  ", ("n/p", "bold reverse"),
                             f" page {page + 1}/{pages}", style="dim")
        lines.append(_line(keys, width))
    if state.footer:
        lines.append(_line(Text(state.footer, style="italic"), width))
    return lines


# ---------------------------------------------------------------------- the frame
def render(stats: ClusterStats | None, width: int, height: int | None,
           state: ViewState | None = None) -> RenderableType:
    """The whole dashboard for a terminal of ``width`` × ``height`` (``None``: no limit)."""
    state = state or ViewState()
    parts: list[RenderableType] = [_title(stats, width, state)]
    if stats is None:
        parts.append(Text(f"\nwaiting for the controller at {state.controller}"
                          + (f": {state.error}" if state.error else " …"), style="yellow"))
        parts.extend(_footer(state, 1, 0, width))
        return Group(*parts)
    fit = budget(stats, height, state)
    page = min(max(0, state.page), fit.pages - 1)
    parts.extend(_summary(stats, width))
    if stats.shards:
        parts.extend(_shard_panel(stats, width))
    parts.extend(_hits(stats, width, tall=height is not None and height >= TALL))
    if state.router:
        parts.extend(_router_panel(state, width))
    if stats.mismatches:
        parts.extend(_mismatch_panel(stats, width))
    if tenant_lines(stats):
        parts.extend(_tenant_panel(stats, width))
    ordered = dataclasses.replace(stats, workers=sort_workers(stats.workers, state.sort))
    shown = len(ordered.workers[page * fit.worker_rows:(page + 1) * fit.worker_rows])
    first = page * fit.worker_rows + 1
    title = (f"workers {first}–{first + shown - 1} of {len(stats.workers)} · sorted by {state.sort}"
             if shown else "no workers registered")
    parts.append(Rule(title, style="grey37", align="left"))
    parts.append(_worker_table(ordered, width, fit.worker_rows, page))
    if fit.event_rows:
        parts.append(Rule("recent events", style="grey37", align="left"))
        parts.extend(_event_line(e, width) for e in list(reversed(stats.events))[:fit.event_rows])
    parts.extend(_footer(state, fit.pages, page, width))
    return Group(*parts)
