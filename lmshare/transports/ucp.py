"""UCX one-sided reads (RMA GET) through the UCP C API, bound with ctypes.

This is the only module that touches ``libucp``. ucxx 0.52's Python API has no memory handles,
remote keys or GET, so we call the C library that the ``libucx`` wheel (``libucx-cu12``, pulled
in by ``pip install lmshare[ucx]``) bundles. Struct layouts follow the UCX 1.21 headers
(``ucp/api/ucp.h``, ``ucp_def.h``) for x86-64/aarch64 LP64; ``tests/test_ucp.py`` pins their sizes.

Typical use::

    owner:  ctx = UcpContext(); region = ctx.map(pool_mmap); server = UcpServer(ctx).start()
            publish (ctx.address, region.pack_rkey(), region.address)
    reader: ctx = UcpContext(); ep = ctx.connect(owner_address)
            ep.get_into(dst_view, owner_base + offset, rkey, deadline)

Over shared memory (``cma``) a GET is a true one-sided ``process_vm_readv``; over ``tcp`` UCX
emulates it with active messages, so the owner must keep progressing its worker (``UcpServer``).
Endpoints are made from an exchanged worker address. Every wait has a deadline; an endpoint
whose GET failed or missed it is closed and must be reconnected. Shared-memory transports lack
peer error handling, hence the choice ``RemoteEndpoint(error_handling=...)`` explains.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from lmshare.errors import ConfigError, TransferError

log = logging.getLogger(__name__)

# UCX reads its environment when the library loads and at ucp_init. Its own log lines go to
# stdout by default; send them to stderr so they never mix with a program's output.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
os.environ.setdefault("UCX_LOG_FILE", "stderr")
# Over tcp, UCX emulates GET with active messages cut into segments of 8 KiB by default; KV
# chunks are MiBs, and 512 KiB segments with 4 MiB socket buffers moved them about 3x faster
# on loopback (measured with UCX 1.21). Both sides must agree: set before ucp_init.
for _name, _value in (("UCX_TCP_TX_SEG_SIZE", "512k"), ("UCX_TCP_RX_SEG_SIZE", "512k"),
                      ("UCX_TCP_SNDBUF", "4m"), ("UCX_TCP_RCVBUF", "4m")):
    os.environ.setdefault(_name, _value)

API_MAJOR, API_MINOR = 1, 21  # the headers these layouts come from

# ucs_status_t (a packed enum: 1 signed byte)
UCS_OK = 0
UCS_INPROGRESS = 1
UCS_ERR_BUSY = -15
UCS_ERR_LAST = -100

# ucp_params_t.field_mask / features
UCP_PARAM_FIELD_FEATURES = 1 << 0
UCP_PARAM_FIELD_NAME = 1 << 8
UCP_FEATURE_RMA = 1 << 1
UCP_FEATURE_WAKEUP = 1 << 4
UCP_FEATURE_AM = 1 << 6
# ucp_worker_params_t.field_mask
UCP_WORKER_PARAM_FIELD_THREAD_MODE = 1 << 0
UCS_THREAD_MODE_SERIALIZED = 1
# ucp_worker_attr_t.field_mask
UCP_WORKER_ATTR_FIELD_ADDRESS = 1 << 1
# ucp_mem_map_params_t.field_mask / prot
UCP_MEM_MAP_PARAM_FIELD_ADDRESS = 1 << 0
UCP_MEM_MAP_PARAM_FIELD_LENGTH = 1 << 1
UCP_MEM_MAP_PARAM_FIELD_PROT = 1 << 3
UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE = 1 << 4
UCP_MEM_MAP_PROT_LOCAL_READ = 1 << 0
UCP_MEM_MAP_PROT_LOCAL_WRITE = 1 << 1
UCP_MEM_MAP_PROT_REMOTE_READ = 1 << 8
UCS_MEMORY_TYPE_HOST = 0
# ucp_ep_params_t.field_mask / err_mode
UCP_EP_PARAM_FIELD_REMOTE_ADDRESS = 1 << 0
UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE = 1 << 1
UCP_EP_PARAM_FIELD_ERR_HANDLER = 1 << 2
UCP_ERR_HANDLING_MODE_NONE = 0
UCP_ERR_HANDLING_MODE_PEER = 1
# ucp_request_param_t.op_attr_mask
UCP_OP_ATTR_FIELD_FLAGS = 1 << 4
UCP_OP_ATTR_FIELD_MEMH = 1 << 8
UCP_EP_CLOSE_FLAG_FORCE = 1 << 0

# an idle progress thread polls PROGRESS_SPIN times, then sleeps (up to PROGRESS_MAX_SLEEP_S)
PROGRESS_SPIN = 200
PROGRESS_MAX_SLEEP_S = 0.0005
_POINTER_ERROR_FLOOR = (1 << 64) + UCS_ERR_LAST  # ucs_status_ptr_t values >= this are errors


class UcxUnavailable(ConfigError):
    """libucp could not be found or loaded: install ``lmshare[ucx]`` (libucx-cu12 1.21)."""


class UcxError(TransferError):
    """A UCP call failed; ``status`` is the ucs_status_t code."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(f"{call} failed: {status_string(status)} ({status})")
        self.call = call
        self.status = status


