"""The router's settings: its backends (vLLM servers, each beside an lmshare worker) and policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lmshare.errors import ConfigError

POLICIES = ("round-robin", "least-loaded", "prefix", "prefix+load")


@dataclass(frozen=True)
class BackendSpec:
    """One OpenAI-compatible server, and the name of the lmshare worker beside it ('' = none)."""

    url: str
    worker: str = ""

    @property
    def name(self) -> str:
        return self.worker or urlsplit(self.url).netloc


def parse_backend(text: str) -> BackendSpec:
    """``URL[=WORKER]``, e.g. ``http://10.0.0.5:8000=node-a``."""
    url, _, worker = text.partition("=")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"cannot read backend {text!r}; write URL[=WORKER], e.g. "
                          "http://127.0.0.1:8001=node-a (the vLLM server and the name of the "
                          "lmshare worker beside it)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"backend {text!r} has a bad port") from None
    if parts.path not in ("", "/"):
        raise ConfigError(f"backend {text!r}: give the server's base URL without a path "
                          "(the router adds /v1/...)")
    return BackendSpec(url, worker.strip())


@dataclass
class RouterConfig:
    """Everything ``lmshare router`` is given."""

    backends: list[BackendSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "prefix+load"
    controller: str = ""  # HOST:PORT[,HOST:PORT...]; needed by the prefix policies
    key: object = None  # the cluster key (lmshare.credentials.ClusterKey) or None
    tokenizer: str = ""  # default: the model folder/id the backends report in /v1/models
    lookup_timeout_s: float = 0.05  # a later controller answer is ignored (least-loaded instead)
    load_margin: int = 2  # prefix+load: in-flight requests a holder may exceed the least-loaded by
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 300.0  # longest silence from a backend during a response
    health_interval_s: float = 1.0
    signature_refresh_s: float = 2.0  # how often backends' KV signatures are read from workers
    max_body_bytes: int = 32 * 1024 * 1024
    retries: int = -1  # other backends tried after a failure; -1 = every other backend
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigError("the router needs at least one --backend URL[=WORKER]")
        urls = [b.url for b in self.backends]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"a backend is given twice: {sorted(urls)}")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ConfigError(f"backend names must be unique (worker names, else host:port): "
                              f"{names}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown --policy {self.policy!r}; choose one of "
                              f"{', '.join(POLICIES)}")
        if self.policy.startswith("prefix"):
            if not self.controller:
                raise ConfigError(f"--policy {self.policy} needs --controller HOST:PORT (the "
                                  "lmshare controller that knows which worker holds a prefix)")
            if not any(b.worker for b in self.backends):
                raise ConfigError(f"--policy {self.policy} needs backends with worker names: "
                                  "--backend URL=WORKER")
        for name in ("lookup_timeout_s", "connect_timeout_s", "read_timeout_s",
                     "health_interval_s", "signature_refresh_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.load_margin < 0:
            raise ConfigError(f"--load-margin must be >= 0, got {self.load_margin}")
