"""cache: a volatile write-back cache, the demonstration of why FLUSH matters.

    cache              writes stay in memory until FLUSH (or a FUA write) sends them down
    cache:max=64M      write back on its own before more than 64 MiB would be dirty, as a real cache must

Reads see the cached data, so the client cannot tell the cache is there --
until a power cut (`powercut()`, `buselab ctl powercut`, the lab's key) throws
away everything written since the last FLUSH. A FUA write (or trim/zero) goes
to the layer below at once, as well as into the cache. Removing or disabling
the filter, and a clean shutdown, write the dirty data back first.

A power cut is a crash: steering also switches the cache off (`power_off`),
and until `power_on` every request that reaches it fails with EIO, so what a
client finds afterwards (an fsck) is what a real crash leaves. The cache
remembers which writes it took since its data last reached the layer below
(offset, length and when: `LostWrite`), so a power cut can say which requests
it threw away; steering matches them to the requests the lab shows.

When the layer below fails:

- A request whose reply is an error leaves nothing behind in the cache: a FUA
  write (trim, zero) goes down first and enters the cache only once it is
  there, and a write that needs room (`max`) writes back before it is cached.
  So the client never reads data it was told was not written.
- A failed FLUSH keeps the dirty data that did not reach the layer below, for
  the next FLUSH to retry, as real write-back caches do (what did reach it is
  clean). Until then it is readable and counts as dirty; a power cut loses it.
- Closing (a clean shutdown) tries once more; if that fails too, the dirty
  data is dropped and `close` raises `DataLost` saying how many bytes were
  lost, after closing the layer below.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from typing import Any, NamedTuple

from ...errors import UserError
from ...sizes import human_bytes, parse_size
from ..backends.cow import BLOCK, Overlay
from ..base import Capabilities, DataLost, PoweredOff
from .base import Filter

POWERED_OFF = "the power is off (power cut): poweron brings the disk back"
PENDING_KEPT = 65_536  # writes remembered since the last write-back (a power cut names them)


class LostWrite(NamedTuple):
    """A write (trim, zero) the cache took and a power cut threw away."""

    offset: int
    length: int
    at: float  # time.perf_counter() when the cache took it: telemetry's clock, between arrival and reply


class CacheFilter(Filter):
    name = "cache"

    def __init__(self, *, max_dirty: int | None = None, inner=None) -> None:
        super().__init__(inner)
        self.max_dirty = max_dirty
        self._lock = threading.Lock()
        self._overlay: Overlay | None = None
        self.flushes = 0
        self.written_back = 0
        self.lost = 0  # bytes thrown away by power cuts
        self.dropped = 0  # bytes thrown away at close because they could not be written back
        self.spec = "cache" + (f":max={max_dirty}" if max_dirty else "")
        # Writes taken since the dirty data last all reached the layer below, oldest first.
        self._pending: list[LostWrite] = []
        self._pending_overflow = 0  # more than PENDING_KEPT of them: counted, not kept
        self.last_lost: list[LostWrite] = []  # what the last power cut threw away
        self.last_lost_count = 0  # ... how many writes (those not kept included)
        self.off_since: float | None = None  # time.monotonic() of the power cut, while the power is off
        self.refused = 0  # requests answered EIO while the power was off

    @classmethod
    def from_params(cls, params: list[tuple[str, str]], size: int | None = None) -> CacheFilter:
        kwargs: dict[str, Any] = {}
        for key, value in params:
            if key in ("max", "max-dirty", "size"):
                kwargs["max_dirty"] = parse_size(value)
            else:
                raise UserError(f"cache does not know {key!r}: it takes max=SIZE, e.g. cache:max=64M")
        return cls(**kwargs)

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        # FLUSH and FUA must reach us whatever the layer below can do; the
        # cache can trim and zero by itself; it cannot tell holes from data.
        return dataclasses.replace(
            self.inner.caps, flush=True, fua=True, trim=True, zero=True, fast_zero=True, extents=False, multi_conn=True
        )

    def _dirty(self) -> Overlay:
        overlay = self._overlay
        if overlay is None:
            overlay = self._overlay = Overlay(self.inner.size)
        elif overlay.size != self.inner.size:
            overlay.grow(self.inner, self.inner.size)  # the backend was switched to a bigger one
        return overlay

    def dirty_bytes(self) -> int:
        with self._lock:
            return self._overlay.dirty_bytes() if self._overlay is not None else 0

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "dirty_bytes": self.dirty_bytes(),
            "flushes": self.flushes,
            "written_back": self.written_back,
            "lost_to_powercuts": self.lost,
        }
        if self.off_since is not None:
            stats["power"] = "off"
            stats["refused"] = self.refused
        return stats

    # -- the data path -------------------------------------------------------------
    # Whatever fails, the cache changes only once nothing can fail any more, so
    # an error reply never leaves its data readable (see the module docstring).
    # While the power is off every request fails before it touches anything: one
    # attribute test per request, on a filter that takes a lock per request anyway.
    def read(self, offset, length):
        if self.off_since is not None:
            self._refuse()
        with self._lock:
            return self._dirty().read(self.inner, offset, length)

    def write(self, offset, data, fua=False):
        if self.off_since is not None:
            self._refuse()
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.write(offset, data, True)
            elif self.max_dirty and overlay.dirty_bytes() + len(data) > self.max_dirty:
                self._writeback(overlay)
            overlay.write(self.inner, offset, data)
            if not fua:
                self._took(offset, len(data))

    def trim(self, offset, length, fua=False):
        if self.off_since is not None:
            self._refuse()
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.trim(offset, length, True)
            overlay.zero(self.inner, offset, length)
            if not fua:
                self._took(offset, length)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        if self.off_since is not None:
            self._refuse()
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=False, fua=True)
            overlay.zero(self.inner, offset, length)
            if not fua:
                self._took(offset, length)

    def flush(self):
        if self.off_since is not None:
            self._refuse()
        with self._lock:
            self.flushes += 1
            if self._overlay:
                self._writeback(self._overlay)  # on failure the rest stays dirty for the next FLUSH
        self.inner.flush()

    def cache(self, offset, length):
        if self.off_since is not None:
            self._refuse()
        self.inner.cache(offset, length)

    def _refuse(self) -> None:
        with self._lock:
            self.refused += 1
        raise PoweredOff(POWERED_OFF)

    def _took(self, offset: int, length: int) -> None:
        """Remember a write that lives only in the cache (lock held), for a power cut to name."""
        if len(self._pending) < PENDING_KEPT:
            self._pending.append(LostWrite(offset, length, time.perf_counter()))
        else:
            self._pending_overflow += 1

    def _writeback(self, overlay: Overlay) -> None:
        """Write the dirty data down (lock held); what was written is clean even if a later piece fails."""
        before = overlay.dirty_bytes()
        try:
            overlay.writeback(self.inner)
        finally:
            self.written_back += before - overlay.dirty_bytes()
        self._pending = []  # everything reached the layer below: no write lives only here
        self._pending_overflow = 0

    # -- actions -------------------------------------------------------------------
    def powercut(self) -> int:
        """Throw away every write since the last FLUSH; how many bytes were lost.

        `last_lost` then lists the writes thrown away (those whose data, or part of
        it, was still only here), oldest first; `last_lost_count` counts them all.
        """
        with self._lock:
            overlay = self._overlay
            lost = overlay.dirty_bytes() if overlay is not None else 0
            writes: list[LostWrite] = []
            if overlay:
                writes = [w for w in self._pending if _still_dirty(overlay, w.offset, w.length)]
            self.last_lost = writes
            self.last_lost_count = len(writes) + (self._pending_overflow if overlay else 0)
            self._pending = []
            self._pending_overflow = 0
            if overlay is not None:
                overlay.clear()
            self.lost += lost
        return lost

    @property
    def powered_off(self) -> bool:
        return self.off_since is not None

    def power_off(self) -> None:
        """From now on every request fails with EIO, as a crashed disk's would (see power_on)."""
        with self._lock:
            if self.off_since is None:
                self.off_since = time.monotonic()
                self.refused = 0

    def power_on(self) -> tuple[float, int]:
        """Serve again (the cache starts empty); (seconds the power was off, requests refused meanwhile)."""
        with self._lock:
            since, self.off_since = self.off_since, None
            return (time.monotonic() - since if since is not None else 0.0), self.refused

    def detach(self) -> None:
        if self.off_since is not None:
            # Out of the stack, a powered-off cache is simply gone: nothing is dirty since the
            # cut, and below it the disk may be dark too (another cache's cut).
            self.power_on()
            return
        self.flush()

    def close(self) -> None:
        lost = None
        with self._lock:
            overlay = self._overlay
            if overlay:
                try:
                    self._writeback(overlay)
                except Exception as exc:  # noqa: BLE001 - the layer below must still be closed
                    n = overlay.dirty_bytes()
                    overlay.clear()
                    self.dropped += n
                    lost = DataLost(
                        n,
                        f"cache: {n:,} bytes ({human_bytes(n)}) of unflushed cached writes were lost:"
                        f" writing them back failed: {type(exc).__name__}: {exc}",
                    )
        try:
            self.inner.close()
        except Exception as exc:
            if lost is None:
                raise
            raise DataLost(
                lost.lost, f"{lost}; closing the layer below failed too: {type(exc).__name__}: {exc}"
            ) from exc
        if lost is not None:
            raise lost


def _still_dirty(overlay: Overlay, offset: int, length: int) -> bool:
    """Whether any block of [offset, offset+length) is still dirty in `overlay` (stored, or in a zero run)."""
    if not length:
        return False
    first, last = offset // BLOCK, (offset + length - 1) // BLOCK
    blocks = overlay.blocks
    if last - first + 1 <= len(blocks):
        if any(i in blocks for i in range(first, last + 1)):
            return True
    elif any(first <= i <= last for i in blocks):
        return True
    # Zero runs are sorted and disjoint: the first one ending after `first` decides.
    starts, ends = overlay._zs, overlay._ze  # noqa: SLF001 - the overlay is the cache's own
    k = bisect.bisect_right(ends, first)
    return k < len(starts) and starts[k] <= last
