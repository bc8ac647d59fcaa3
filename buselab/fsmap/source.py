"""The bytes a map is read from: a `read(offset, length)` callable made safe and windowed.

Whatever the callable is (a backend, an image file, an NBD client), the parsers see a `Disk`:
reads past the end come back as zeros instead of errors, long reads are split into pieces an
NBD server accepts, and `window(offset, size)` gives a partition its own offset 0.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

CHUNK = 4 << 20  # the longest single read asked of the callable (NBD servers may refuse 32 MiB+)


class Disk:
    """A byte range of a readable disk; offsets are relative to its start."""

    def __init__(
        self, read: Callable[[int, int], bytes], size: int, base: int = 0, _counter: list[int] | None = None
    ) -> None:
        self._read = read
        self.size = size
        self.base = base  # where this window starts on the underlying disk
        self._counter = _counter if _counter is not None else [0, 0]  # bytes and calls, shared by windows

    @property
    def bytes_read(self) -> int:
        """How much was asked of the callable, by this disk and its windows: what a map costs to build."""
        return self._counter[0]

    @property
    def reads(self) -> int:
        return self._counter[1]

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; what lies outside the window reads as zeros."""
        if length <= 0:
            return b""
        start = max(0, offset)
        end = min(self.size, offset + length)
        if end <= start:
            return bytes(length)
        parts = [bytes(start - offset)] if start > offset else []
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            got = self._read(self.base + pos, n)
            self._counter[0] += n
            self._counter[1] += 1
            if len(got) != n:  # a short read (a file shorter than it said): pad rather than misparse
                got = bytes(got[:n]) + bytes(n - len(got))
            parts.append(got)
            pos += n
        if end < offset + length:
            parts.append(bytes(offset + length - end))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def window(self, offset: int, size: int) -> Disk:
        """The bytes [offset, offset+size) of this disk as a disk of their own."""
        size = max(0, min(size, self.size - offset))
        return Disk(self._read, size, self.base + offset, self._counter)


class PatchedDisk(Disk):
    """A disk as it will be once some blocks are overwritten by copies kept elsewhere on it.

    Journal recovery without writing: `patches` maps a block number (of `block_size`) to the
    offset of its newest committed copy in the journal, and whether the copy was stored with its
    first four bytes zeroed (jbd2's ESCAPE flag), which `escape` puts back.
    """

    def __init__(self, disk: Disk, block_size: int, patches: dict[int, tuple[int, bool]], escape: bytes) -> None:
        super().__init__(disk._read, disk.size, disk.base, disk._counter)
        self.block_size = block_size
        self.patches = patches
        self._keys = sorted(patches)
        self._escape = escape

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        if length <= 0 or not self._keys:
            return data
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        i = bisect_left(self._keys, first)
        if i == len(self._keys) or self._keys[i] > last:
            return data
        buf = bytearray(data)
        while i < len(self._keys) and self._keys[i] <= last:
            block = self._keys[i]
            at, escaped = self.patches[block]
            copy = bytearray(super().read(at, bs))
            if escaped:
                copy[:4] = self._escape
            lo, hi = max(offset, block * bs), min(offset + length, (block + 1) * bs)
            buf[lo - offset : hi - offset] = copy[lo - block * bs : hi - block * bs]
            i += 1
        return bytes(buf)
