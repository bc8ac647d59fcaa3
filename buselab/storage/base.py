"""The backend interface: BUSE's `struct buse_operations`, as a Python class.

A backend is a byte range with a handful of operations. Capability flags say
which optional operations really work, so the server advertises only those
(BUSE never advertised FLUSH, so the kernel never sent one).

Offsets and lengths given to a backend have already been checked against its
size. Backends report failure by raising `BackendError(errno)` or `OSError`.
"""

from __future__ import annotations

import errno as host_errno
import os
import sysconfig
from dataclasses import dataclass

from ..protocol import constants as c


class BackendError(Exception):
    """A request failed; `errno` is the NBD error number to send."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or c.ERRNO_NAMES.get(errno, str(errno)))
        self.errno = errno


class BackendFault(BackendError):
    """A backend broke the backend contract (a plugin's read returned a str): the client gets `errno`.

    The message is the reason in one line, saying where (the plugin's file and line).
    `kind` is the same without this request's details ("plugin mydisk.py:12 read()
    returned str"): the engine logs each kind once and counts the rest.
    """

    def __init__(self, errno: int, message: str, kind: str) -> None:
        super().__init__(errno, message)
        self.kind = kind


class PoweredOff(BackendError):
    """The disk's power is off (a power cut): every request fails with EIO until poweron."""

    def __init__(self, message: str) -> None:
        super().__init__(c.EIO, message)


class DataLost(Exception):
    """Closing a layer threw away `lost` bytes a client had written (e.g. a cache that could not write back).

    The message is one complete line for the log: what was lost and why.
    """

    def __init__(self, lost: int, message: str) -> None:
        super().__init__(message)
        self.lost = lost


def where(exc: BaseException, prefer: str | None = None) -> str:
    """Where `exc` was raised, as "mydisk.py:42 in read"; "" without a traceback.

    The innermost frame in the file `prefer` (a plugin's source) wins; then the
    innermost one outside buselab itself and the standard library (the user's
    code, wherever it lives); then the innermost frame of all.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    if not frames:
        return ""
    chosen = None
    if prefer:
        prefer = os.path.abspath(prefer)
        chosen = next((f for f in reversed(frames) if os.path.abspath(f[0].co_filename) == prefer), None)
    if chosen is None:
        chosen = next((f for f in reversed(frames) if _is_user_code(f[0].co_filename)), frames[-1])
    code, line = chosen
    return f"{os.path.basename(code.co_filename)}:{line} in {code.co_name}"


_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the buselab package
_PATHS = sysconfig.get_paths()
_LIBRARIES = tuple({os.path.abspath(_PATHS[k]) + os.sep for k in ("stdlib", "purelib", "platlib") if _PATHS.get(k)})


def _is_user_code(filename: str) -> bool:
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return not path.startswith(_OURS + os.sep) and not path.startswith(_LIBRARIES)


# Host errno -> NBD wire errno. Anything unknown becomes EIO.
_WIRE_ERRNO = {
    host_errno.EPERM: c.EPERM,
    host_errno.EACCES: c.EPERM,
    host_errno.EROFS: c.EPERM,
    host_errno.EIO: c.EIO,
    host_errno.ENOMEM: c.ENOMEM,
    host_errno.EINVAL: c.EINVAL,
    host_errno.ENOSPC: c.ENOSPC,
    host_errno.EDQUOT: c.ENOSPC,
    host_errno.EFBIG: c.ENOSPC,
    host_errno.EOVERFLOW: c.EOVERFLOW,
    host_errno.ENOTSUP: c.ENOTSUP,
    host_errno.EOPNOTSUPP: c.ENOTSUP,
    host_errno.ESHUTDOWN: c.ESHUTDOWN,
}


def wire_errno(exc: BaseException) -> int:
    """The NBD error number for an exception raised by a backend."""
    if isinstance(exc, BackendError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno is not None:
        return _WIRE_ERRNO.get(exc.errno, c.EIO)
    if isinstance(exc, MemoryError):
        return c.ENOMEM
    return c.EIO


@dataclass(frozen=True)
class Capabilities:
    flush: bool = False
    fua: bool = False
    trim: bool = False
    zero: bool = False
    fast_zero: bool = False
    cache: bool = False
    extents: bool = False  # can tell holes from data
    multi_conn: bool = False  # flush on one connection covers writes on all
    rotational: bool = False


class Backend:
    """Base class with the defaults a minimal backend gets.

    Subclasses set `kind`, `size`, `caps` and implement `read` and `write`.
    """

    kind = "backend"
    size: int = 0
    readonly: bool = False
    caps = Capabilities()
    # A backend whose calls mostly wait (on another server, a network): the requests of one
    # connection then run on worker threads and overlap, as a client with many in flight
    # expects. Its methods must be safe to call from several threads (every backend's are:
    # connections call it from their own threads already).
    parallel: bool = False
    # The block sizes clients are told (NBD_INFO_BLOCK_SIZE): a proxy passes on its upstream's.
    # The maximum is the engine's own (it takes requests up to that; a proxy splits them).
    min_block: int = c.MIN_BLOCK_SIZE
    preferred_block: int = c.PREFERRED_BLOCK_SIZE

    def describe(self) -> str:
        """One line for headers and logs: what this backend is."""
        return self.kind

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make every acknowledged write durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Forget a range; reading it afterwards may return anything (we give zeros)."""

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        """Zero a range. `fast` asks to fail with ENOTSUP rather than be slow."""
        if fast:
            raise BackendError(c.ENOTSUP, "no fast zeroing")
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, memoryview(chunk)[:n])
            offset += n
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """A hint that this range will be read soon."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, STATE_HOLE|STATE_ZERO flags) runs covering [offset, offset+length)."""
        return [(length, 0)]

    def close(self) -> None:
        """Release resources; flush first if the backend is durable."""
