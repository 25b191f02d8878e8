"""The connector's settings are described in one place, README.md's table: every setting of
``ConnectorSettings`` has its row there, and every default the table states is the code's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from lmshare.integrations.vllm.settings import ConnectorSettings

README = Path(__file__).resolve().parents[1] / "README.md"
# defaults the table states in words: what the code holds for them
IN_WORDS = {"$LMSHARE_WORKER": "", "—": "", '""': ""}


def _table() -> dict[str, str]:
    """key → stated default, from the README's table of ``kv_connector_extra_config`` keys."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("`kv_connector_extra_config` keys, with defaults"))
    rows: dict[str, str] = {}
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("key", "---") or set(cells[0]) <= {"-"}:
            continue
        keys = [k.strip().strip("`") for k in cells[0].split("/")]
        defaults = [d.strip().strip("`") if d.strip() != "`\"\"`" else '""'
                    for d in cells[1].split("/")]
        assert len(keys) == len(defaults), line
        rows.update(zip(keys, defaults))
    return rows


def _stated(default: str, kind: type) -> object:
    if default in IN_WORDS:
        return IN_WORDS[default]
    if kind is bool:
        return {"true": True, "false": False}[default]
    return kind(default)


def test_the_readme_table_holds_every_setting_with_the_codes_default():
    table = _table()
    fields = {f.name: f.default for f in dataclasses.fields(ConnectorSettings)}
    assert set(table) == set(fields), (set(table) ^ set(fields))
    for name, default in fields.items():
        assert _stated(table[name], type(default)) == default, (name, table[name], default)
