"""Optional leader election through etcd: several controllers, one leader, hot standbys.

Each controller campaigns for one etcd key with a lease (``ttl_s``): the first to create the key
leads and keeps its lease alive; the others poll and take over when the key vanishes (the
leader died or lost etcd). A leader that cannot refresh its lease steps down at once, so two
controllers never both believe they lead for longer than a refresh interval. A new leader starts
with an empty index: workers re-register and send full syncs, as after a controller restart.

Uses ``aetcd`` (``pip install 'lmshare[etcd]'``); the controller runs without it when no
``--etcd`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from lmshare.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_KEY = "/lmshare/controller/leader"


class LeaderElection:
    """Campaigns in a background thread; ``is_leader`` and ``leader`` are safe to read anywhere."""

    def __init__(self, etcd_host: str, etcd_port: int, identity: str, key: str = DEFAULT_KEY,
                 ttl_s: float = 2.0, on_change: Callable[[bool], None] | None = None) -> None:
        try:
            import aetcd  # noqa: F401
        except ImportError:
            raise ConfigError("--etcd needs the etcd client: pip install 'lmshare[etcd]'") from None
        self.etcd_host, self.etcd_port = etcd_host, etcd_port
        self.identity = identity
        self.key = key.encode()
        self.ttl_s = max(1.0, ttl_s)
        self.on_change = on_change
        self._leading = threading.Event()
        self.leader = ""  # the identity (HOST:PORT) of the current leader, as last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmshare-election", daemon=True)

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def start(self) -> LeaderElection:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s + 2)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading.is_set():
            return
        if leading:
            self._leading.set()
            self.leader = self.identity
            log.info("this controller (%s) is now the leader", self.identity)
        else:
            self._leading.clear()
            log.warning("this controller (%s) is no longer the leader", self.identity)
        if self.on_change is not None:
            self.on_change(leading)

    def _run(self) -> None:
        asyncio.run(self._campaign())

    async def _campaign(self) -> None:
        import aetcd

        interval = self.ttl_s / 3
        while not self._stop.is_set():
            client = aetcd.Client(host=self.etcd_host, port=self.etcd_port, timeout=interval * 2)
            lease = None
            try:
                while not self._stop.is_set():
                    if lease is None:
                        lease = await client.lease(int(round(self.ttl_s)))
                        won, _ = await client.transaction(
                            compare=[client.transactions.version(self.key) == 0],
                            success=[client.transactions.put(self.key, self.identity.encode(),
                                                             lease=lease)],
                            failure=[])
                        if won:
                            self._set_leading(True)
                        else:
                            await lease.revoke()
                            lease = None
                            current = await client.get(self.key)
                            self.leader = current.value.decode() if current else ""
                    else:
                        await lease.refresh()
                        current = await client.get(self.key)
                        if current is None or current.value.decode() != self.identity:
                            lease = None  # the key expired or was taken: campaign again
                            self._set_leading(False)
                            continue
                    await asyncio.sleep(interval)
                if lease is not None:
                    await lease.revoke()  # hand over at once on a clean stop
            except Exception as exc:  # etcd unreachable or restarting: step down, retry
                if self.is_leader:
                    log.warning("lost etcd (%s); stepping down", exc)
                self._set_leading(False)
                await asyncio.sleep(interval)
            finally:
                self._set_leading(False)
                try:
                    await client.close()
                except Exception:  # closing a broken client
                    pass
