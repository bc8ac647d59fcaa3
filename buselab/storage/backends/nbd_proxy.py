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
replies matched by cookie (`buselab.client.Pipeline`). Where libnbd's Python
bindings are importable and the upstream allows multi-conn, READs and WRITEs go
through libnbd handles instead (`nbd_libnbd`: C with the GIL released, about
twice as fast on 1 MiB requests); everything else stays on buselab's own client.

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
from . import nbd_libnbd

log = logging.getLogger("buselab")

POOL_SIZE = 4  # connections when the upstream allows multi-conn
CONNECT_TIMEOUT = 10.0  # seconds for connect + handshake: an upstream that never answers is an error
EXTRA_TIMEOUT = 2.0  # seconds for each further connection of the pool
BACKOFF_FIRST = 0.05  # seconds before the first reconnect attempt
BACKOFF_MAX = 2.0  # and never longer than this between attempts
LIBNBD_HANDLES = 8  # libnbd connections for READ and WRITE (each runs one request at a time)
CLIENTS = ("auto", "libnbd", "buselab")


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

    def __init__(self, uri: str | NbdUri, size: int | None = None, client: str | None = None) -> None:
        """`client`: "libnbd", "buselab" (its own) or "auto" (libnbd where it can be used); the
        default is $BUSELAB_NBD_CLIENT, else "auto"."""
        self.uri = uri if isinstance(uri, NbdUri) else parse_nbd_uri(uri)
        client = client or os.environ.get("BUSELAB_NBD_CLIENT") or "auto"
        if client not in CLIENTS:
            raise UserError(f"unknown NBD client {client!r}: use one of {', '.join(CLIENTS)}")
        if client == "libnbd" and not nbd_libnbd.available():
            raise UserError("libnbd's Python bindings are not importable (Debian: apt-get install python3-libnbd)")
        self._want_libnbd = client != "buselab" and nbd_libnbd.available()
        # Idle libnbd handles, and all of this connection generation's (a handle lent out when
        # the upstream went away is closed when it comes back, not while a request uses it).
        self._idle: list[nbd_libnbd.LibnbdHandle] = []
        self._handles: set[nbd_libnbd.LibnbdHandle] = set()
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
        self.min_block, self.preferred_block = export.min_block, export.preferred_block  # passed on to clients
        self._pool.append(first)
        self._fill_pool()

    def describe(self) -> str:
        return f"nbd {self.uri}"

    @property
    def client(self) -> str:
        """Which client carries READs and WRITEs now: "libnbd" or "buselab"."""
        return "libnbd" if self._handles else "buselab"

    # -- connections ------------------------------------------------------------------------
    def _fill_pool(self) -> None:
        """With multi-conn, more connections (best effort: one is enough to serve)."""
        if not self.caps.multi_conn:
            return
        if self._want_libnbd and self._open_handles():
            return
        while len(self._pool) < POOL_SIZE:
            try:
                # A short wait: a server that takes one client at a time accepts and then says nothing.
                self._pool.append(Pipeline.open(self.uri, timeout=EXTRA_TIMEOUT, on_lost=self._lost))
            except (OSError, ConnectionError) as exc:
                log.debug("upstream %s: an extra connection failed: %s", self.uri, _why(exc))
                return

    def _open_handles(self) -> bool:
        """libnbd handles for READ and WRITE; False (buselab's client carries them) if none connects."""
        handles = []
        for _ in range(LIBNBD_HANDLES):
            try:
                handles.append(nbd_libnbd.LibnbdHandle(self.uri.text, EXTRA_TIMEOUT))
            except ConnectionError as exc:
                log.debug("upstream %s: a libnbd connection failed: %s", self.uri, exc)
                break
        with self._lock:
            self._idle = list(handles)
            self._handles = set(handles)
        return bool(handles)

    def _borrow(self) -> nbd_libnbd.LibnbdHandle | None:
        """An idle libnbd handle, or None (none, or all busy: buselab's own connection takes it)."""
        if os.getpid() != self._pid:
            return None  # a forked child: _pick starts afresh
        with self._lock:
            if self._idle and self._down is None:
                return self._idle.pop()
        return None

    def _give_back(self, handle: nbd_libnbd.LibnbdHandle) -> None:
        with self._lock:
            if handle in self._handles:
                self._idle.append(handle)
                return
        handle.close()  # of an outage that is over (or of a closed backend)

    def _drop_handles(self, goodbye: bool = True) -> None:
        with self._lock:
            idle, self._idle, self._handles = self._idle, [], set()
        for handle in idle:  # the ones lent out are closed when they come back
            handle.close(goodbye)

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
            idle, self._idle, self._handles = self._idle, [], set()
        for handle in idle:
            handle.close(goodbye=False)  # the parent's connections: not ours to say goodbye on
        with self._lock:
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
        self._drop_handles(goodbye=False)
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
        self.min_block, self.preferred_block = export.min_block, export.preferred_block
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

    def _read(self, offset: int, length: int) -> bytes | bytearray:
        """One READ of at most max_block bytes: on an idle libnbd handle if there is one."""
        handle = self._borrow() if self._handles else None
        if handle is None:
            return self._call(c.CMD_READ, offset, length).data
        try:
            return handle.pread(length, offset)
        except nbd_libnbd.RequestFailed as exc:
            raise self._failed(c.CMD_READ, exc) from None
        except nbd_libnbd.Gone as exc:
            raise self._gone(str(exc)) from None
        finally:
            self._give_back(handle)

    def _write(self, offset: int, data: memoryview, flags: int) -> None:
        handle = self._borrow() if self._handles else None
        if handle is None:
            self._call(c.CMD_WRITE, offset, len(data), flags, data)
            return
        try:
            handle.pwrite(data, offset, flags)
        except nbd_libnbd.RequestFailed as exc:
            raise self._failed(c.CMD_WRITE, exc) from None
        except nbd_libnbd.Gone as exc:
            raise self._gone(str(exc)) from None
        finally:
            self._give_back(handle)

    def _failed(self, cmd: int, exc: nbd_libnbd.RequestFailed) -> BackendError:
        if exc.errno == c.ESHUTDOWN:
            return self._gone("it is shutting down (ESHUTDOWN)")
        name = c.ERRNO_NAMES.get(exc.errno, str(exc.errno))
        return BackendError(exc.errno, f"upstream {self.uri} answered {c.CMD_NAMES[cmd]} with {name}")

    def _gone(self, reason: str) -> BackendError:
        """A libnbd connection broke: the upstream is away, as when buselab's own connection breaks."""
        with self._lock:
            first = self._pool[0] if self._pool else None
        if first is not None:
            self._lost(first, reason)
        return BackendError(c.EIO, f"upstream {self.uri} went away: {reason}")

    # -- the backend operations --------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | bytearray:
        if length <= self.max_block:
            return self._read(offset, length)
        out = bytearray(length)
        for start in range(0, length, self.max_block):
            n = min(self.max_block, length - start)
            out[start : start + n] = self._read(offset + start, n)
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        flags = c.CMD_FLAG_FUA if fua else 0
        for start in range(0, len(view), self.max_block):
            self._write(offset + start, view[start : start + self.max_block], flags)

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
            self._drop_handles()
            with self._lock:
                pool, self._pool = self._pool, []
            for pipeline in pool:
                pipeline.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
