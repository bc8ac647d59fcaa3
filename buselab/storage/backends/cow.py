"""Copy-on-write: an overlay in memory over a base that is never written until commit.

    CowBackend(base)               over any backend (e.g. the one being served)
    CowBackend.over_file(PATH)     over a file or block device

Writes, trims and zeroing land in the overlay; reads see the overlay where it
has data and the base elsewhere. `discard()` forgets every change (the disk
reads as the base again); `commit()` writes the changes into the base and
flushes it. The overlay lives in memory, so FLUSH makes nothing durable until
a commit: this is a scratch disk, not a journal.

`Overlay` is also the dirty-data store of the write-back cache filter.
"""

from __future__ import annotations

import bisect
import os
import threading

from ...errors import UserError
from ..base import Backend, Capabilities

BLOCK = 4096
_WRITEBACK_CHUNK = 256  # blocks per write when writing an overlay back (1 MiB)


class Overlay:
    """Blocks written over a lower layer, kept in memory.

    Whole 4 KiB blocks are stored as bytearrays (a partial write first copies
    the block from below); zeroed or trimmed runs of whole blocks are kept as
    intervals so that a TRIM of a whole disk costs nothing. A stored block wins
    over a zero run, which wins over the lower layer. Callers lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: dict[int, bytearray] = {}
        self._zs: list[int] = []  # zero runs: sorted, disjoint starts (block numbers)
        self._ze: list[int] = []  # and their ends (exclusive)
        self._nblocks = -(-size // BLOCK)

    def __bool__(self) -> bool:
        return bool(self.blocks or self._zs)

    def dirty_bytes(self) -> int:
        zeroed = sum(e - s for s, e in zip(self._zs, self._ze))
        return min(self.size, (len(self.blocks) + zeroed) * BLOCK)

    def grow(self, lower: Backend, size: int) -> None:
        """The disk below grew (a live switch to a bigger backend): cover the new bytes too."""
        if size <= self.size:
            return
        tail = self.size % BLOCK
        last = self.size // BLOCK
        if tail and last in self.blocks:
            # A short last block becomes a whole one: fill it from below.
            more = min(BLOCK, size - last * BLOCK) - tail
            self.blocks[last] += bytes(lower.read(self.size, more))
        self.size = size
        self._nblocks = -(-size // BLOCK)

    def clear(self) -> None:
        self.blocks = {}
        self._zs = []
        self._ze = []

    # -- reading -----------------------------------------------------------------
    def _block_len(self, i: int) -> int:
        return min(BLOCK, self.size - i * BLOCK)

    def _zeroed(self, i: int) -> bool:
        k = bisect.bisect_right(self._zs, i) - 1
        return k >= 0 and i < self._ze[k]

    def read(self, lower: Backend, offset: int, length: int) -> bytes | bytearray | memoryview:
        if not length or not (self.blocks or self._zs):
            return lower.read(offset, length)
        end = offset + length
        first, last = offset // BLOCK, (end - 1) // BLOCK
        zs, ze = self._zs, self._ze
        runs = []
        j = bisect.bisect_right(ze, first)  # first run that ends after `first`
        while j < len(zs) and zs[j] <= last:
            runs.append((zs[j], ze[j]))
            j += 1
        blocks = self.blocks
        if last - first + 1 <= len(blocks):
            hits = [i for i in range(first, last + 1) if i in blocks]
        else:
            hits = sorted(i for i in blocks if first <= i <= last)
        if not runs and not hits:
            return lower.read(offset, length)
        covered = sum(min(e, last + 1) - max(s, first) for s, e in runs)
        covered += sum(1 for i in hits if not self._zeroed(i))
        if covered == last - first + 1:
            out = bytearray(length)  # every block comes from the overlay: skip the read below
        else:
            out = bytearray(lower.read(offset, length))
        for s, e in runs:
            lo, hi = max(s * BLOCK, offset), min(e * BLOCK, end)
            out[lo - offset : hi - offset] = bytes(hi - lo)
        for i in hits:
            block = blocks[i]
            base = i * BLOCK
            lo, hi = max(base, offset), min(base + len(block), end)
            out[lo - offset : hi - offset] = block[lo - base : hi - base]
        return out

    # -- changing ------------------------------------------------------------------
    def _materialize(self, lower: Backend, i: int) -> bytearray:
        block = self.blocks.get(i)
        if block is None:
            n = self._block_len(i)
            block = bytearray(n) if self._zeroed(i) else bytearray(lower.read(i * BLOCK, n))
            self.blocks[i] = block
        return block

    def _fetch_edges(self, lower: Backend, offset: int, end: int) -> None:
        """Bring in the partly covered first and last blocks before a change touches anything.

        Their reads from below are all that can fail, so a change either fails
        with the overlay as it was or cannot fail at all (a cache answering an
        error must not keep half of the data).
        """
        for i in {offset // BLOCK, (end - 1) // BLOCK}:
            base = i * BLOCK
            if offset > base or end < base + self._block_len(i):
                self._materialize(lower, i)

    def write(self, lower: Backend, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        end = offset + len(view)
        if (offset | end) % BLOCK and end > offset:
            self._fetch_edges(lower, offset, end)
        pos = offset
        blocks = self.blocks
        while pos < end:
            i = pos // BLOCK
            base = i * BLOCK
            n = min(end, base + self._block_len(i)) - pos
            piece = view[pos - offset : pos - offset + n]
            if pos == base and n == self._block_len(i):
                blocks[i] = bytearray(piece)
            else:
                self._materialize(lower, i)[pos - base : pos - base + n] = piece
            pos += n

    def zero(self, lower: Backend, offset: int, length: int) -> None:
        end = offset + length
        if (offset | end) % BLOCK and length:
            self._fetch_edges(lower, offset, end)
        first_full = -(-offset // BLOCK)
        last_full = self._nblocks if end >= self.size else end // BLOCK
        if first_full >= last_full:
            self._zero_partial(lower, offset, end)
            return
        self._zero_partial(lower, offset, min(end, first_full * BLOCK))
        self._zero_partial(lower, last_full * BLOCK, end)
        blocks = self.blocks
        if last_full - first_full <= len(blocks):
            for i in range(first_full, last_full):
                blocks.pop(i, None)
        else:
            for i in [i for i in blocks if first_full <= i < last_full]:
                del blocks[i]
        self._add_run(first_full, last_full)

    def _zero_partial(self, lower: Backend, start: int, end: int) -> None:
        pos = start
        while pos < end:
            i = pos // BLOCK
            base = i * BLOCK
            n = min(end, base + self._block_len(i)) - pos
            self._materialize(lower, i)[pos - base : pos - base + n] = bytes(n)
            pos += n

    def _add_run(self, start: int, end: int) -> None:
        zs, ze = self._zs, self._ze
        lo = bisect.bisect_left(ze, start)  # runs ending at or after start (touching merges)
        hi = bisect.bisect_right(zs, end)  # runs starting at or before end
        if lo < hi:
            start = min(start, zs[lo])
            end = max(end, ze[hi - 1])
        zs[lo:hi] = [start]
        ze[lo:hi] = [end]

    def writeback(self, target: Backend) -> int:
        """Apply every change to `target` (zero runs first, then blocks); empty the overlay.

        Each piece leaves the overlay as soon as `target` has taken it, so when
        a write fails partway the overlay holds exactly what is still to be
        written (and reads still see every change): a retry goes on from there.
        """
        written = self.dirty_bytes()
        done = 0
        try:
            for s, e in zip(self._zs, self._ze):
                start, end = s * BLOCK, min(e * BLOCK, self.size)
                target.write_zeroes(start, end - start, may_trim=True, fast=False)
                done += 1
        finally:
            # Stored blocks win over zero runs, so dropping the runs written
            # so far is right whatever happens to the blocks below.
            del self._zs[:done], self._ze[:done]
        run: list[int] = []
        for i in sorted(self.blocks):
            if run and (i != run[-1] + 1 or len(run) >= _WRITEBACK_CHUNK):
                self._write_run(target, run)
                run = []
            run.append(i)
        if run:
            self._write_run(target, run)
        self.clear()
        return written

    def _write_run(self, target: Backend, run: list[int]) -> None:
        blocks = self.blocks
        target.write(run[0] * BLOCK, b"".join(blocks[i] for i in run))
        for i in run:
            del blocks[i]


class CowBackend(Backend):
    kind = "cow"

    def __init__(self, base: Backend, *, owns_base: bool = True) -> None:
        self.base = base
        self.owns_base = owns_base
        self.size = base.size
        self._overlay = Overlay(base.size)
        self._lock = threading.Lock()
        self.caps = Capabilities(
            flush=True,
            fua=True,
            trim=True,
            zero=True,
            fast_zero=True,
            cache=False,
            extents=False,
            multi_conn=True,
            rotational=base.caps.rotational,
        )

    @classmethod
    def over_file(cls, path: str) -> CowBackend:
        """A cow disk over a file or block device (opened writable only so that commit can work)."""
        from .file import FileBackend

        if not os.path.exists(path):
            raise UserError(f"cow base {path} does not exist: give an existing file or block device")
        return cls(FileBackend(path, None, readonly=not os.access(path, os.W_OK)))

    def describe(self) -> str:
        return f"cow over {self.base.describe()}"

    def changed_bytes(self) -> int:
        with self._lock:
            return self._overlay.dirty_bytes()

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        with self._lock:
            return self._overlay.read(self.base, offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        with self._lock:
            self._overlay.write(self.base, offset, data)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        with self._lock:
            self._overlay.zero(self.base, offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        with self._lock:
            self._overlay.zero(self.base, offset, length)

    def commit(self) -> int:
        """Write the changes into the base and flush it; the overlay is empty afterwards."""
        if self.base.readonly:
            raise UserError(f"the cow base ({self.base.describe()}) is read-only: commit cannot write it")
        with self._lock:
            written = self._overlay.writeback(self.base)
        self.base.flush()
        return written

    def discard(self) -> int:
        """Forget every change; the disk reads as its base again."""
        with self._lock:
            dropped = self._overlay.dirty_bytes()
            self._overlay.clear()
        return dropped

    def close(self) -> None:
        if self.owns_base:
            self.base.close()
