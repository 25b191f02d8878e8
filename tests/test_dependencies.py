"""Dependencies point one way: the core (``lmshare/*``) imports none of the parts, the parts
(controller, worker, dashboard, router) import the core and never each other; only the
composition root (the CLI, the demo, LocalCluster) may know them, and the CLI knows them all."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("controller", "worker", "dashboard", "router")
COMPOSITION_ROOT = {"lmshare/cli.py", "lmshare/demo.py", "lmshare/local_cluster.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _parts_imported(path: Path) -> set[str]:
    return {name.split(".")[1] for name in _imports(path)
            if name.startswith("lmshare.") and name.split(".")[1] in PARTS}


def test_the_core_imports_no_part_and_the_parts_not_each_other():
    core = [p for p in (ROOT / "lmshare").rglob("*.py")
            if not any(part in PARTS for part in p.relative_to(ROOT / "lmshare").parts[:1])]
    assert len(core) > 20
    for path in core:
        rel = str(path.relative_to(ROOT))
        if rel not in COMPOSITION_ROOT:
            assert not _parts_imported(path), f"{rel} imports {_parts_imported(path)}"
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            others = _parts_imported(path) - {part}
            assert not others, f"{path.relative_to(ROOT)} imports {others}"


def test_the_cli_knows_every_part():
    assert _parts_imported(ROOT / "lmshare" / "cli.py") == set(PARTS)
