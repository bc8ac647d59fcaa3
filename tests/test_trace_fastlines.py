"""The compiled line formatter (buselab/trace/_fastlines.c) writes exactly what the Python loop writes.

The trace writer runs twice on the same frames, once with the C formatter and
once without, and the two traces must be byte for byte the same: numbers at
their widest, times before the trace's start, rounding ties, unsorted seqs,
and frames the C code must hand back to Python (payloads, unknown commands).
"""

from __future__ import annotations

import json
import marshal
import os
import random
import tempfile
from pathlib import Path

import pytest
from helpers import missing

from buselab.protocol import constants as c
from buselab.trace import writer
from buselab.trace.format import open_trace, read_trailer
from buselab.trace.wire import CRC, INLINE, NO_DATA, RECORD, SIZE, frame

START = 1_764_590_000.25
U64 = (1 << 64) - 1


def _fastlines():
    try:
        from buselab.trace import _fastlines
    except ImportError:
        missing("the C line formatter is not built (setup.py: needs a C compiler and Python's headers)")
    return _fastlines


def _record(seq: int, rng: random.Random, cmd: int | None = None, kind: int | None = None) -> bytes:
    cmd = rng.choice([c.CMD_READ, c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, 5, 6, 7]) if cmd is None else cmd
    kind = rng.choice([CRC, CRC, NO_DATA]) if kind is None else kind
    t = START + rng.choice([rng.uniform(-1, 1e5), 0.0078125, -0.0078125, 1e-7, rng.random()])
    latency = rng.choice([rng.random() * 1e-3, 0.0009765625, 0.0, 86400.5, 5e-10])
    return RECORD.pack(
        seq,
        t,
        cmd,
        rng.choice([0, 1, 0xFFFF]),
        rng.choice([0, rng.randrange(1 << 40) * 512, U64]),
        rng.choice([0, 4096, (1 << 32) - 1]),
        latency,
        rng.choice([0, 5, (1 << 32) - 1]),
        rng.choice([1, (1 << 32) - 1]),
        rng.choice([0, rng.getrandbits(64), U64]),
        kind,
        rng.getrandbits(32) if kind == CRC else 0,
        0,
    )


def _frames(rng: random.Random) -> list[bytes]:
    frames = []
    seq = 1
    for size in (1, 7, 300, 2048):
        seqs = list(range(seq, seq + size))
        seq += size
        for i in range(0, size - 1, 5):  # nearly sorted, as serving threads queue them
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
        frames.append(frame([_record(s, rng) for s in seqs])[0])
    # Frames the C code hands back: a command without a name, a payload, a time that is not a number.
    frames.append(frame([_record(seq, rng), _record(seq + 1, rng, cmd=9)])[0])
    frames.append(
        frame(
            [
                _record(seq + 2, rng),
                _record(seq + 3, rng, cmd=c.CMD_WRITE, kind=INLINE)[:-4] + (3).to_bytes(4, "little") + b"abc",
            ]
        )[0]
    )
    nan = RECORD.pack(seq + 4, float("nan"), 0, 0, 0, 0, 0.0, 0, 1, 1, NO_DATA, 0, 0)
    frames.append(frame([nan])[0])
    return frames


def _write_trace(frames: list[bytes], path: Path) -> bytes:
    setup = {
        "header": {"size": 1 << 60, "start": START, "backend": "ram", "payload": "writes", "hash": "crc32"},
        "path": str(path),
        "level": None,
        "flush_interval": 60.0,
    }
    with tempfile.TemporaryFile() as feed:
        for body in [marshal.dumps(setup), *frames, b""]:
            feed.write(len(body).to_bytes(4, "little") + body)
        feed.flush()
        feed.seek(0)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        status = writer.run(fd, feed.fileno())
    assert status["ended"]
    return path.read_bytes()


