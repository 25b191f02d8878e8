"""The tokens a backend will see for a request, from the served model's own tokenizer.

Completions: the prompt as vLLM tokenizes it (special tokens added unless the request says
``add_special_tokens: false``), or the token ids it was given. Chat: the model's chat template
applied to the messages (as vLLM applies it: generation prompt added), then tokenized without
adding special tokens again. ``transformers`` is imported on first use only, so the router
starts without it (and without torch); the prefix policies need it.
"""

from __future__ import annotations

import logging
from typing import Any

from lmshare.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 1 << 20


class Tokenizer:
    """A Hugging Face tokenizer loaded from a folder or a model id (no download unless the
    environment allows it)."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("the prefix policies tokenize prompts with the served model's "
                              "tokenizer and need the transformers package: pip install "
                              "transformers (or use --policy least-loaded)") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # transformers raises many types
            raise ConfigError(f"cannot load tokenizer {name!r} ({exc}); give --tokenizer DIR_OR_ID "
                              "(the folder or id vLLM serves)") from None
        self.name = name

    def completion_tokens(self, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]  # a batch is routed by its first prompt
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in prompt):
            return prompt[:MAX_PROMPT_TOKENS]
        if not isinstance(prompt, str):
            return None
        special = body.get("add_special_tokens", True) is not False
        return self._tok.encode(prompt, add_special_tokens=special)

    def chat_tokens(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        kwargs = body.get("chat_template_kwargs")
        kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        continue_final = body.get("continue_final_message") is True
        try:
            text = self._tok.apply_chat_template(
                messages, tokenize=False, tools=tools,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False
                and not continue_final,
                continue_final_message=continue_final, **kwargs)
        except Exception as exc:  # no template, a bad message: route by load
            log.debug("chat template failed: %s", exc)
            return None
        special = body.get("add_special_tokens", False) is True
        return self._tok.encode(text, add_special_tokens=special)

    def tokens(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt tokens of a request to ``endpoint`` ('completions' or 'chat'); None when
        they cannot be known here."""
        return self.chat_tokens(body) if endpoint == "chat" else self.completion_tokens(body)
