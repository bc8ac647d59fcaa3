"""A filter is a backend that wraps another one, as nbdkit's filters wrap plugins.

It has the same interface as a backend and passes everything through unless
it overrides it: size, capabilities, read-only-ness and any attribute it does
not know itself (so `engine.backend.allocated_bytes()` still reaches a RAM
disk under three filters). A `Stack` (stack.py) places filters and rewires
`inner`, and steering changes the stack only while the engine is quiesced, so a
filter never sees its lower layer change under a request. Where a filter sits,
its number and whether it is enabled belong to the stack's `Layer`, not here.
"""

from __future__ import annotations

from typing import Any

from ..base import Backend, Capabilities


class Filter(Backend):
    name = "filter"  # the name in specs: delay, error, throttle, readonly, cache

    def __init__(self, inner: Backend | None = None) -> None:
        self.inner: Backend = inner  # type: ignore[assignment]  # set by the stack before use
        self.spec = self.name  # the normalised spec this filter was made from, for listings

    # -- passed through --------------------------------------------------------
    @property
    def size(self) -> int:  # type: ignore[override]
        return self.inner.size

    @property
    def caps(self) -> Capabilities:  # type: ignore[override]
        return self.inner.caps

    @property
    def readonly(self) -> bool:  # type: ignore[override]
        return self.inner.readonly

    @readonly.setter
    def readonly(self, value: bool) -> None:
        self.inner.readonly = value

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the filter lacks: ask the layer below.
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def describe(self) -> str:
        return f"{self.inner.describe()} + {self.spec}"

    def stats(self) -> dict[str, Any]:
        """What the filter has done, for status listings (JSON-able)."""
        return {}

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.inner.write(offset, data, fua)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.inner.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.inner.close()

    def detach(self) -> None:
        """Called (quiesced) before the filter leaves the stack: a cache writes back here."""
