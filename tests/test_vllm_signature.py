"""The model signature of a vLLM engine comes from its config, and names exactly what changes
the KV bytes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("vllm")  # the signature module lives in the connector package

from lmshare.integrations.kv_copy import KVGeometry  # noqa: E402
from lmshare.integrations.vllm.signature import derive_signature, lora_identity  # noqa: E402
from lmshare.testing.fake_vllm import fake_config  # noqa: E402
from lmshare.testing.tiny_model import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"a": build_tiny_model(root / "a"), "b": build_tiny_model(root / "b", seed=99)}


def config(model, dtype=torch.bfloat16, cache_dtype="auto", tp=1, backend=None):
    from transformers import AutoConfig

    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(model), revision=None, tokenizer=str(model),
                                     tokenizer_revision=None, tokenizer_mode="auto",
                                     dtype=dtype, quantization=None,
                                     hf_config=AutoConfig.from_pretrained(model)),
        cache_config=SimpleNamespace(block_size=32, cache_dtype=cache_dtype),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        attention_config=SimpleNamespace(backend=backend))


def signature(vllm_config, rank=0, device="cpu", chunk=256, kv=None):
    kv = kv or fake_config()
    return derive_signature(vllm_config, kv, KVGeometry.from_kv_cache_config(kv), chunk, rank,
                            device, "0.32.0")


def other_page_layout():
    kv = fake_config()
    kv.kv_cache_layout = "LBNHC"
    return kv


def test_allocation_order_alone_does_not_change_the_namespace(models):
    """Chunk bytes are pages in layer-major order whatever the allocation's strides."""
    a = signature(config(models["a"]), kv=fake_config(layer_outermost=True))
    b = signature(config(models["a"]), kv=fake_config(layer_outermost=False))
    assert a.namespace() == b.namespace()


def test_same_model_same_namespace_even_under_another_path(models, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(models["a"], copy)
    assert signature(config(models["a"])).namespace() == signature(config(copy)).namespace()


def test_everything_that_changes_kv_changes_the_namespace(models):
    base = signature(config(models["a"]))
    variants = [
        signature(config(models["b"])),  # other weights (seed), same architecture
        signature(config(models["a"], dtype=torch.float16)),
        signature(config(models["a"], cache_dtype="fp8")),
        signature(config(models["a"], tp=2)),
        signature(config(models["a"], tp=2), rank=1),
        signature(config(models["a"], backend="FLASH_ATTN")),
        signature(config(models["a"]), device="cuda"),
        signature(config(models["a"]), chunk=512),
        signature(config(models["a"]), kv=other_page_layout()),
        dataclasses.replace(base, lora_adapter="adapter:x"),
        dataclasses.replace(base, tenant="t"),
    ]
    namespaces = {base.namespace()} | {v.namespace() for v in variants}
    assert len(namespaces) == len(variants) + 1


def test_lora_identity(tmp_path):
    assert lora_identity(None) == ""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{\"r\": 8}")
    one = lora_identity(SimpleNamespace(lora_name="x", lora_path=str(adapter)))
    (adapter / "adapter_config.json").write_text("{\"r\": 16}")
    assert lora_identity(SimpleNamespace(lora_name="x", lora_path=str(adapter))) != one


def test_namespace_is_the_same_in_every_process(models):
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r})\n"
            "from test_vllm_signature import config, signature\n"
            f"print(signature(config({str(models['a'])!r})).namespace().hex())\n")
    outputs = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**os.environ, "PYTHONHASHSEED": seed},
                                timeout=120, check=True)
        outputs.add(result.stdout.strip().splitlines()[-1])
    assert outputs == {signature(config(models["a"])).namespace().hex()}
