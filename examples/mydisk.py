"""Your own disk for buselab, the way BUSE's `struct buse_operations` was a table of C functions.

    buselab plugin examples/mydisk.py --unix /tmp/my.sock
    buselab plugin examples/mydisk.py:MyDisk --size 16M --unix /tmp/my.sock

A disk is a class with `size` (bytes), `read(offset, length) -> bytes` and
`write(offset, data)`. `flush()`, `trim(offset, length)` and
`write_zeroes(offset, length)` are optional: buselab advertises FLUSH/FUA, TRIM
and fast WRITE_ZEROES only when they exist. buselab has already checked that
every request lies inside the disk. Raise OSError(errno.EIO, ...) to fail a
request: the client gets that error and the disk goes on serving.

This one keeps its blocks in a dict, so only written blocks use memory, and
stores every byte XORed with a key, so the data "at rest" is never the data the
client wrote (a toy for encryption at rest).
"""

from __future__ import annotations

import errno

BLOCK = 4096


class MyDisk:
    def __init__(self, size: int = 64 * 1024 * 1024, key: int = 0x5A) -> None:
        if size % BLOCK:
            raise ValueError(f"size must be a multiple of {BLOCK} bytes")
        self.size = size
        self.key = bytes([key]) * BLOCK
        self.blocks: dict[int, bytes] = {}  # block number -> BLOCK bytes, XORed with key

    # -- the three operations every disk needs ----------------------------------
    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for number, start, end in self._spans(offset, length):
            stored = self.blocks.get(number)
            block = self._xor(stored) if stored is not None else bytes(BLOCK)
            out += block[start:end]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        for number, start, end in self._spans(offset, len(data)):
            stored = self.blocks.get(number)
            block = bytearray(self._xor(stored) if stored is not None else bytes(BLOCK))
            block[start:end] = data[pos : pos + end - start]
            pos += end - start
            self.blocks[number] = self._xor(bytes(block))

    # -- optional: their presence decides what buselab advertises ---------------
    def flush(self) -> None:
        """Nothing is cached anywhere: every write is already where it will stay."""

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        for number, start, end in self._spans(offset, length):
            if start == 0 and end == BLOCK:
                self.blocks.pop(number, None)  # a whole block of zeros uses no memory
            elif number in self.blocks:
                self.write(number * BLOCK + start, bytes(end - start))

    # -- helpers ------------------------------------------------------------------
    def _spans(self, offset: int, length: int):
        """(block number, start, end) pieces covering [offset, offset + length)."""
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{offset}+{length} is outside the disk")
        end = offset + length
        while offset < end:
            number, start = divmod(offset, BLOCK)
            stop = min(BLOCK, start + end - offset)
            yield number, start, stop
            offset += stop - start

    def _xor(self, block: bytes) -> bytes:
        return (int.from_bytes(block, "little") ^ int.from_bytes(self.key, "little")).to_bytes(BLOCK, "little")
