"""The lmshare :class:`~lmshare.keys.ModelSignature` of a vLLM engine, derived from vLLM's own
configuration (never typed by hand), so that two engines share KV exactly when their KV bytes
are interchangeable.

What goes in, and from where:

* ``model`` — the model id as vLLM was given it; for a local directory ``local-dir`` (paths
  and folder names may differ between hosts; the content fingerprint below names the model).
* ``revision`` — the configured revision, else the Hugging Face cache snapshot (commit) the
  model was loaded from, else a content fingerprint of a local directory (``config.json``,
  weight file names and sizes, and the first and last 64 KiB of every weight file); plus a
  hash of the effective ``hf_config`` (so ``hf_overrides`` count).
* ``tokenizer_hash`` — tokenizer id, revision and mode, plus a hash of the tokenizer files of a
  local directory / cache snapshot.
* ``kv_dtype`` — ``cache_dtype`` (``auto`` resolves to the model dtype) and the KV spec dtype.
* ``kv_layout`` — layers, KV heads (per rank), head sizes, block size, page bytes, the
  resolved KV cache layout, the attention backend setting, the device type, the number of
  regions, and the vLLM version (a new version may change a backend's page layout).
* ``chunk_tokens``, ``rope_scaling`` (``rope_parameters`` / ``rope_scaling``),
  ``quantization``, ``tp_size`` / ``tp_rank``.
* Per request: ``lora_adapter`` (name + fingerprint of the adapter files) and ``tenant``
  (the connector's ``tenant`` setting plus the request's ``cache_salt``).

This module only reads attributes (duck typing): it imports neither vLLM nor torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmshare.keys import ModelSignature

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja")
_SAMPLE = 64 * 1024


def _digest(*parts: Iterable[bytes] | bytes, size: int = 12) -> str:
    h = hashlib.blake2b(digest_size=size, person=b"lmshare-sig-v1")
    for part in parts:
        if isinstance(part, bytes):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        else:
            for item in part:
                h.update(len(item).to_bytes(8, "little"))
                h.update(item)
    return h.hexdigest()


def _file_sample(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SAMPLE)
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
        tail = f.read(_SAMPLE)
    return head + tail


def directory_fingerprint(path: str | os.PathLike[str], tokenizer_only: bool = False) -> str:
    """A cheap content fingerprint of a model (or tokenizer, or LoRA adapter) directory."""
    folder = Path(path)
    parts: list[bytes] = []
    names = _TOKENIZER_FILES if tokenizer_only else ("config.json", "adapter_config.json")
    for name in names:
        file = folder / name
        if file.is_file():
            parts += [name.encode(), file.read_bytes()]
    if not tokenizer_only:
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES):
                parts += [file.name.encode(), str(file.stat().st_size).encode(),
                          _file_sample(file)]
    return _digest(parts)


def _snapshot_dir(repo_id: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed id is just "not cached"
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found).parent
    return None


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def _hf_config_hash(hf_config: Any) -> str:
    if hf_config is None:
        return ""
    try:
        data = hf_config.to_dict()
    except Exception:  # a config object without to_dict
        data = dict(getattr(hf_config, "__dict__", {}))
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "name_or_path"):
        data.pop(volatile, None)
    return _digest(_stable_json(data).encode())


def model_identity(model_config: Any) -> tuple[str, str]:
    """(model, revision) of a vLLM ``ModelConfig``."""
    model = str(model_config.model)
    revision = getattr(model_config, "revision", None) or ""
    if os.path.isdir(model):
        # Content, not path or folder name: the same files elsewhere are the same model.
        fingerprint = directory_fingerprint(model)
        model, revision = "local-dir", f"{revision}+{fingerprint}" if revision else fingerprint
    else:
        snapshot = _snapshot_dir(model, revision or None)
        if snapshot is not None:
            revision = f"{revision}@snapshot:{snapshot.name}"
    config_hash = _hf_config_hash(getattr(model_config, "hf_config", None))
    return model, f"{revision}|cfg:{config_hash}"


def tokenizer_identity(model_config: Any) -> str:
    tokenizer = str(getattr(model_config, "tokenizer", None) or model_config.model)
    revision = getattr(model_config, "tokenizer_revision", None) or ""
    mode = str(getattr(model_config, "tokenizer_mode", "") or "")
    folder: Path | None = Path(tokenizer) if os.path.isdir(tokenizer) else \
        _snapshot_dir(tokenizer, revision or None)
    content = directory_fingerprint(folder, tokenizer_only=True) if folder else ""
    name = f"local:{Path(tokenizer).resolve().name}" if os.path.isdir(tokenizer) else tokenizer
    # With file contents at hand the name is left out: the same tokenizer under another path
    # (another host) is the same tokenizer.
    return _digest(_stable_json([name if not content else "", revision, mode, content]).encode())


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def rope_description(hf_config: Any) -> str:
    if hf_config is None:
        return ""
    for attr in ("rope_parameters", "rope_scaling"):
        value = getattr(hf_config, attr, None)
        if value:
            return _stable_json(value)
    theta = getattr(hf_config, "rope_theta", None)
    return _stable_json({"rope_theta": theta}) if theta is not None else ""


def kv_layout(vllm_config: Any, geometry: Any, spec: Any, device_type: str,
              vllm_version: str) -> str:
    attention = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention, "backend", None) if attention is not None else None
    parts = {
        "layers": geometry.num_layers,
        "kv_heads": getattr(spec, "num_kv_heads", "?"),
        "head_size": getattr(spec, "head_size", "?"),
        "head_size_v": getattr(spec, "head_size_v", getattr(spec, "head_size", "?")),
        "block": geometry.block_size,
        "page": geometry.page_bytes,
        "regions": len(geometry.regions),
        "quant": str(getattr(spec, "kv_quant_mode", "")),
        "attn": str(getattr(backend, "name", backend) or "auto"),
        "device": device_type,
        "vllm": vllm_version,
    }
    return ",".join(f"{k}={v}" for k, v in parts.items())


def derive_signature(vllm_config: Any, kv_cache_config: Any, geometry: Any, chunk_tokens: int,
                     tp_rank: int, device_type: str, vllm_version: str,
                     tenant: str = "") -> ModelSignature:
    """The signature of rank ``tp_rank`` of the engine described by ``vllm_config``."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    model, revision = model_identity(model_config)
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    cache_dtype = str(getattr(cache_config, "cache_dtype", "auto") or "auto")
    kv_dtype = _dtype_name(model_config.dtype) if cache_dtype == "auto" else cache_dtype
    kv_dtype = f"{kv_dtype}/{_dtype_name(getattr(spec, 'dtype', ''))}"
    layout = kv_layout(vllm_config, geometry, spec, device_type, vllm_version)
    layout += f",kv_cache_layout={getattr(kv_cache_config, 'kv_cache_layout', None) or ''}"
    dcp = int(getattr(parallel, "decode_context_parallel_size", 1) or 1)
    if dcp > 1:
        layout += f",dcp={dcp}"
    return ModelSignature(
        model=model,
        revision=revision,
        tokenizer_hash=tokenizer_identity(model_config),
        kv_dtype=kv_dtype,
        kv_layout=layout,
        chunk_tokens=chunk_tokens,
        rope_scaling=rope_description(getattr(model_config, "hf_config", None)),
        quantization=str(getattr(model_config, "quantization", None) or ""),
        tp_size=int(getattr(parallel, "tensor_parallel_size", 1) or 1),
        tp_rank=tp_rank,
        tenant=tenant,
    )


def lora_identity(lora_request: Any) -> str:
    """The ``lora_adapter`` field for a request's LoRA adapter ('' without one)."""
    if lora_request is None:
        return ""
    name = str(getattr(lora_request, "lora_name", "") or "")
    path = str(getattr(lora_request, "lora_path", "") or getattr(lora_request, "path", "") or "")
    content = directory_fingerprint(path) if path and os.path.isdir(path) else path
    return f"{name}:{content}"
