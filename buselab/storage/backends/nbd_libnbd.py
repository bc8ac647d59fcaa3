"""libnbd's client for the proxy's READs and WRITEs, where its Python bindings are importable.

libnbd (Debian's python3-libnbd; the `nbd` module) runs a whole request in C with
the GIL released: the request goes out, the reply's data lands in the bytes object
that is returned, and Python runs again only once it is done. buselab's own client
(`buselab.client.Pipeline`) wakes Python for the header, the data and every thread
hand-off on the way, and that (not the copying) is what held the proxy back.

A libnbd handle runs its synchronous calls one at a time, so the proxy keeps a few
handles (each its own connection) and lends each to one request at a time. That
needs an upstream that allows multi-conn (a FLUSH on one connection covers writes
on all): the proxy uses these handles only then, and everything but READ and WRITE
(FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) still goes over buselab's own
connection, which also watches for the upstream going away.
"""

from __future__ import annotations

import errno as errnos
import os
import socket
import time

try:
    import nbd  # libnbd's bindings: system-wide on Debian; scripts/venv makes them visible to .venv
except ImportError:  # pragma: no cover - depends on the machine
    nbd = None

# libnbd's errors that mean the connection (not the request) is gone (ESHUTDOWN, the server
# stopping, is an answer: the proxy treats it as gone too, in its own words).
_GONE = frozenset({errnos.ENOTCONN, errnos.ECONNRESET, errnos.EPIPE, errnos.EBADF})


def available() -> bool:
    return nbd is not None


class Gone(ConnectionError):
    """The handle's connection is gone: the upstream is away."""


class LibnbdHandle:
    """One libnbd connection to the upstream, used by one request at a time."""

    def __init__(self, uri: str, timeout: float) -> None:
        if nbd is None:
            raise ConnectionError("libnbd's Python bindings (python3-libnbd) are not importable")
        h = nbd.NBD()
        h.set_pread_initialize(False)  # pread fills the whole buffer or fails: skip libnbd's memset
        try:
            # Asynchronously, to keep to the timeout: a server that accepts and then says
            # nothing would hold connect_uri forever.
            h.aio_connect_uri(uri)
            deadline = time.monotonic() + timeout
            while not h.aio_is_ready():
                left = deadline - time.monotonic()
                if left <= 0 or h.aio_is_dead() or h.aio_is_closed():
                    raise ConnectionError("no answer from the server within the timeout")
                h.poll(max(1, int(left * 1000)))
        except nbd.Error as exc:
            raise ConnectionError(exc.string or str(exc)) from None
        _keepalive(h.aio_get_fd())
        self.h = h

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return self.h.pread(length, offset)
        except nbd.Error as exc:
            raise _error(exc) from None

    def pwrite(self, data: object, offset: int, flags: int) -> None:
        try:
            self.h.pwrite(data, offset, flags)
        except nbd.Error as exc:
            raise _error(exc) from None

    def close(self, goodbye: bool = True) -> None:
        """Disconnect; `goodbye` sends NBD_CMD_DISC first (not after a fork: the socket is the parent's)."""
        if goodbye:
            try:
                self.h.shutdown()
            except nbd.Error:
                pass
        # Dropped: libnbd closes the handle and its socket (after a fork, the child's copy of the
        # descriptor only; the parent's connection carries on).
        del self.h


class RequestFailed(Exception):
    """The upstream answered the request with an error (the connection is fine)."""

    def __init__(self, errno: int, why: str) -> None:
        super().__init__(why)
        self.errno = errno


def _error(exc: Exception) -> Exception:
    errno = getattr(exc, "errno", None)
    if isinstance(errno, str):  # libnbd 1.14 gives the name ('ENOSPC'), later ones may give the number
        errno = getattr(errnos, errno, errnos.EIO)
    errno = errno or errnos.EIO
    why = getattr(exc, "string", None) or str(exc)
    if errno in _GONE:
        return Gone(why)
    return RequestFailed(errno, why)


def _keepalive(fd: int) -> None:
    """As buselab's own client does: a TCP upstream that vanishes is noticed in about 30 s."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
                option = getattr(socket, name, None)
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass
    finally:
        sock.close()  # the duplicate only: the options belong to the socket both name
