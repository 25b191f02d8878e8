"""Helpers for tests and benchmarks (need the ``vllm`` extra: torch, transformers, tokenizers).

* :mod:`.tiny_model` — a tiny, deterministic, offline Llama and tokenizer.
* :mod:`.vllm_engine` — a vLLM engine in its own process, driven over a pipe.
* :mod:`.fake_vllm` — fake paged KV memory shaped like vLLM's, for unit tests.
"""
