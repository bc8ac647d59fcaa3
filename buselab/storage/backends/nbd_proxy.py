"""Another NBD server's export as the backend: `buselab nbd nbd://host/name`.

buselab sits in front of nbdkit, qemu-nbd or any NBD server and adds what it
adds to its own disks: the lab, steering (pause, step), filters, traces, the
kernel attach. Every request is passed on as it came; the export's size and
what it can do (FLUSH, FUA, TRIM, WRITE_ZEROES, fast zero, CACHE, read-only,
multi-conn, block status) are taken from the upstream, so clients are offered
exactly what the upstream offers.

Requests from buselab's serving threads go through concurrently: over a pool
of connections when the upstream allows multi-conn (a FLUSH on one covers
writes on all), else over one connection with the requests pipelined and the
replies matched by cookie (`buselab.client.Pipeline`).

When the upstream goes away, the one log line says so; requests fail with EIO
at once (none waits for it) while a thread reconnects with a bounded backoff,
and the next request after it is back goes through. An upstream that comes
back with another size stays refused: the disk under the clients must not
change size.
"""

from __future__ import annotations

import logging
import os
import threading

from ...client import ConnectionLost, NbdUri, Pipeline, parse_nbd_uri
from ...errors import UserError
from ...protocol import constants as c
from ..base import Backend, BackendError, Capabilities

log = logging.getLogger("buselab")

POOL_SIZE = 4  # connections when the upstream allows multi-conn
CONNECT_TIMEOUT = 10.0  # seconds for connect + handshake: an upstream that never answers is an error
EXTRA_TIMEOUT = 2.0  # seconds for each further connection of the pool
BACKOFF_FIRST = 0.05  # seconds before the first reconnect attempt
BACKOFF_MAX = 2.0  # and never longer than this between attempts


def capabilities(flags: int, block_status: bool) -> Capabilities:
    """What the upstream's transmission flags (and base:allocation) say it can do."""
    return Capabilities(
        flush=bool(flags & c.TF_SEND_FLUSH),
        fua=bool(flags & c.TF_SEND_FUA),
        trim=bool(flags & c.TF_SEND_TRIM),
        zero=bool(flags & c.TF_SEND_WRITE_ZEROES),
        fast_zero=bool(flags & c.TF_SEND_FAST_ZERO),
        cache=bool(flags & c.TF_SEND_CACHE),
        extents=block_status,
        multi_conn=bool(flags & c.TF_CAN_MULTI_CONN),
        rotational=bool(flags & c.TF_ROTATIONAL),
    )


