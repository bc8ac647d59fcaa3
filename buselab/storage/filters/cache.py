"""cache: a volatile write-back cache, the demonstration of why FLUSH matters.

    cache              writes stay in memory until FLUSH (or a FUA write) sends them down
    cache:max=64M      write back on its own before more than 64 MiB would be dirty, as a real cache must

Reads see the cached data, so the client cannot tell the cache is there --
until a power cut (`powercut()`, `buselab ctl powercut`, the lab's key) throws
away everything written since the last FLUSH. A FUA write (or trim/zero) goes
to the layer below at once, as well as into the cache. Removing or disabling
the filter, and a clean shutdown, write the dirty data back first.

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

import dataclasses
import threading
from typing import Any

from ...errors import UserError
from ...sizes import human_bytes, parse_size
from ..backends.cow import Overlay
from ..base import Capabilities, DataLost
from .base import Filter


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
        return {
            "dirty_bytes": self.dirty_bytes(),
            "flushes": self.flushes,
            "written_back": self.written_back,
            "lost_to_powercuts": self.lost,
        }

    # -- the data path -------------------------------------------------------------
    # Whatever fails, the cache changes only once nothing can fail any more, so
    # an error reply never leaves its data readable (see the module docstring).
    def read(self, offset, length):
        with self._lock:
            return self._dirty().read(self.inner, offset, length)

    def write(self, offset, data, fua=False):
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.write(offset, data, True)
            elif self.max_dirty and overlay.dirty_bytes() + len(data) > self.max_dirty:
                self._writeback(overlay)
            overlay.write(self.inner, offset, data)

    def trim(self, offset, length, fua=False):
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.trim(offset, length, True)
            overlay.zero(self.inner, offset, length)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        with self._lock:
            overlay = self._dirty()
            if fua:
                self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=False, fua=True)
            overlay.zero(self.inner, offset, length)

    def flush(self):
        with self._lock:
            self.flushes += 1
            if self._overlay:
                self._writeback(self._overlay)  # on failure the rest stays dirty for the next FLUSH
        self.inner.flush()

    def _writeback(self, overlay: Overlay) -> None:
        """Write the dirty data down (lock held); what was written is clean even if a later piece fails."""
        before = overlay.dirty_bytes()
        try:
            overlay.writeback(self.inner)
        finally:
            self.written_back += before - overlay.dirty_bytes()

    # -- actions -------------------------------------------------------------------
    def powercut(self) -> int:
        """Throw away every write since the last FLUSH; how many bytes were lost."""
        with self._lock:
            lost = self._overlay.dirty_bytes() if self._overlay is not None else 0
            if self._overlay is not None:
                self._overlay.clear()
            self.lost += lost
        return lost

    def detach(self) -> None:
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
