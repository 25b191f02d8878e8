"""Regenerate docs/dashboard.png: one dashboard frame of a real ``lmshare demo`` cluster.

    .venv/bin/python docs/make_dashboard_png.py [--seconds 25] [--width 120] [--height 40]

Starts the demo's cluster (controller + 3 workers as processes) and its workload, waits, renders
one frame with rich's recording console, exports SVG and converts it with ``rsvg-convert``
(Debian: librsvg2-bin).
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import threading
import time
from pathlib import Path

from rich.console import Console

from lmshare.dashboard.view import ViewState, render
from lmshare.demo import Workload, _stop_cluster, _wait_for_workers
from lmshare.local_cluster import LocalCluster

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png")
    args = parser.parse_args()
    if shutil.which("rsvg-convert") is None:
        raise SystemExit("rsvg-convert is missing: apt-get install -y librsvg2-bin")

    cluster = LocalCluster(heartbeat_timeout_s=3.0)
    stop = threading.Event()
    clients = {}
    try:
        cluster.start_controller("--heartbeat-interval", "0.5")
        names = [f"worker-{i}" for i in (1, 2, 3)]
        for name in names:
            cluster.start_worker(name, "256MiB", wait=False)
        clients = _wait_for_workers(cluster, names, stop, 30)
        workload = Workload(clients, rate=10).start(stop)
        time.sleep(args.seconds)
        stats = cluster.stats()
        console = Console(record=True, width=args.width, height=args.height,
                          force_terminal=True, color_system="truecolor", file=io.StringIO())
        console.print(render(stats, args.width, args.height,
                             ViewState(controller=cluster.controller_address,
                                       footer=workload.summary())))
        svg = args.out.with_suffix(".svg")
        # rsvg-convert drops leading non-breaking spaces of a text run: use plain spaces and
        # ask for them to be kept, so every run starts in its own cell
        text = console.export_svg(title="lmshare dashboard").replace("&#160;", " ")
        svg.write_text(text.replace("<svg ", '<svg xml:space="preserve" ', 1))
        subprocess.run(["rsvg-convert", "--zoom", "1.5", "-o", str(args.out), str(svg)],
                       check=True, timeout=60)
        svg.unlink()
        print(f"wrote {args.out}")
    finally:
        stop.set()
        for client in clients.values():
            client.close()
        _stop_cluster(cluster)
        shutil.rmtree(cluster.runtime_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
