"""The trace writer process: hashes, formats, compresses and writes records.

`TraceRecorder` starts it as `python -m buselab.trace.writer FD` with the
trace file already open on FD, and feeds it on stdin with frames

    4-byte little-endian length + body

The first frame is a marshalled dict (the header line and the options), each
later frame a batch of requests in wire.py's binary records, and an empty
frame (length 0) means "that was all"; a frame that starts with labelling.MAP_MARK
carries the disk's map, to label the records that follow (labelling.py): the writer writes the end line, closes the file, prints a JSON
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
from .labelling import RecordLabels, is_map_frame, read_map_frame
from .ring import RingReader
from .wire import CRC, IN_RING, INLINE, RECORD, SIZE, frame, unframe

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


class Encoder:
    """Frames in, trace lines out, in seq order.

    A serving thread takes its request's seq in Telemetry.record and queues the record a
    moment later, in the recorder's tap; another thread can queue a bigger seq in between, and
    a batch can be sent just then. So a record can reach us one frame after records with
    bigger seqs. The records within HOLD seqs of a frame's newest therefore wait for the next
    frame (or a quiet moment, a full payload ring, or the end) and are sorted in with it: the
    file stays in seq order, as docs/TRACE_FORMAT.md promises and replay relies on.
    """

    HOLD = 256  # at most one late record per serving thread is possible; this is many more

    def __init__(self, setup: dict[str, Any], trace_fd: int) -> None:
        header = TraceHeader(**setup["header"])
        self.start = header.start
        self.keep_reads = header.payload == "all"
        self.keep_writes = header.payload in ("writes", "all")
        self.digest_of = hasher(header.hash)
        self.writer = TraceWriter(setup["path"], level=setup.get("level"), fd=trace_fd)
        self.writer.write_header(header)
        self.writer.flush()
        self.ring = RingReader(setup["ring_fd"], setup["ring_size"]) if "ring_fd" in setup else None
        self.freed = 0  # how far the ring's payloads are encoded (and the server told)
        self.ops = [0] * 8
        self.records = 0
        self.payload_bytes = 0
        self.names = tuple(name.encode() for name in _OP_NAMES)
        self.held = b""  # records waiting for the next frame, as wire.py's records
        self.held_count = 0
        self.held_payloads = b""  # their INLINE payloads, in record order
        # Lines are made as bytes: str lines would be joined, then encoded, copying every payload twice more.
        fmt = RECORD_FORMAT.encode()
        # Each ends with the record's label (b"" where there is none).
        self.plain = fmt + b"%s}\n"
        self.with_crc = fmt + b',"hash":"%08x"%s}\n'
        self.with_hash = fmt + b',"hash":"%s"%s}\n'
        self.data_head = fmt + b',"hash":"%s","data":"'
        self.with_zeros = fmt + b',"hash":"%s","zeros":true%s}\n'
        self.labels: RecordLabels | None = None  # while the server's map knows what the disk holds
        self.c_labels = True  # the C formatter can label too

    def set_map(self, body: memoryview | bytes) -> None:
        """A map frame: label the records written from now on with it (or none, for None).

        The records held back from the last frame came before the map did: they are written
        first, with the map (or none) of their moment."""
        self.release()
        fsmap = read_map_frame(body)
        self.labels = RecordLabels(fsmap) if fsmap is not None else None

    def encode(self, body: memoryview | bytes, hold: int = HOLD) -> None:
        """Write the frame's records (and those held from before), holding the newest back.

        A frame without records asks for everything held: the server sends one when its
        payload ring is full and waits for us to free it.
        """
        count = int.from_bytes(body[:4], "little")
        if not count:
            hold = 0
        if self.held_count:
            end = 4 + count * SIZE
            body = b"".join(
                [
                    (self.held_count + count).to_bytes(4, "little"),
                    self.held,
                    body[4:end],
                    self.held_payloads,
                    body[end:],
                ]
            )
            self.held, self.held_count, self.held_payloads = b"", 0, b""
        fast = None
        if format_reads is not None:
            if self.labels is None:
                fast = format_reads(body, self.start, self.names, hold)
            elif self.c_labels:  # labelled there from the map's lookup table
                try:
                    fast = format_reads(body, self.start, self.names, hold, self.labels.table)
                except TypeError:  # a formatter built before labels: Python labels
                    self.c_labels = False
        if fast is not None:  # reads and requests without data only: lines made in C (_fastlines.c)
            lines, counts, held = fast
            self.writer.write_bytes(lines)
            for cmd, count in enumerate(counts):
                self.ops[cmd] += count
            self.records += sum(counts)
            self.held, self.held_count = held, len(held) // SIZE
        else:
            self._encode_in_python(body, hold)

    def release(self) -> None:
        """Write the held records too: quiet now, or the end."""
        if self.held_count:
            self.encode(frame([])[0], hold=0)

    def _encode_in_python(self, body: memoryview | bytes, hold: int) -> None:
        batch, inline = unframe(body if isinstance(body, memoryview) else memoryview(body))
        # Serving threads append in nearly, not exactly, seq order (seqs are unique: only they are compared).
        batch.sort()
        written = len(batch)
        if hold and batch:
            cut = batch[-1][0] - hold
            while written and batch[written - 1][0] > cut:
                written -= 1
        ring = self.ring
        freed = self.freed
        held_from = None  # where the first held payload in the ring starts: not to be freed yet
        if written < len(batch):
            later = batch[written:]
            self.held = b"".join(RECORD.pack(*row) for row in later)
            self.held_count = len(later)
            self.held_payloads = b"".join(inline[row[0]] for row in later if row[10] == INLINE)
            starts = [row[11] for row in later if row[10] == IN_RING]
            held_from = min(starts) if starts else None
        names, start, digest_of = self.names, self.start, self.digest_of
        keep_writes, keep_reads = self.keep_writes, self.keep_reads
        read_cmd, write_cmd = c.CMD_READ, c.CMD_WRITE
        with_crc, plain, with_hash = self.with_crc, self.plain, self.with_hash
        data_head, with_zeros = self.data_head, self.with_zeros
        ops = self.ops
        label = self.labels.suffix if self.labels is not None else None
        lines: list[bytes] = []
        add = lines.append
        for seq, t, cmd, flags, offset, length, latency, error, conn, handle, kind, extra, n in batch[:written]:
            if cmd < 8:
                ops[cmd] += 1
                op = names[cmd]
            else:
                op = b"CMD%d" % cmd
            if kind == CRC:  # a read the server took the crc32 of: most lines, so no tuple in between
                suffix = label(cmd, offset, length, None) if label is not None else b""
                add(with_crc % (seq, t - start, op, flags, offset, length, latency, error, conn, handle, extra, suffix))
                continue
            fields = (seq, t - start, op, flags, offset, length, latency, error, conn, handle)
            if kind == IN_RING:
                data = ring.get(extra, n)
                freed = max(freed, extra + n)
            elif kind == INLINE:
                data = inline[seq]
            else:
                add(plain % (*fields, label(cmd, offset, length, None) if label is not None else b""))
                continue
            suffix = label(cmd, offset, length, data) if label is not None else b""
            if (keep_writes and cmd == write_cmd) or (keep_reads and cmd == read_cmd):
                self.payload_bytes += len(data)
                digest = digest_of(data).encode()
                if data and not data[0] and not data[-1] and bytes(data) == bytes(len(data)):
                    add(with_zeros % (*fields, digest, suffix))  # file systems write a lot of these
                else:  # in pieces: formatting the payload into the line would copy it once more
                    add(data_head % (*fields, digest))
                    add(b64encode(data))
                    add(b'"%s}\n' % suffix)
            else:
                add(with_hash % (*fields, digest_of(data).encode(), suffix))
        self.writer.write_bytes(b"".join(lines))
        self.records += written
        if ring is not None:
            if held_from is not None:
                freed = min(freed, held_from)
            if freed > self.freed:
                self.freed = freed
                ring.free(freed)  # the lines hold copies: the server may overwrite those payloads now

    def close(self, ended: bool) -> dict[str, Any]:
        self.release()
        if ended:
            counts = {_OP_NAMES[i]: n for i, n in enumerate(self.ops) if n}
            self.writer.write(encode_trailer(self.records, time.time() - self.start, ops=counts))
        self.writer.close()
        return {"records": self.records, "payload_bytes": self.payload_bytes, "ended": ended}


def run(trace_fd: int, inp: int) -> dict[str, Any]:
    frames = FrameReader(inp)
    setup = marshal.loads(frames.read())
    encoder = Encoder(setup, trace_fd)
    flush_interval = float(setup.get("flush_interval", 1.0))
    next_flush = time.monotonic() + flush_interval
    ended = False
    dirty = False  # written to the compressor but not yet flushed to the file
    while True:
        if dirty or encoder.held_count:
            # Quiet now: write what is held and flush within flush_interval anyway, so a server
            # killed later leaves it all on disk.
            ready, _, _ = select.select([inp], [], [], max(0.0, next_flush - time.monotonic()))
            if not ready:
                encoder.release()
                encoder.writer.flush()
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
        if is_map_frame(body):
            encoder.set_map(body)
            continue
        encoder.encode(body)
        dirty = True
        now = time.monotonic()
        if now >= next_flush:
            encoder.writer.flush()
            dirty = False
            next_flush = now + flush_interval
    return encoder.close(ended)


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