# --- struct layouts (UCX 1.21, LP64) -------------------------------------------------------

class _Params(ctypes.Structure):  # ucp_params_t, 88 bytes
    _fields_ = [("field_mask", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("request_size", ctypes.c_size_t), ("request_init", ctypes.c_void_p),
                ("request_cleanup", ctypes.c_void_p), ("tag_sender_mask", ctypes.c_uint64),
                ("mt_workers_shared", ctypes.c_int), ("estimated_num_eps", ctypes.c_size_t),
                ("estimated_num_ppn", ctypes.c_size_t), ("name", ctypes.c_char_p),
                ("node_local_id", ctypes.c_size_t)]


class _WorkerParams(ctypes.Structure):  # ucp_worker_params_t, 200 bytes
    _fields_ = [("field_mask", ctypes.c_uint64), ("thread_mode", ctypes.c_int),
                ("cpu_mask", ctypes.c_ulong * 16), ("events", ctypes.c_uint),
                ("user_data", ctypes.c_void_p), ("event_fd", ctypes.c_int),
                ("flags", ctypes.c_uint64), ("name", ctypes.c_char_p),
                ("am_alignment", ctypes.c_size_t), ("client_id", ctypes.c_uint64)]


class _WorkerAttr(ctypes.Structure):  # ucp_worker_attr_t, 80 bytes
    _fields_ = [("field_mask", ctypes.c_uint64), ("thread_mode", ctypes.c_int),
                ("address_flags", ctypes.c_uint32), ("address", ctypes.c_void_p),
                ("address_length", ctypes.c_size_t), ("max_am_header", ctypes.c_size_t),
                ("name", ctypes.c_char * 32), ("max_debug_string", ctypes.c_size_t)]


class _MemMapParams(ctypes.Structure):  # ucp_mem_map_params_t, 48 bytes
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p),
                ("length", ctypes.c_size_t), ("flags", ctypes.c_uint), ("prot", ctypes.c_uint),
                ("memory_type", ctypes.c_int), ("exported_memh_buffer", ctypes.c_void_p)]


class _SockAddr(ctypes.Structure):  # ucs_sock_addr_t
    _fields_ = [("addr", ctypes.c_void_p), ("addrlen", ctypes.c_uint32)]


class _EpParams(ctypes.Structure):  # ucp_ep_params_t, 104 bytes
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p),
                ("err_mode", ctypes.c_int), ("err_handler_cb", ctypes.c_void_p),
                ("err_handler_arg", ctypes.c_void_p), ("user_data", ctypes.c_void_p),
                ("flags", ctypes.c_uint), ("sockaddr", _SockAddr),
                ("conn_request", ctypes.c_void_p), ("name", ctypes.c_char_p),
                ("local_sockaddr", _SockAddr)]


class _RequestParam(ctypes.Structure):  # ucp_request_param_t, 72 bytes
    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("request", ctypes.c_void_p), ("cb", ctypes.c_void_p),
                ("datatype", ctypes.c_uint64), ("user_data", ctypes.c_void_p),
                ("reply_buffer", ctypes.c_void_p), ("memory_type", ctypes.c_int),
                ("recv_info", ctypes.c_void_p), ("memh", ctypes.c_void_p)]


STRUCT_SIZES = {"ucp_params_t": (_Params, 88), "ucp_worker_params_t": (_WorkerParams, 200),
                "ucp_worker_attr_t": (_WorkerAttr, 80), "ucp_mem_map_params_t": (_MemMapParams, 48),
                "ucp_ep_params_t": (_EpParams, 104), "ucp_request_param_t": (_RequestParam, 72)}

