"""Helpers for tests and benchmarks: a tiny, deterministic, offline model (needs the ``vllm``
extra: torch, transformers, tokenizers)."""
