import dataclasses
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshare.errors import ConfigError
from lmshare.keys import KEY_BYTES, ModelSignature, chunk_keys, signature_keys

tokens = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)
SIG = ModelSignature(model="llama", chunk_tokens=8)


def longest_prefix_hit(stored: list[bytes], asked: list[bytes]) -> int:
    """A lookup as the index does it: walk the chain, stop at the first miss."""
    present = set(stored)
    count = 0
    for key in asked:
        if key not in present:
            break
        count += 1
    return count


@given(tokens, tokens)
def test_a_hit_is_always_a_shared_prefix(stored_tokens, asked_tokens):
    stored = signature_keys(SIG, stored_tokens)
    asked = signature_keys(SIG, asked_tokens)
    hit = longest_prefix_hit(stored, asked)
    # the hit covers exactly the full chunks on which both token lists agree
    common = 0
    while (common < min(len(stored_tokens), len(asked_tokens))
           and stored_tokens[common] == asked_tokens[common]):
        common += 1
    assert hit == common // SIG.chunk_tokens
    assert asked_tokens[: hit * 8] == stored_tokens[: hit * 8]


@given(tokens)
def test_keys_are_16_bytes_one_per_full_chunk(toks):
    keys = signature_keys(SIG, toks)
    assert len(keys) == len(toks) // SIG.chunk_tokens
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == len(keys)


def _changed(field: dataclasses.Field):
    value = getattr(SIG, field.name)
    if field.name == "tp_rank":
        return {"tp_size": 2, "tp_rank": 1}
    if isinstance(value, int):
        return {field.name: value * 2 if field.name == "chunk_tokens" else value + 1}
    return {field.name: value + "-other"}


@pytest.mark.parametrize("field", dataclasses.fields(ModelSignature), ids=lambda f: f.name)
def test_any_signature_field_change_gives_no_hit(field):
    toks = list(range(64))
    other = dataclasses.replace(SIG, **_changed(field))
    assert other.namespace() != SIG.namespace()
    stored = signature_keys(SIG, toks)
    assert longest_prefix_hit(stored, signature_keys(other, toks)) == 0


@settings(max_examples=50)
@given(st.text(min_size=1, max_size=20), st.text(max_size=20))
def test_equal_signatures_share_namespace(model, tenant):
    assert ModelSignature(model=model, tenant=tenant).namespace() == \
        ModelSignature(model=model, tenant=tenant).namespace()


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    code = ("from lmshare.keys import ModelSignature, signature_keys;"
            "print(signature_keys(ModelSignature(model='m', chunk_tokens=4), list(range(40)))[-1].hex())")
    outputs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outputs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert len(outputs) == 1


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="model id"):
        ModelSignature(model="")
    with pytest.raises(ConfigError, match="tp_rank"):
        ModelSignature(model="m", tp_size=2, tp_rank=2)
    with pytest.raises(ConfigError, match="token ids"):
        chunk_keys(SIG.namespace(), [-1] * 8, 8)
    with pytest.raises(ConfigError, match="unknown model signature fields"):
        ModelSignature.from_dict({"model": "m", "colour": "red"})