# --- library loading -----------------------------------------------------------------------

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_STATUS = ctypes.c_int8
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ucp_get_version_string": (ctypes.c_char_p, []),
    "ucs_status_string": (ctypes.c_char_p, [_STATUS]),
    "ucp_init_version": (_STATUS, [ctypes.c_uint, ctypes.c_uint, _P, _P, _PP]),
    "ucp_cleanup": (None, [_P]),
    "ucp_worker_create": (_STATUS, [_P, _P, _PP]),
    "ucp_worker_destroy": (None, [_P]),
    "ucp_worker_query": (_STATUS, [_P, _P]),
    "ucp_worker_release_address": (None, [_P, _P]),
    "ucp_worker_progress": (ctypes.c_uint, [_P]),
    "ucp_worker_get_efd": (_STATUS, [_P, ctypes.POINTER(ctypes.c_int)]),
    "ucp_worker_arm": (_STATUS, [_P]),
    "ucp_worker_signal": (_STATUS, [_P]),
    "ucp_mem_map": (_STATUS, [_P, _P, _PP]),
    "ucp_mem_unmap": (_STATUS, [_P, _P]),
    # ucp_memh_pack() without UCP_MEMH_PACK_FLAG_EXPORT aborts the process in 1.21
    # ("packing rkey using ucp_memh_pack() is unsupported"): rkeys still come from ucp_rkey_pack.
    "ucp_rkey_pack": (_STATUS, [_P, _P, _PP, ctypes.POINTER(ctypes.c_size_t)]),
    "ucp_rkey_buffer_release": (None, [_P]),
    "ucp_ep_create": (_STATUS, [_P, _P, _PP]),
    "ucp_ep_close_nbx": (_P, [_P, _P]),
    "ucp_ep_rkey_unpack": (_STATUS, [_P, _P, _PP]),
    "ucp_rkey_destroy": (None, [_P]),
    "ucp_get_nbx": (_P, [_P, _P, ctypes.c_size_t, ctypes.c_uint64, _P, _P]),
    "ucp_request_check_status": (_STATUS, [_P]),
    "ucp_request_cancel": (None, [_P, _P]),
    "ucp_request_free": (None, [_P]),
}

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _candidates() -> list[str]:
    paths = []
    if override := os.environ.get("LMSHARE_LIBUCP"):
        paths.append(override)
    try:
        import libucx  # the libucx-cu12 wheel

        loaded = libucx.load_library()  # dlopens libucs, libuct, libucp RTLD_LOCAL, in order
        for handle in loaded:
            name = getattr(handle, "_name", "") or ""
            if os.path.basename(name).startswith("libucp.so"):
                paths.append(name)
    except Exception as exc:  # any import/load failure just means "not here"
        log.debug("libucx package not usable: %s", exc)
    if found := ctypes.util.find_library("ucp"):
        paths.append(found)
    return paths


def _load() -> ctypes.CDLL:
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise UcxUnavailable(_lib_error)
        errors = []
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
                for name, (restype, argtypes) in _SIGNATURES.items():
                    func = getattr(lib, name)
                    func.restype = restype
                    func.argtypes = argtypes
            except (OSError, AttributeError) as exc:
                errors.append(f"{path}: {exc}")
                continue
            _lib = lib
            log.debug("loaded %s (UCX %s)", path, lib.ucp_get_version_string().decode())
            return lib
        _lib_error = ("UCX (libucp) is not available: install the optional extra "
                      "`pip install lmshare[ucx]` (libucx-cu12 1.21) or set LMSHARE_LIBUCP"
                      + (f"; tried {'; '.join(errors)}" if errors else ""))
        raise UcxUnavailable(_lib_error)


def ucx_available() -> bool:
    """True when libucp can be loaded (lmshare works without it: UCX is an optional transport)."""
    try:
        _load()
    except UcxUnavailable:
        return False
    return True


def ucx_version() -> str:
    """The loaded UCX library version, e.g. ``"1.21.0"``."""
    return _load().ucp_get_version_string().decode()


def status_string(status: int) -> str:
    """UCX's text for a ucs_status_t code."""
    try:
        text = _load().ucs_status_string(status)
    except UcxUnavailable:
        return "UCX unavailable"
    return text.decode() if text else "unknown status"


