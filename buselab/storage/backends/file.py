"""BUSE's loopback ("lo") backend: a regular file or a block device.

A regular file is created at --size if it is missing. Durability is real:
FLUSH is fdatasync, FUA writes use RWF_DSYNC, so an acknowledged flush
survives a kill -9 of buselab. TRIM punches holes in files (and BLKDISCARD on
block devices), and SEEK_DATA/SEEK_HOLE answers BLOCK_STATUS for sparse files.
Chaining works because /dev/nbdN is just another block device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

from ...errors import UserError
from ...protocol import constants as c
from ..base import Backend, BackendError, Capabilities

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    kind = "file"

    def __init__(self, path: str, size: int | None = None, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._fd = self._open(path, size, readonly)
        st = os.fstat(self._fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            self.size = struct.unpack("Q", fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8))[0]
            if size is not None and size != self.size:
                raise UserError(f"{path} is a block device of {self.size} bytes; drop --size (it was {size})")
        else:
            self.size = st.st_size
        if self.size == 0:
            raise UserError(f"{path} is empty: give --size to make it that big")
        self._can_punch = not self.is_block_device
        self.caps = Capabilities(
            flush=True,
            fua=True,
            trim=True,
            zero=True,
            fast_zero=True,
            cache=True,
            extents=not self.is_block_device,
            multi_conn=True,  # fdatasync on one fd covers writes from every connection
            rotational=False,
        )

    @staticmethod
    def _open(path: str, size: int | None, readonly: bool) -> int:
        exists = os.path.exists(path)
        if not exists and size is None:
            raise UserError(f"{path} does not exist: give --size to create it")
        if not exists and readonly:
            raise UserError(f"{path} does not exist, and a --readonly disk cannot create it")
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory, not a file or block device")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if not exists:
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError as exc:
            raise UserError(f"cannot create {path}: its directory does not exist") from exc
        except PermissionError as exc:
            raise UserError(f"cannot open {path}: permission denied (try --readonly, or sudo)") from exc
        except OSError as exc:
            raise UserError(f"cannot open {path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and size is not None:
            if st.st_size == 0 and not readonly:
                os.ftruncate(fd, size)
            elif st.st_size != size:
                os.close(fd)
                raise UserError(
                    f"{path} is {st.st_size} bytes but --size says {size}: drop --size to use the file as it is"
                )
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            raise UserError(f"{path} is neither a regular file nor a block device")
        return fd

    def describe(self) -> str:
        return f"{'block device' if self.is_block_device else 'file'} {self.path}"

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # a file shrunk under us: say so, never send short data
            raise BackendError(c.EIO, f"short read at {offset}")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        flags = os.RWF_DSYNC if fua else 0
        view = memoryview(data)
        while view:
            n = os.pwritev(self._fd, [view], offset, flags)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.is_block_device:
            try:
                fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
        elif self._can_punch:
            try:
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._can_punch = False  # TRIM is advisory: ignoring it is correct
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        try:
            if self.is_block_device:
                fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            else:
                mode = (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE) if may_trim else _FALLOC_FL_ZERO_RANGE
                _fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            super().write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=False)
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but hole up to EOF
                    out.append((end - pos, c.STATE_HOLE | c.STATE_ZERO))
                    break
                return [(length, 0)]
            if data_start > pos:
                hole_end = min(data_start, end)
                out.append((hole_end - pos, c.STATE_HOLE | c.STATE_ZERO))
                pos = hole_end
                continue
            data_end = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((data_end - pos, 0))
            pos = data_end
        return out

    def close(self) -> None:
        if self._fd >= 0:
            if not self.readonly:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
