"""Requests on their way from the recorder's tap to the trace writer process.

The tap packs each request into one fixed-size binary record on the serving
thread, and the feeder thread joins what has queued into one frame. Measured
at 4 jobs x iodepth 8, the serving threads and the feeder hold the GIL that
the server's throughput depends on; tuples marshalled in batches cost them
about 0.5 us more per request than this (tuples are allocated, tracked by
the garbage collector, then walked by marshal), and the writer unpacks a
frame with one `iter_unpack`.

A record (`RECORD`, little-endian): the telemetry's ten fields (seq, time,
cmd, flags, offset, length, latency, error, conn, handle), then what there
is of the data: `kind`, `extra` and `n`:

| kind      | the data                                                   |
|-----------|------------------------------------------------------------|
| NO_DATA   | none (not kept, or not a READ/WRITE)                       |
| CRC       | `extra` is the CRC-32 the serving thread took              |
| IN_RING   | `n` bytes at position `extra` of the shared ring (ring.py) |
| INLINE    | `n` bytes that follow the record in the tap's item          |

A frame (the body of one pipe message, see writer.py): a u32 count, that
many records, then the INLINE payloads in record order.
"""

from __future__ import annotations

import struct

RECORD = struct.Struct("<QdHHQIdIIQBQI")
SIZE = RECORD.size
NO_DATA, CRC, IN_RING, INLINE = 0, 1, 2, 3
_COUNT = 4


def frame(items: list[bytes]) -> tuple[bytes, int]:
    """The frame for the tap's items, and how many bytes of INLINE payload it carries."""
    body = b"".join(items)
    inline = len(body) - len(items) * SIZE
    if inline:  # rare: payloads too big for the ring, or no ring at all
        body = b"".join([item[:SIZE] for item in items]) + b"".join([item[SIZE:] for item in items])
    return len(items).to_bytes(_COUNT, "little") + body, inline


def unframe(view: memoryview) -> tuple[list[tuple], dict[int, bytes]]:
    """A frame's records (tuples in RECORD's order) and its INLINE payloads by seq (copied)."""
    count = int.from_bytes(view[:_COUNT], "little")
    end = _COUNT + count * SIZE
    rows = list(RECORD.iter_unpack(view[_COUNT:end]))
    inline: dict[int, bytes] = {}
    if len(view) > end:
        pos = end
        for row in rows:
            if row[10] == INLINE:
                n = row[12]
                inline[row[0]] = bytes(view[pos : pos + n])
                pos += n
    return rows, inline