def _check(call: str, status: int) -> None:
    if status != UCS_OK:
        raise UcxError(call, status)


def _ptr_status(ptr: int | None) -> tuple[int, int | None]:
    """Split a ucs_status_ptr_t into (status, request pointer or None)."""
    if not ptr:
        return UCS_OK, None
    if ptr >= _POINTER_ERROR_FLOOR:
        return ptr - (1 << 64), None
    return UCS_INPROGRESS, ptr


def _writable_address(buffer: Any) -> tuple[int, int, Any]:
    """(address, nbytes, keepalive) of a writable, C-contiguous buffer."""
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError("destination buffer is read-only")
    if not view.c_contiguous:
        raise ValueError("destination buffer is not contiguous")
    nbytes = view.nbytes
    if nbytes == 0:
        return 0, 0, view
    holder = (ctypes.c_char * nbytes).from_buffer(view.cast("B"))
    return ctypes.addressof(holder), nbytes, holder


_live_contexts: weakref.WeakSet[UcpContext] = weakref.WeakSet()

# ucp_err_handler_cb_t: void (*)(void *arg, ucp_ep_h ep, ucs_status_t status). UCX calls it from
# ucp_worker_progress (so on a thread that holds the context lock); ``arg`` indexes _endpoints.
_ERR_HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int8)
_endpoints: weakref.WeakValueDictionary[int, RemoteEndpoint] = weakref.WeakValueDictionary()
_endpoint_ids = iter(range(1, 1 << 62))


def _on_endpoint_error(arg: int | None, _ep: int | None, status: int) -> None:
    endpoint = _endpoints.get(arg or 0)
    if endpoint is not None:
        endpoint._failed(status)


_ERR_HANDLER = _ERR_HANDLER_T(_on_endpoint_error)


# --- context / worker ----------------------------------------------------------------------

