"""Coverage-guided fuzzing of every decoder of network input, with atheris (libFuzzer) driving
the same strategies and checks as the property tests beside this file.

    python tests/fuzz/coverage_fuzz.py [--runs N] [TARGET ...]

Runs N inputs (default 100,000) per target, each through the target's check (a crash, an
``internal`` error or a hang past the per-input timeout fails the run), and prints the inputs
run. A failing input is written to LMSHARE_FUZZ_ARTIFACTS (default: the current directory) as
TARGET-crash-HASH; libFuzzer's output of a failed target is printed. Exit status 0 only when every target passed. ``make fuzz``
runs it; it is not part of ``make test`` (minutes per target).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("test_fuzz_control", "test_fuzz_data_plane", "test_fuzz_local")


def targets() -> dict:
    sys.path.insert(0, str(HERE))
    found = {}
    for name in MODULES:
        found.update(__import__(name).TARGETS)
    return found


def fuzz_one(name: str, runs: int) -> None:
    """In this process: fuzz ``name`` for ``runs`` inputs (atheris exits the process)."""
    import atheris
    from hypothesis import HealthCheck, given, settings

    with atheris.instrument_imports(include=["lmshare", "controller", "worker"]):
        import lmshare.controller.service  # (instrumented for coverage)
        import lmshare.transports.tcp
        import lmshare.worker.agent  # noqa: F401
    strategy, check, context = targets()[name]
    with context() as subject:
        @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(value) -> None:
            check(subject, value)

        artifacts = os.path.join(os.environ.get("LMSHARE_FUZZ_ARTIFACTS", "."), f"{name}-")
        atheris.Setup([sys.argv[0], f"-runs={runs}", "-timeout=10", "-rss_limit_mb=4096",
                       "-print_final_stats=1", f"-artifact_prefix={artifacts}"], one.hypothesis.fuzz_one_input)
        atheris.Fuzz()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's target
    parser.add_argument("targets", nargs="*", help="default: all")
    args = parser.parse_args(argv)
    if args.one:
        fuzz_one(args.one, args.runs)
        return 0
    known = targets()
    chosen = args.targets or list(known)
    unknown = [t for t in chosen if t not in known]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {sorted(known)}")
    failed = []
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix="lmshare-fuzz-") as scratch:
            env = dict(os.environ, LMSHARE_SHM_DIR=scratch,
                       LMSHARE_RUNTIME_DIR=os.path.join(scratch, "run"))
            started = time.monotonic()
            done = subprocess.run([sys.executable, __file__, "--runs", str(args.runs),
                                   "--one", name], env=env, capture_output=True, text=True)
            seconds = time.monotonic() - started
        stats = [line for line in done.stderr.splitlines()
                 if line.startswith(("stat::number_of_executed_units", "stat::peak_rss_mb"))
                 or " DONE " in line]
        status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        print(f"{name}: {status} in {seconds:.0f} s; " + "; ".join(stats), flush=True)
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-4000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