class NbdProxyBackend(Backend):
    kind = "nbd"
    parallel = True  # each call waits for the upstream's round trip: let a client's requests overlap

    def __init__(self, uri: str | NbdUri, size: int | None = None) -> None:
        self.uri = uri if isinstance(uri, NbdUri) else parse_nbd_uri(uri)
        self._lock = threading.Lock()
        self._pool: list[Pipeline] = []
        self._pid = os.getpid()
        self._down: str | None = None  # why the upstream is unusable, while it is
        self._closed = threading.Event()
        self._reconnector: threading.Thread | None = None
        try:
            first = Pipeline.open(self.uri, timeout=CONNECT_TIMEOUT, on_lost=self._lost)
        except (OSError, ConnectionError) as exc:
            raise UserError(f"cannot use upstream {self.uri}: {_why(exc)}") from None
        export = first.export
        if size is not None and size != export.size:
            first.close()
            raise UserError(f"upstream {self.uri} is {export.size} bytes: drop --size (it was {size})")
        self.size = export.size
        self.readonly = bool(export.flags & c.TF_READ_ONLY)
        self.caps = capabilities(export.flags, first.block_status)
        self.max_block = export.max_block
        self._pool.append(first)
        self._fill_pool()

    def describe(self) -> str:
        return f"nbd {self.uri}"

    # -- connections ------------------------------------------------------------------------
    def _fill_pool(self) -> None:
        """With multi-conn, more connections (best effort: one is enough to serve)."""
        if not self.caps.multi_conn:
            return
        while len(self._pool) < POOL_SIZE:
            try:
                # A short wait: a server that takes one client at a time accepts and then says nothing.
                self._pool.append(Pipeline.open(self.uri, timeout=EXTRA_TIMEOUT, on_lost=self._lost))
            except (OSError, ConnectionError) as exc:
                log.debug("upstream %s: an extra connection failed: %s", self.uri, _why(exc))
                return

    def _pick(self) -> Pipeline:
        if os.getpid() != self._pid:
            self._after_fork()
        with self._lock:
            if self._down is not None:
                raise BackendError(c.EIO, f"upstream {self.uri} is away ({self._down}); reconnecting")
            if self._closed.is_set():
                raise BackendError(c.ESHUTDOWN, f"upstream {self.uri}: the backend is closed")
            return min(self._pool, key=lambda p: p.in_flight)

    def _after_fork(self) -> None:
        """A forked child (--fork) shares the parent's sockets but not its reader threads: start afresh."""
        with self._lock:
            if os.getpid() == self._pid:
                return
            self._pid = os.getpid()
            self._pool = []
            self._down = "reconnecting after fork"
        self._reconnect()
        if self._down is not None:
            self._start_reconnector()

    def _lost(self, pipeline: Pipeline, reason: str) -> None:
        """A connection broke: the upstream is away until a reconnect works. Logged once per outage."""
        with self._lock:
            if pipeline not in self._pool or self._closed.is_set():
                return  # this outage is known already (or we are closing)
            self._down = reason
            pool, self._pool = self._pool, []
        log.warning("upstream %s went away: %s; requests fail with EIO until it is back", self.uri, reason)
        for old in pool:
            old.close()
        self._start_reconnector()

    def _start_reconnector(self) -> None:
        with self._lock:
            if self._reconnector is not None and self._reconnector.is_alive():
                return
            self._reconnector = threading.Thread(target=self._reconnect_loop, name="nbd reconnect", daemon=True)
            self._reconnector.start()

    def _reconnect_loop(self) -> None:
        delay = BACKOFF_FIRST
        while not self._closed.wait(delay):
            if self._reconnect():
                return
            delay = min(delay * 2, BACKOFF_MAX)

    def _reconnect(self) -> bool:
        """One attempt; True once serving again."""
        try:
            first = Pipeline.open(self.uri, timeout=CONNECT_TIMEOUT, on_lost=self._lost)
        except (OSError, ConnectionError) as exc:
            log.debug("upstream %s: reconnect failed: %s", self.uri, _why(exc))
            return False
        export = first.export
        if export.size != self.size:
            first.close()
            reason = f"it came back with {export.size} bytes, not {self.size}"
            if self._down != reason:
                log.warning("upstream %s: %s; requests keep failing with EIO", self.uri, reason)
                self._down = reason
            return False
        caps = capabilities(export.flags, first.block_status)
        if caps != self.caps:
            log.warning("upstream %s came back offering other operations; new clients see them", self.uri)
            self.caps = caps
        self.max_block = export.max_block
        with self._lock:
            if self._closed.is_set():
                first.close()
                return True
            self._pool = [first]
        self._fill_pool()
        with self._lock:
            self._down = None
        log.warning("upstream %s is back: requests go through again", self.uri)
        return True

    def _call(self, cmd: int, offset: int, length: int, flags: int = 0, payload: object = None):
        pipeline = self._pick()
        try:
            reply = pipeline.call(cmd, offset, length, flags, payload)
        except ConnectionLost as exc:
            self._lost(pipeline, str(exc))
            raise BackendError(c.EIO, f"upstream {self.uri} went away: {exc}") from None
        if reply.errno == c.ESHUTDOWN:
            # The upstream is stopping (nbdkit on SIGTERM answers ESHUTDOWN until we hang up):
            # hang up, and reconnect to whatever serves the address next.
            self._lost(pipeline, "it is shutting down (ESHUTDOWN)")
            raise BackendError(c.EIO, f"upstream {self.uri} is shutting down")
        if reply.errno:
            name = c.ERRNO_NAMES.get(reply.errno, str(reply.errno))
            raise BackendError(reply.errno, f"upstream {self.uri} answered {c.CMD_NAMES[cmd]} with {name}")
        return reply

    # -- the backend operations --------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytearray:
        if length <= self.max_block:
            return self._call(c.CMD_READ, offset, length).data
        out = bytearray(length)
        for start in range(0, length, self.max_block):
            n = min(self.max_block, length - start)
            out[start : start + n] = self._call(c.CMD_READ, offset + start, n).data
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        flags = c.CMD_FLAG_FUA if fua else 0
        for start in range(0, len(view), self.max_block):
            chunk = view[start : start + self.max_block]
            self._call(c.CMD_WRITE, offset + start, len(chunk), flags, chunk)

    def flush(self) -> None:
        if self.caps.flush:
            self._call(c.CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._call(c.CMD_TRIM, offset, length, c.CMD_FLAG_FUA if fua else 0)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        flags = (0 if may_trim else c.CMD_FLAG_NO_HOLE) | (c.CMD_FLAG_FAST_ZERO if fast else 0)
        self._call(c.CMD_WRITE_ZEROES, offset, length, flags | (c.CMD_FLAG_FUA if fua else 0))

    def cache(self, offset: int, length: int) -> None:
        self._call(c.CMD_CACHE, offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        reply = self._call(c.CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        return reply.extents or [(length, 0)]

    def close(self) -> None:
        """Flush (a proxy that stops leaves the upstream's data durable), then disconnect."""
        if self._closed.is_set():
            return
        try:
            if self._down is None and not self.readonly:
                self.flush()
        except BackendError as exc:
            log.warning("upstream %s: the last flush failed: %s", self.uri, exc)
        finally:
            self._closed.set()
            with self._lock:
                pool, self._pool = self._pool, []
            for pipeline in pool:
                pipeline.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