def test_the_c_lines_are_the_python_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fastlines()
    frames = _frames(random.Random(11))
    assert writer.format_reads is not None
    fast = _write_trace(frames, tmp_path / "c.jsonl")
    monkeypatch.setattr(writer, "format_reads", None)
    slow = _write_trace(frames, tmp_path / "python.jsonl")
    fast_lines, slow_lines = fast.splitlines(), slow.splitlines()
    assert len(fast_lines) == len(slow_lines) == 1 + 1 + 7 + 300 + 2048 + 2 + 2 + 1 + 1
    for a, b in zip(fast_lines[:-1], slow_lines[:-1]):  # the end line's duration is the run's own
        assert a == b
    fast_end, slow_end = json.loads(fast_lines[-1]), json.loads(slow_lines[-1])
    assert (fast_end["records"], fast_end["ops"]) == (slow_end["records"], slow_end["ops"])
    # The end line counts every record, header and end line aside.
    assert read_trailer(str(tmp_path / "c.jsonl"))["records"] == len(fast_lines) - 2


def test_the_c_formatter_hands_back_what_it_does_not_do() -> None:
    fastlines = _fastlines()
    names = tuple(name.encode() for name in writer._OP_NAMES)
    rng = random.Random(5)
    reads = frame([_record(2, rng, kind=CRC), _record(1, rng, kind=NO_DATA)])[0]
    lines, counts, held = fastlines.format_frame(reads, START, names, 0)
    assert lines.count(b"\n") == 2 and lines.index(b'"seq":1,') < lines.index(b'"seq":2,')
    assert sum(counts) == 2 and held == b""
    # Held back: the records within `hold` of the newest seq, as they came, for the next frame.
    lines, counts, held = fastlines.format_frame(reads, START, names, 1)
    assert b'"seq":1,' in lines and b'"seq":2,' not in lines and sum(counts) == 1
    assert held == bytes(reads[4 : 4 + SIZE])  # seq 2 was the first record
    inline = frame([_record(3, rng, cmd=c.CMD_WRITE, kind=INLINE)[:-4] + (2).to_bytes(4, "little") + b"xy"])[0]
    assert fastlines.format_frame(inline, START, names, 0) is None
    assert fastlines.format_frame(frame([_record(4, rng, cmd=8)])[0], START, names, 0) is None
    assert fastlines.format_frame(reads, START, names[:7], 0) is None


def test_a_recorded_read_trace_reads_back(tmp_path: Path) -> None:
    """End to end through the writer process, with whatever formatter this install has."""
    frames = _frames(random.Random(3))[:4]
    _write_trace(frames, tmp_path / "t.jsonl.zst")
    records = list(open_trace(str(tmp_path / "t.jsonl.zst")))
    assert len(records) == 1 + 7 + 300 + 2048
    assert [r.seq for r in records] == sorted(r.seq for r in records)


def test_times_are_rounded_as_python_rounds_them() -> None:
    """The C code's fast path for %.6f and %.9f, its ties, and its way out to snprintf."""
    fastlines = _fastlines()
    names = tuple(name.encode() for name in writer._OP_NAMES)
    rng = random.Random(2024)
    values = [0.0, -0.0, 0.0078125, 0.0009765625, 1.5e-6, 2.5e-9, 1099511.627776, 1e15, -1e15, 4503599.6270496]
    for _ in range(20000):
        magnitude = 10.0 ** rng.randint(-12, 14)
        values.append(rng.uniform(-magnitude, magnitude))
        k = rng.randrange(1 << 36)
        values.append((k + 0.5) / 1e6)  # near a tie at 6 decimals
        values.append((k + 0.5) / 1e9)  # and at 9
    records = [
        RECORD.pack(seq, START + value, 0, 0, 0, 0, value, 0, 1, 1, NO_DATA, 0, 0)
        for seq, value in enumerate(values, 1)
    ]
    lines, counts, _ = fastlines.format_frame(frame(records)[0], START, names, 0)
    lines = lines.splitlines()
    assert len(lines) == len(values) == counts[0]
    for line, value in zip(lines, values):
        assert b'"t":%.6f,' % ((START + value) - START) in line, (value, line)  # the same double as the C code's
        assert b'"latency":%.9f,' % value in line, (value, line)