class UcpContext:
    """One UCP context with one worker (RMA + AM features).

    Worker calls are serialised by an internal lock, so a ``UcpServer`` thread and the caller's
    thread may share it. ``wakeup=True`` adds the wakeup feature so an idle ``UcpServer`` sleeps
    on the worker's event fd instead of polling.
    """

    def __init__(self, *, wakeup: bool = False, name: str = "lmshare") -> None:
        lib = _load()
        self._lib = lib
        self.lock = threading.RLock()
        self.wakeup = wakeup
        self._children: list[weakref.ref[Any]] = []
        self._closed = False
        self._context = ctypes.c_void_p()
        self._worker = ctypes.c_void_p()
        self._name = name.encode()
        self.generation = 0  # bumped by reset_worker(); endpoints of older generations are gone
        params = _Params(field_mask=UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
                         features=UCP_FEATURE_RMA | UCP_FEATURE_AM
                         | (UCP_FEATURE_WAKEUP if wakeup else 0),
                         name=self._name)
        _check("ucp_init", lib.ucp_init_version(API_MAJOR, API_MINOR, ctypes.byref(params),
                                                None, ctypes.byref(self._context)))
        try:
            self._create_worker()
        except UcxError:
            lib.ucp_cleanup(self._context)
            raise
        _live_contexts.add(self)
        log.debug("UCP context %s up, worker address %d bytes", name, len(self.address))

    def _create_worker(self) -> None:
        wparams = _WorkerParams(field_mask=UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                                thread_mode=UCS_THREAD_MODE_SERIALIZED)
        worker = ctypes.c_void_p()
        _check("ucp_worker_create", self._lib.ucp_worker_create(
            self._context, ctypes.byref(wparams), ctypes.byref(worker)))
        self._worker = worker
        #: this worker's address: what peers pass to ``connect`` (changes on ``reset_worker``)
        self.address = self._query_address()

    def reset_worker(self) -> None:
        """Destroy the worker and make a fresh one, with a new ``address``.

        Every endpoint of this context becomes ``broken`` (reconnect); memory regions survive.
        This is the only sure way to stop a GET that neither completed nor could be canceled
        from landing in its buffer later. Keep serving and reading on separate contexts: an
        owner's peers would have to learn the new address.
        """
        with self.lock:
            self._ensure_open()
            for ref in self._children:
                child = ref()
                if isinstance(child, RemoteEndpoint):
                    child._forget()
                elif isinstance(child, UcpServer) and child.running:
                    log.warning("resetting the worker of a serving UCP context: "
                                "peers must learn its new address")
            self._lib.ucp_worker_destroy(self._worker)
            self._worker = ctypes.c_void_p()
            self.generation += 1
            self._create_worker()
        log.info("UCP worker reset (generation %d)", self.generation)

    def _query_address(self) -> bytes:
        attr = _WorkerAttr(field_mask=UCP_WORKER_ATTR_FIELD_ADDRESS)
        _check("ucp_worker_query", self._lib.ucp_worker_query(self._worker, ctypes.byref(attr)))
        try:
            return ctypes.string_at(attr.address, attr.address_length)
        finally:
            self._lib.ucp_worker_release_address(self._worker, attr.address)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def worker_handle(self) -> int:
        """The raw ``ucp_worker_h`` (for this module's classes)."""
        self._ensure_open()
        return self._worker.value or 0

    @property
    def context_handle(self) -> int:
        """The raw ``ucp_context_h``."""
        self._ensure_open()
        return self._context.value or 0

    def _ensure_open(self) -> None:
        if self._closed:
            raise TransferError("UCP context is closed")

    def _adopt(self, child: Any) -> None:
        self._children = [ref for ref in self._children if ref() is not None]
        self._children.append(weakref.ref(child))

    def progress(self) -> int:
        """Progress the worker once; returns how many events it handled."""
        with self.lock:
            if self._closed:
                return 0
            return self._lib.ucp_worker_progress(self._worker)

    def event_fd(self) -> int:
        """The worker's event fd (needs ``wakeup=True``)."""
        fd = ctypes.c_int(-1)
        with self.lock:
            self._ensure_open()
            _check("ucp_worker_get_efd", self._lib.ucp_worker_get_efd(self._worker,
                                                                      ctypes.byref(fd)))
        return fd.value

    def arm(self) -> bool:
        """Arm the event fd; False when events are pending (progress again before sleeping)."""
        with self.lock:
            if self._closed:
                return False
            status = self._lib.ucp_worker_arm(self._worker)
        if status == UCS_ERR_BUSY:
            return False
        _check("ucp_worker_arm", status)
        return True

    def signal(self) -> None:
        """Wake a thread sleeping on the event fd."""
        with self.lock:
            if not self._closed:
                self._lib.ucp_worker_signal(self._worker)

    def map(self, buffer: Any = None, *, address: int | None = None,
            length: int | None = None) -> MemoryRegion:
        """Register memory for remote reads (see ``MemoryRegion``)."""
        return MemoryRegion(self, buffer, address=address, length=length)

    def connect(self, worker_address: bytes, *, error_handling: bool = True) -> RemoteEndpoint:
        """An endpoint to the worker whose address is ``worker_address``."""
        return RemoteEndpoint(self, worker_address, error_handling=error_handling)

    def close(self) -> None:
        """Stop servers, close endpoints, unmap regions, destroy the worker and the context."""
        if self._closed:
            return
        for ref in reversed(self._children):
            child = ref()
            if child is not None:
                try:
                    child.close()
                except Exception:  # teardown must go on
                    log.exception("closing %r failed", child)
        with self.lock:
            self._closed = True
            if self._worker.value:
                self._lib.ucp_worker_destroy(self._worker)
            self._lib.ucp_cleanup(self._context)
        _live_contexts.discard(self)
        log.debug("UCP context closed")

    def __enter__(self) -> UcpContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all_contexts() -> None:
    for ctx in list(_live_contexts):
        try:
            ctx.close()
        except Exception:
            log.exception("UCP teardown at exit failed")


# --- memory registration -------------------------------------------------------------------

