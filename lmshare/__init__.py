"""lmshare: one cluster-wide CPU KV cache out of many vLLM instances' siloed ones."""

from lmshare.client import Client, Hit, LookupResult, PrefixPlan
from lmshare.errors import LMShareError
from lmshare.keys import ModelSignature, chunk_keys, signature_keys

__version__ = "0.1.0"
__all__ = ["Client", "Hit", "LMShareError", "LookupResult", "ModelSignature", "PrefixPlan",
           "chunk_keys", "signature_keys", "__version__"]
