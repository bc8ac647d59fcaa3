"""Reads zeros, forgets writes: the fastest possible disk, for benchmarks."""

from __future__ import annotations

from ...protocol import constants as c
from ..base import Backend, Capabilities

_ZEROS = memoryview(bytes(c.MAX_PAYLOAD))


class NullBackend(Backend):
    kind = "null"
    caps = Capabilities(
        flush=True, fua=True, trim=True, zero=True, fast_zero=True, cache=True, extents=True, multi_conn=True
    )

    def __init__(self, size: int) -> None:
        self.size = size

    def describe(self) -> str:
        return "null (reads zeros, discards writes)"

    def read(self, offset: int, length: int) -> memoryview:
        return _ZEROS[:length]

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, c.STATE_HOLE | c.STATE_ZERO)]
