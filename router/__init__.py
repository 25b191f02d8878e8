"""``lmshare router``: an OpenAI-compatible load balancer in front of vLLM servers that sends
each request where its prompt's KV already is (asking the lmshare controller), or where load
is lowest, and leaves the rest to peer sharing."""

from lmshare.router.config import POLICIES, BackendSpec, RouterConfig, parse_backend
from lmshare.router.service import Router, serve

__all__ = ["POLICIES", "BackendSpec", "Router", "RouterConfig", "parse_backend", "serve"]