class MemoryRegion:
    """Memory registered with ``ucp_mem_map`` for one-sided access by peers.

    Pass a writable buffer (a whole ``mmap`` of the shared-memory pool, a bytearray) or a raw
    ``address`` + ``length`` whose lifetime the caller guarantees. While a buffer is registered it
    stays exported, so an ``mmap`` cannot be closed under UCX's feet.
    """

    def __init__(self, ctx: UcpContext, buffer: Any = None, *, address: int | None = None,
                 length: int | None = None) -> None:
        self._ctx = ctx
        self._keepalive: Any = None
        if buffer is not None:
            address, length, self._keepalive = _writable_address(buffer)
        if address is None or not length:
            raise ValueError("MemoryRegion needs a non-empty buffer or address + length")
        self.address = int(address)
        self.length = int(length)
        prot = UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE | \
            UCP_MEM_MAP_PROT_REMOTE_READ  # peers only ever read
        params = _MemMapParams(
            field_mask=UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | UCP_MEM_MAP_PARAM_FIELD_PROT | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
            address=self.address, length=self.length, prot=prot,
            memory_type=UCS_MEMORY_TYPE_HOST)
        self._memh = ctypes.c_void_p()
        ctx._ensure_open()
        _check("ucp_mem_map", ctx._lib.ucp_mem_map(ctx.context_handle, ctypes.byref(params),
                                                   ctypes.byref(self._memh)))
        self._rkey: bytes | None = None
        self._closed = False
        ctx._adopt(self)

    @property
    def handle(self) -> int:
        """The raw ``ucp_mem_h``."""
        if self._closed:
            raise TransferError("memory region is unmapped")
        return self._memh.value or 0

    def contains(self, address: int, nbytes: int) -> bool:
        return self.address <= address and address + nbytes <= self.address + self.length

    def pack_rkey(self) -> bytes:
        """The packed remote key that peers unpack to read this region."""
        if self._rkey is None:
            lib = self._ctx._lib
            buf, size = ctypes.c_void_p(), ctypes.c_size_t()
            _check("ucp_rkey_pack", lib.ucp_rkey_pack(self._ctx.context_handle, self.handle,
                                                      ctypes.byref(buf), ctypes.byref(size)))
            try:
                self._rkey = ctypes.string_at(buf, size.value)
            finally:
                lib.ucp_rkey_buffer_release(buf)
        return self._rkey

    def close(self) -> None:
        """Unregister (peers' GETs on this region fail or read stale pages afterwards)."""
        if self._closed:
            return
        self._closed = True
        if not self._ctx.closed:
            status = self._ctx._lib.ucp_mem_unmap(self._ctx._context, self._memh)
            if status != UCS_OK:
                log.warning("ucp_mem_unmap: %s", status_string(status))
        self._keepalive = None

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- endpoints and GET ---------------------------------------------------------------------

