"""The connector's settings: ``kv_connector_extra_config``, validated (the keys are described in
README.md's table of them, which a test checks against these defaults)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from lmshare.client import DEFAULT_LEASE_S
from lmshare.errors import ConfigError
from lmshare.keys import DEFAULT_CHUNK_TOKENS


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, validated (see README.md)."""

    worker: str = ""
    endpoint: str = ""
    peers: bool = True
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    timeout_s: float = 10.0
    lookup_timeout_s: float = 2.0
    retry_s: float = 5.0
    lease_s: float = DEFAULT_LEASE_S
    load: bool = True
    save: bool = True
    async_save: bool = True
    max_pending_saves: int = 64
    fetch_batch_chunks: int = 8
    same_host_direct: bool = True
    tenant: str = ""
    key_file: str = ""  # the cluster key (or tenant credential); "" = $LMSHARE_KEY_FILE

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, block_size: int
                          ) -> ConnectorSettings:
        extra = dict(extra or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"unknown lmshare connector settings {unknown} in "
                              f"kv_connector_extra_config; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            kind = type(known[name].default)
            try:
                if kind is bool:
                    if isinstance(value, str):
                        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                            raise ValueError(value)
                        value = value.lower() in ("true", "1", "yes")
                    values[name] = bool(value)
                else:
                    values[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"lmshare connector setting {name}={value!r} must be a "
                                  f"{kind.__name__}") from None
        if not values.get("worker") and not values.get("endpoint"):
            values["worker"] = os.environ.get("LMSHARE_WORKER", "")
        settings = cls(**values)
        if not settings.worker and not settings.endpoint:
            raise ConfigError("the lmshare connector needs the local worker: set "
                              "kv_connector_extra_config {\"worker\": NAME} (the name given to "
                              "`lmshare worker --name`), or LMSHARE_WORKER")
        if settings.chunk_tokens <= 0 or settings.chunk_tokens % block_size:
            raise ConfigError(f"chunk_tokens={settings.chunk_tokens} must be a positive multiple "
                              f"of vLLM's block_size ({block_size})")
        if settings.fetch_batch_chunks < 0:
            raise ConfigError("lmshare connector setting fetch_batch_chunks must be >= 0")
        for name in ("timeout_s", "lookup_timeout_s", "lease_s"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"lmshare connector setting {name} must be positive")
        return settings
