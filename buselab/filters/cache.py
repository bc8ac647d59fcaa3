"""cache: a volatile write-back cache, the demonstration of why FLUSH matters.

    cache              writes stay in memory until FLUSH (or a FUA write) sends them down
    cache:max=64M      write back on its own once 64 MiB are dirty, as a real cache must

Reads see the cached data, so the client cannot tell the cache is there --
until a power cut (`powercut()`, `buselab ctl powercut`, the lab's key) throws
away everything written since the last FLUSH. A FUA write (or trim/zero) goes
to the layer below at once, as well as into the cache. Removing or disabling
the filter, and a clean shutdown, write the dirty data back first.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ..backends.base import Capabilities
from ..backends.cow import Overlay
from ..errors import UserError
from ..sizes import parse_size
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
    def read(self, offset, length):
        with self._lock:
            return self._dirty().read(self.inner, offset, length)

    def write(self, offset, data, fua=False):
        with self._lock:
            overlay = self._dirty()
            overlay.write(self.inner, offset, data)
            if fua:
                self.inner.write(offset, data, True)
            elif self.max_dirty and overlay.dirty_bytes() > self.max_dirty:
                self.written_back += overlay.writeback(self.inner)

    def trim(self, offset, length, fua=False):
        with self._lock:
            self._dirty().zero(self.inner, offset, length)
            if fua:
                self.inner.trim(offset, length, True)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        with self._lock:
            self._dirty().zero(self.inner, offset, length)
            if fua:
                self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=False, fua=True)

    def flush(self):
        with self._lock:
            self.flushes += 1
            if self._overlay:
                self.written_back += self._overlay.writeback(self.inner)
        self.inner.flush()

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
        try:
            with self._lock:
                if self._overlay:
                    self.written_back += self._overlay.writeback(self.inner)
        finally:
            self.inner.close()
