"""The trace writer process: hashes, formats, compresses and writes records.

`TraceRecorder` starts it as `python -m buselab.trace.writer FD` with the
trace file already open on FD, and feeds it on stdin with frames

    4-byte little-endian length + body

The first frame is a marshalled dict (the header line and the options), each
later frame a batch of requests in wire.py's binary records, and an empty
frame (length 0) means "that was all": the writer writes the end line, closes the file, prints a JSON
status line on stdout and exits 0. End of input without the empty frame (the
server was killed) leaves the trace without an end line, which readers report
as cut short. On an error it prints `error: ...` on stdout and exits 1.

Why a process: at 100k requests a second every microsecond of Python per
request costs the serving threads the GIL; here the hashing, formatting and
compression run on their own interpreter.
"""

from __future__ import annotations

import json
import marshal
import os
import select
import signal
import sys
import time
from typing import Any

from ..protocol import constants as c
from .codecs import b64encode
from .format import RECORD_FORMAT, TraceHeader, TraceWriter, encode_trailer, hasher
from .ring import RingReader
from .wire import CRC, IN_RING, INLINE, unframe

try:  # the compiled formatter (setup.py builds it where it can); the Python loop below is the reference
    from ._fastlines import format_frame as format_reads
except ImportError:  # pragma: no cover - not built here
    format_reads = None

_OP_NAMES = [c.CMD_NAMES.get(i, f"CMD{i}") for i in range(8)]
_FRAME = 4


class FrameReader:
    """Frames from a pipe, read into one reused buffer (no joining of chunks)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray(1 << 20)

    def _fill(self, view: memoryview) -> bool:
        """Fill view completely; False at end of input (the server went away)."""
        pos = 0
        n = len(view)
        while pos < n:
            got = os.readv(self.fd, [view[pos:]])
            if not got:
                return False
            pos += got
        return True

    def read(self) -> memoryview | None:
        """The next frame's body (valid until the next read); None for the empty (last) frame; EOFError at end of input."""
        head = bytearray(_FRAME)
        if not self._fill(memoryview(head)):
            raise EOFError
        n = int.from_bytes(head, "little")
        if n == 0:
            return None
        if n > len(self.buffer):
            self.buffer = bytearray(max(n, 2 * len(self.buffer)))
        view = memoryview(self.buffer)[:n]
        if not self._fill(view):
            raise EOFError
        return view


def run(trace_fd: int, inp: int) -> dict[str, Any]:
    frames = FrameReader(inp)
    setup = marshal.loads(frames.read())
    header = TraceHeader(**setup["header"])
    payload = header.payload
    keep_reads = payload == "all"
    keep_writes = payload in ("writes", "all")
    digest_of = hasher(header.hash)
    writer = TraceWriter(setup["path"], level=setup.get("level"), fd=trace_fd)
    writer.write_header(header)
    writer.flush()
    flush_interval = float(setup.get("flush_interval", 1.0))
    next_flush = time.monotonic() + flush_interval
    start = header.start
    ops = [0] * 8
    records = 0
    payload_bytes = 0
    read_cmd, write_cmd = c.CMD_READ, c.CMD_WRITE
    ended = False
    names = [name.encode() for name in _OP_NAMES]
    name_tuple = tuple(names)
    # Lines are made as bytes: str lines would be joined, then encoded, copying every payload twice more.
    fmt = RECORD_FORMAT.encode()
    plain = fmt + b"}\n"
    with_crc = fmt + b',"hash":"%08x"}\n'
    with_hash = fmt + b',"hash":"%s"}\n'
    data_head = fmt + b',"hash":"%s","data":"'
    with_zeros = fmt + b',"hash":"%s","zeros":true}\n'
    write = writer.write_bytes
    ring = RingReader(setup["ring_fd"], setup["ring_size"]) if "ring_fd" in setup else None
    freed = 0  # how far the ring's payloads are encoded (and the server told)
    dirty = False  # written to the compressor but not yet flushed to the file
    while True:
        if dirty:
            # Quiet now: flush within flush_interval anyway, so a server killed later leaves it all on disk.
            ready, _, _ = select.select([inp], [], [], max(0.0, next_flush - time.monotonic()))
            if not ready:
                writer.flush()
                dirty = False
                next_flush = time.monotonic() + flush_interval
                continue
        try:
            body = frames.read()
        except EOFError:
            break  # the server died: leave the trace without its end line
        if body is None:
            ended = True
            break
        fast = format_reads(body, start, name_tuple) if format_reads is not None else None
        if fast is not None:  # reads and requests without data only: lines made in C (_fastlines.c)
            lines, counts = fast
            write(lines)
            for cmd, count in enumerate(counts):
                ops[cmd] += count
            records += sum(counts)
        else:
            batch, inline = unframe(body)
            # Serving threads append in nearly, not exactly, seq order (seqs are unique: only they are compared).
            batch.sort()
            lines = []
            add = lines.append
            for seq, t, cmd, flags, offset, length, latency, error, conn, handle, kind, extra, n in batch:
                if cmd < 8:
                    ops[cmd] += 1
                    op = names[cmd]
                else:
                    op = b"CMD%d" % cmd
                if kind == CRC:  # a read the server took the crc32 of: most lines, so no tuple in between
                    add(with_crc % (seq, t - start, op, flags, offset, length, latency, error, conn, handle, extra))
                    continue
                fields = (
                    seq,
                    t - start,
                    op,
                    flags,
                    offset,
                    length,
                    latency,
                    error,
                    conn,
                    handle,
                )
                if kind == IN_RING:
                    data = ring.get(extra, n)
                    freed = max(freed, extra + n)
                elif kind == INLINE:
                    data = inline[seq]
                else:
                    add(plain % fields)
                    continue
                if (keep_writes and cmd == write_cmd) or (keep_reads and cmd == read_cmd):
                    payload_bytes += len(data)
                    digest = digest_of(data).encode()
                    if data and not data[0] and not data[-1] and bytes(data) == bytes(len(data)):
                        add(with_zeros % (*fields, digest))  # file systems write a lot of these
                    else:  # in pieces: formatting the payload into the line would copy it once more
                        add(data_head % (*fields, digest))
                        add(b64encode(data))
                        add(b'"}\n')
                else:
                    add(with_hash % (*fields, digest_of(data).encode()))
            write(b"".join(lines))
            if ring is not None:
                ring.free(freed)  # the lines hold copies: the server may overwrite those payloads now
            records += len(batch)
        dirty = True
        now = time.monotonic()
        if now >= next_flush:
            writer.flush()
            dirty = False
            next_flush = now + flush_interval
    status = {"records": records, "payload_bytes": payload_bytes, "ended": ended}
    if ended:
        counts = {_OP_NAMES[i]: n for i, n in enumerate(ops) if n}
        writer.write(encode_trailer(records, time.time() - start, ops=counts))
        writer.close()
    else:
        writer.close()
    return status


def main(argv: list[str]) -> int:
    # Our own session already keeps the terminal's Ctrl-C away; be sure anyway:
    # the server decides when recording ends, and tells us with the empty frame.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = run(int(argv[0]), sys.stdin.fileno())
    except Exception as exc:  # noqa: BLE001 - reported to the server as one line
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        _say(f"error: {message}")
        return 1
    _say(json.dumps(status))
    return 0


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:
        pass  # the server is gone and nobody is listening


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
