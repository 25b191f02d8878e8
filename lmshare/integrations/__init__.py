"""Integrations with serving engines (vLLM: :mod:`lmshare.integrations.vllm`)."""
