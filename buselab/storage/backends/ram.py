"""A sparse RAM disk: BUSE's 128 MiB default, but `--size 1T` works too.

The data lives in one anonymous private mapping made with MAP_NORESERVE, so
the kernel hands out memory only for pages that are written; TRIM and zeroing
give whole pages back with MADV_DONTNEED. A second mapping holds one byte per
page saying whether the page was ever written, which is how BLOCK_STATUS tells
holes from data (asking the kernel with mincore would call swapped-out pages
holes, and a client like nbdcopy would then skip real data).
"""

from __future__ import annotations

import mmap

from ...errors import UserError
from ...protocol import constants as c
from ..base import Backend, Capabilities

PAGE = mmap.PAGESIZE
_MAP_NORESERVE = 0x4000  # Linux value; Python 3.11's mmap module does not export it
_ZEROS = bytes(1 << 20)


def _anonymous(size: int) -> mmap.mmap:
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    except (OSError, OverflowError, ValueError) as exc:
        raise UserError(
            f"cannot reserve {size} bytes of address space for the RAM disk ({exc}): try a smaller --size"
        ) from exc


class RamBackend(Backend):
    kind = "ram"
    caps = Capabilities(
        flush=True, fua=True, trim=True, zero=True, fast_zero=True, cache=True, extents=True, multi_conn=True
    )

    def __init__(self, size: int = 128 << 20) -> None:
        self.size = size
        self._data = _anonymous(size)
        self._view = memoryview(self._data)
        pages = (size + PAGE - 1) // PAGE
        self._written = _anonymous(pages)  # 1 = page holds written data

    def describe(self) -> str:
        return "ram (sparse, in memory)"

    def read(self, offset: int, length: int) -> memoryview:
        # A view, not a copy: the serve loop sends straight from the mapping.
        return self._view[offset : offset + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        end = offset + len(data)
        self._view[offset:end] = data
        first, last = offset // PAGE, (end - 1) // PAGE + 1
        if last - first == 1:
            self._written[first] = 1  # the common 4 KiB case, without building a bytes object
        elif end > offset:
            self._mark(first, last, 1)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        if may_trim:
            self._zero(offset, length)
            return
        # NO_HOLE: the range must read as zeros and stay allocated.
        end = offset + length
        pos = offset
        while pos < end:
            n = min(len(_ZEROS), end - pos)
            self._view[pos : pos + n] = _ZEROS[:n]
            pos += n
        if length:
            self._mark(offset // PAGE, (end - 1) // PAGE + 1, 1)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        written = self._written
        while pos < end:
            page = pos // PAGE
            state = written[page]
            # Find where this run of equal pages ends, in C (mmap.find).
            other = b"\x00" if state else b"\x01"
            stop_page = written.find(other, page, (end - 1) // PAGE + 1)
            run_end = end if stop_page < 0 else min(end, stop_page * PAGE)
            out.append((run_end - pos, 0 if state else c.STATE_HOLE | c.STATE_ZERO))
            pos = run_end
        return out

    def allocated_bytes(self) -> int:
        """How much of the disk holds written data (for the UI and tests)."""
        return self._written[:].count(1) * PAGE if self.size <= 1 << 34 else -1

    def _mark(self, first: int, last: int, value: int) -> None:
        n = last - first
        fill = b"\x01" if value else b"\x00"
        if n <= len(_ZEROS):
            self._written[first:last] = fill * n
        else:
            for start in range(first, last, len(_ZEROS)):
                stop = min(last, start + len(_ZEROS))
                self._written[start:stop] = fill * (stop - start)

    def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        # Whole pages go back to the kernel; the ragged edges are zeroed by hand.
        first_full = -(-offset // PAGE) * PAGE
        last_full = end // PAGE * PAGE
        if first_full < last_full:
            self._data.madvise(mmap.MADV_DONTNEED, first_full, last_full - first_full)
            self._mark(first_full // PAGE, last_full // PAGE, 0)
            edges = [(offset, first_full), (last_full, end)]
        else:
            edges = [(offset, end)]
        for start, stop in edges:
            pos = start
            while pos < stop:
                n = min(len(_ZEROS), stop - pos)
                self._view[pos : pos + n] = _ZEROS[:n]
                pos += n

    def close(self) -> None:
        try:
            self._view.release()
            self._data.close()
        except BufferError:
            # A read's view is still alive somewhere (a traceback, a queued
            # reply): the mapping goes when the last view does.
            pass
        self._written.close()
