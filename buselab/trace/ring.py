"""Payloads on their way from the serving threads to the trace writer process.

Sent through the pipe, every 4 KiB payload was copied five times (into a
bytes object, into the marshalled batch, into the pipe, out of it, and into a
bytes object again) and the batches cost page faults on both sides. Here the
serving thread copies it once, into memory both processes map (a memfd), and
the pipe carries only where it is: `(start, length)`. The writer hashes and
encodes straight from that memory.

Layout: 64 bytes of header, then `size` bytes of data used as a ring.
Positions are counted in bytes since recording started (`start % size` is
where a payload lies); a payload never wraps: one that would is put at the
beginning and the tail is skipped. The writer stores in the header, as a
little-endian u64, how far it has freed the ring (`freed`): after it has
encoded a batch, the end of the batch's last payload. Payloads are reserved,
copied and queued in one locked step, so ring order is queue order and a
batch's last payload is its furthest one.

    ring = PayloadRing.create(16 << 20)          # in the server (None: no memfd here)
    ring.data[pos : pos + n] = payload           # the recorder's tap reserves, copies and queues
    ...
    view = RingReader(fd, size)                  # in the writer
    data = view.get(start, length); view.free(start + length)
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

HEADER = 64
_FREED = struct.Struct("<Q")


class PayloadRing:
    """The server's side: the memory and the writer's `freed`.

    The recorder's tap does the reserving itself, inline: at 100k requests a
    second each Python call saved counts.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, HEADER + size)
        self.data = memoryview(self._map)[HEADER:]
        self.lock = threading.Lock()

    @classmethod
    def create(cls, size: int) -> PayloadRing | None:
        """A ring of `size` bytes, or None where memfd_create is not available."""
        try:
            fd = os.memfd_create("buselab-trace-payloads", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None
        try:
            os.ftruncate(fd, HEADER + size)
            return cls(fd, size)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def freed(self) -> int:
        return _FREED.unpack_from(self._map, 0)[0]

    def close(self) -> None:
        """Unmap and close; a serving thread still copying in keeps the mapping alive until it is done."""
        try:
            self.data.release()
            self._map.close()
        except BufferError:
            pass  # a slice is still in use somewhere: the mapping goes when it does
        try:
            os.close(self.fd)
        except OSError:
            pass


class RingReader:
    """The writer's side."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(fd, HEADER + size)
        self._data = memoryview(self._map)[HEADER:]
        os.close(fd)

    def get(self, start: int, length: int) -> memoryview:
        pos = start % self.size
        return self._data[pos : pos + length]

    def free(self, upto: int) -> None:
        """Everything before `upto` is encoded: the server may reuse it."""
        _FREED.pack_into(self._map, 0, upto)