class RemoteEndpoint:
    """An endpoint to a peer worker, made from its worker address; reads its memory with GET.

    ``error_handling`` picks UCX's peer error handling mode (measured with UCX 1.21):

    - ``True`` (default, for peers on other hosts): a GET that misses its deadline is canceled
      cleanly by a forced close, on both sides. UCX then refuses shared-memory transports, so a
      same-host GET is emulated over tcp and needs the owner's ``UcpServer``.
    - ``False`` (same-host peers): GET is a true one-sided cma ``process_vm_readv`` that never
      waits for the owner. Over tcp this mode is unsafe: a stalled GET cannot be canceled, so
      the whole worker is reset (``UcpContext.reset_worker``) and the owner may abort when it
      resumes. Needs ``sm``/``cma`` in ``UCX_TLS``; with only ``sm`` it is the only mode.

    After a GET fails or misses its deadline the endpoint is ``broken``: connect again.
    """

    def __init__(self, ctx: UcpContext, worker_address: bytes, *,
                 error_handling: bool = True) -> None:
        self._ctx = ctx
        self._lib = ctx._lib
        self._rkeys: dict[bytes, ctypes.c_void_p] = {}
        self._ep = ctypes.c_void_p()
        self.error_handling = error_handling
        self.broken = False
        self._closed = False
        self._generation = ctx.generation
        #: the ucs_status_t UCX reported for this endpoint's peer (peer error handling only)
        self.error: int | None = None
        self._id = next(_endpoint_ids)
        _endpoints[self._id] = self
        addr = ctypes.create_string_buffer(bytes(worker_address), len(worker_address))
        params = _EpParams(
            field_mask=UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
            address=ctypes.addressof(addr),
            err_mode=UCP_ERR_HANDLING_MODE_PEER if error_handling else UCP_ERR_HANDLING_MODE_NONE)
        if error_handling:
            params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER
            params.err_handler_cb = ctypes.cast(_ERR_HANDLER, ctypes.c_void_p)
            params.err_handler_arg = self._id
        with ctx.lock:
            _check("ucp_ep_create", self._lib.ucp_ep_create(ctx.worker_handle,
                                                            ctypes.byref(params),
                                                            ctypes.byref(self._ep)))
        ctx._adopt(self)

    def _ensure_usable(self) -> None:
        if self._closed or self._ctx.closed:
            raise TransferError("UCX endpoint is closed")
        if self.error is not None:
            raise TransferError(f"UCX peer failed ({status_string(self.error)}); reconnect")
        if self.broken or self._generation != self._ctx.generation:
            raise TransferError("UCX endpoint was closed after a failed GET; reconnect")

    def _failed(self, status: int) -> None:
        """UCX's error callback: the peer failed; requests on this endpoint complete with errors."""
        if self.error is None:
            log.info("UCX endpoint to peer failed: %s", status_string(status))
        self.error = status
        self.broken = True

    def _forget(self) -> None:
        """The worker is about to be destroyed (and with it this endpoint): drop the handles."""
        if self._ep.value and self._generation == self._ctx.generation:
            for handle in self._rkeys.values():
                self._lib.ucp_rkey_destroy(handle)
        self._rkeys.clear()
        self._ep = ctypes.c_void_p()
        self.broken = True

    def _rkey(self, packed: bytes) -> ctypes.c_void_p:
        handle = self._rkeys.get(packed)
        if handle is None:
            handle = ctypes.c_void_p()
            buf = ctypes.create_string_buffer(packed, len(packed))
            with self._ctx.lock:
                _check("ucp_ep_rkey_unpack", self._lib.ucp_ep_rkey_unpack(
                    self._ep, buf, ctypes.byref(handle)))
            self._rkeys[packed] = handle
        return handle

    def get_into(self, local: Any, remote_addr: int, rkey: bytes, deadline: float,
                 local_region: MemoryRegion | None = None) -> None:
        """Read ``len(local)`` bytes at the peer's ``remote_addr`` into ``local`` by ``deadline``
        (a ``time.monotonic()`` value); raises ``TransferError`` on failure or expiry."""
        self.get_many([(local, remote_addr)], rkey, deadline, local_region)

    def get_many(self, ops: Sequence[tuple[Any, int]], rkey: bytes, deadline: float,
                 local_region: MemoryRegion | None = None) -> None:
        """Issue one GET per ``(local_buffer, remote_addr)`` at once, then wait for all of them.

        ``local_region``, when the destinations lie inside it, lets UCX skip registering them.
        All-or-nothing: on any failure or at ``deadline`` raises ``TransferError``; no GET of this
        call writes its destination after this returns or raises.
        """
        self._ensure_usable()
        lib, ctx = self._lib, self._ctx
        rkey_h = self._rkey(rkey)
        pending: list[tuple[int, Any]] = []  # (request, keepalive)
        failure: str | None = None
        with ctx.lock:
            worker = ctx.worker_handle
            for local, remote_addr in ops:
                address, nbytes, keep = _writable_address(local)
                if nbytes == 0:
                    continue
                param = _RequestParam()
                if local_region is not None and local_region.contains(address, nbytes):
                    param.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH
                    param.memh = local_region.handle
                status, request = _ptr_status(lib.ucp_get_nbx(
                    self._ep, address, nbytes, remote_addr, rkey_h, ctypes.byref(param)))
                if request is not None:
                    pending.append((request, keep))
                elif status != UCS_OK:
                    failure = f"ucp_get_nbx: {status_string(status)}"
                    break
        spins = 0
        while pending and failure is None:
            handled = ctx.progress()
            still = []
            with ctx.lock:
                for request, keep in pending:
                    status = lib.ucp_request_check_status(request)
                    if status == UCS_INPROGRESS:
                        still.append((request, keep))
                        continue
                    lib.ucp_request_free(request)
                    if status != UCS_OK and failure is None:
                        failure = f"GET failed: {status_string(status)}"
            pending = still
            if not pending:
                break
            if time.monotonic() >= deadline:
                failure = f"GET missed its deadline ({len(pending)} of {len(ops)} pending)"
                break
            spins = 0 if handled else spins + 1
            if spins > 64:
                os.sched_yield()  # let a same-host owner's progress thread run
        if pending:
            self._abandon(pending, worker)
        if failure is not None:
            raise TransferError(failure)

    def _abandon(self, pending: list[tuple[int, Any]], worker: int) -> None:
        """Make sure GETs that will not finish never write their buffers later.

        ``ucp_request_cancel`` does not cancel RMA. With peer error handling a forced close
        completes them as canceled; without it (measured: UCX 1.21, tcp) they stay pending and
        a late reply still lands during a later progress call, so the worker is reset.
        """
        lib, ctx = self._lib, self._ctx
        with ctx.lock:
            for request, _keep in pending:
                lib.ucp_request_cancel(worker, request)
        self._close_ep(force=True, timeout=1.0)
        self.broken = True
        if self.error_handling:
            end = time.monotonic() + 0.2  # a few progress rounds purge the requests
            while time.monotonic() < end:
                ctx.progress()
                with ctx.lock:
                    if all(lib.ucp_request_check_status(r) != UCS_INPROGRESS
                           for r, _ in pending):
                        break
                os.sched_yield()
        stuck = False
        with ctx.lock:
            for request, _keep in pending:
                stuck |= lib.ucp_request_check_status(request) == UCS_INPROGRESS
                lib.ucp_request_free(request)  # released by UCX on completion if still pending
        if stuck:
            log.warning("UCX GET could not be canceled; resetting the worker so it cannot "
                        "write its buffer late")
            ctx.reset_worker()

    def _close_ep(self, *, force: bool, timeout: float) -> None:
        if not self._ep.value or self._ctx.closed or self._generation != self._ctx.generation:
            return
        lib, ctx = self._lib, self._ctx
        with ctx.lock:
            for handle in self._rkeys.values():
                lib.ucp_rkey_destroy(handle)
            self._rkeys.clear()
            param = _RequestParam(op_attr_mask=UCP_OP_ATTR_FIELD_FLAGS,
                                  flags=UCP_EP_CLOSE_FLAG_FORCE if force else 0)
            status, request = _ptr_status(lib.ucp_ep_close_nbx(self._ep, ctypes.byref(param)))
            self._ep = ctypes.c_void_p()
        if request is None:
            if status != UCS_OK:
                log.debug("ucp_ep_close_nbx: %s", status_string(status))
            return
        end = time.monotonic() + timeout
        while True:
            ctx.progress()
            with ctx.lock:
                status = lib.ucp_request_check_status(request)
                if status != UCS_INPROGRESS:
                    lib.ucp_request_free(request)
                    return
            if time.monotonic() >= end:
                # Left to ucp_worker_destroy, which releases endpoints still closing.
                log.warning("UCX endpoint close did not finish in %.1fs", timeout)
                return
            os.sched_yield()

    def close(self, timeout: float = 1.0) -> None:
        """Destroy remote keys and close the endpoint (flushing, or forced when broken)."""
        if self._closed:
            return
        self._closed = True
        self._close_ep(force=self.broken, timeout=timeout)
        _endpoints.pop(self._id, None)

    def __enter__(self) -> RemoteEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- owner-side progress -------------------------------------------------------------------

