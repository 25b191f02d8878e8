"""Shared helpers: machine description, timing statistics, Markdown tables, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def command_line(doc: str | None, argv: list[str], **options: int) -> dict[str, int]:
    """A benchmark's own command line: ``--help`` says what it measures (the first paragraph
    of ``doc``) and runs nothing; ``options`` are integer options with their defaults."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    for name, default in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    return vars(parser.parse_args(argv))


def header(command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without the history
        commit = os.environ.get("LMSHARE_COMMIT", "unknown")
    return f"Machine: {machine()}  \nDate: {date}, commit {commit}  \nCommand: `{command}`\n"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, data: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def progress(iterable, description: str, total: int | None = None):
    """A rich progress bar on a terminal; plain iteration otherwise."""
    if not sys.stderr.isatty():
        yield from iterable
        return
    from rich.progress import track

    yield from track(iterable, description=description, total=total, transient=True)
