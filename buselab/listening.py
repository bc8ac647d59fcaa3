"""Listening sockets shared by the NBD server and the control socket.

Two things every listener here needs and is easy to get wrong: a Unix socket
must be born with its final mode (chmod after bind leaves a window in which
anyone the umask lets in can connect and write the disk), and an accept loop
must outlive a failed accept() -- running out of descriptors or memory is
temporary, and an acceptor that returns on it leaves a process that looks
alive but serves nobody.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("buselab")

# accept() failures that say "not now" rather than "this listener is gone".
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The connection died in the backlog before we took it: nothing to do but take the next.
_CONNECTION_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EPERM}
RETRY_PAUSE = 0.1  # seconds between tries while out of descriptors or memory

_umask_lock = threading.Lock()  # the umask is per process: two binds must not interleave


def bind_unix(path: str, mode: int) -> socket.socket:
    """A Unix stream socket bound at `path`, created with permissions `mode` (not listening yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _umask_lock:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
    return sock


def accept_loop(
    listener: socket.socket,
    handle: Callable[[socket.socket], None],
    stopping: Callable[[], bool],
    what: str,
) -> None:
    """Accept clients and pass each to `handle` until `stopping()` says the listener was closed.

    Out of descriptors (EMFILE, ENFILE) or memory (ENOMEM, ENOBUFS): say so once, keep
    retrying every RETRY_PAUSE, and say when clients are accepted again. The clients that
    arrive meanwhile wait in the backlog and are served as soon as descriptors are free.
    """
    short_of: str | None = None
    while not stopping():
        try:
            sock, _ = listener.accept()
        except OSError as exc:
            if stopping():
                return  # stop() closed the listener under us
            if exc.errno in _CONNECTION_ERRORS:
                continue
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            if short_of is None:
                if exc.errno in _RESOURCE_ERRORS:
                    log.warning("%s: cannot accept a client (%s: %s); retrying until it can", what, name, exc.strerror)
                else:
                    log.error("%s: accept failed (%s: %s); retrying", what, name, exc.strerror)
                short_of = name
            time.sleep(RETRY_PAUSE)
            continue
        if short_of is not None:
            log.warning("%s: accepting clients again (after %s)", what, short_of)
            short_of = None
        handle(sock)