class UcpServer:
    """Progresses the memory owner's worker on a background thread.

    Needed whenever a peer's GET is emulated with active messages (``tcp``); harmless over
    shared memory. Idle, it sleeps on the worker's event fd when the context has ``wakeup=True``,
    else it backs off polling up to ``PROGRESS_MAX_SLEEP_S``.
    """

    def __init__(self, ctx: UcpContext) -> None:
        self._ctx = ctx
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._fd_generation = -1
        ctx._adopt(self)

    def start(self) -> UcpServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmshare-ucp-progress",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        ctx, idle = self._ctx, 0
        try:
            while not self._stop.is_set():
                if ctx.progress():
                    idle = 0
                    continue
                idle += 1
                if idle < PROGRESS_SPIN:
                    continue
                if ctx.wakeup:
                    if self._fd_generation != ctx.generation:
                        self._fd, self._fd_generation = ctx.event_fd(), ctx.generation
                    if ctx.arm():
                        select.select([self._fd], [], [], 0.1)
                else:
                    time.sleep(min(PROGRESS_MAX_SLEEP_S, 1e-6 * idle))
        except Exception:  # a dying progress thread must say why
            log.exception("UCP progress thread failed")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the progress thread and wait for it."""
        self._stop.set()
        if self._ctx.wakeup:
            self._ctx.signal()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("UCP progress thread did not stop in %.1fs", timeout)
            self._thread = None

    close = stop

    def __enter__(self) -> UcpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
