"""Requests reach the trace writer: packed records (trace/wire.py), payloads through shared
memory (buselab/trace/ring.py).

The ring is small here so that it wraps many times, fills up (the serving
thread must wait for the writer), and some payloads are too big for it and
take the pipe instead. Every byte written must come out of the trace as it
went in, in order: a ring that freed a payload before the writer had encoded
it, or a reservation that raced, shows up as a wrong payload here.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from buselab.client import NBDClient
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.trace import recorder as recorder_module
from buselab.trace.codecs import b64decode, b64encode, crc32
from buselab.trace.format import data_hash, open_trace
from buselab.trace.recorder import TraceRecorder
from buselab.trace.ring import PayloadRing, RingReader
from buselab.trace.wire import CRC, IN_RING, INLINE, NO_DATA, RECORD, SIZE, frame, unframe


def test_ring_memory_is_shared_with_the_reader() -> None:
    ring = PayloadRing.create(1 << 16)
    assert ring is not None, "memfd_create is available on every Linux this runs on"
    reader = RingReader(os.dup(ring.fd), ring.size)
    ring.data[100:105] = b"hello"
    assert bytes(reader.get(100 + 3 * ring.size, 5)) == b"hello"  # positions count from the start
    reader.free(12345)
    assert ring.freed() == 12345
    ring.close()


@pytest.mark.parametrize("path", ["trace.jsonl", "trace.jsonl.zst"])
def test_every_payload_arrives_intact_through_a_small_ring(tmp_path: Path, path: str) -> None:
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=8 << 20), ServeOptions(unix=[sock]))
    session.start()
    trace = str(tmp_path / path)
    # 64 KiB of ring: 4-32 KiB payloads go through it (and wrap it every few requests),
    # 40 KiB ones are more than half of it and go through the pipe.
    session.recorder = TraceRecorder.start(session.engine, trace, backlog_limit=64 << 10)
    rng = random.Random(7)
    written = []
    try:
        with NBDClient.connect_unix(sock) as nbd:
            for i in range(300):
                length = rng.choice([4096, 8192, 32768, 40960, 512])
                offset = rng.randrange(0, (8 << 20) - length) // 512 * 512
                data = rng.randbytes(length)
                nbd.write(offset, data)
                written.append((offset, data))
                if i % 50 == 0:
                    assert nbd.read(offset, length) == data
    finally:
        session.stop()
    info = session.recorder.info()
    assert info.error is None and info.complete
    records = [r for r in open_trace(trace) if r.cmd == c.CMD_WRITE]
    assert [(r.offset, r.data) for r in records] == written
    assert all(r.hash == data_hash(r.data) for r in records)


def test_codecs_agree_with_the_standard_library() -> None:
    import base64
    import zlib

    data = os.urandom(4099)
    assert crc32(data) == zlib.crc32(data)
    assert b64encode(data) == base64.b64encode(data)
    assert b64decode(base64.b64encode(data).decode()) == data
    with pytest.raises(ValueError):  # binascii.Error is a ValueError
        b64decode("not base64!")


def test_frames_carry_records_and_inline_payloads_in_order() -> None:
    fields = (7, 1.5, c.CMD_WRITE, 1, 4096, 3, 0.25, 0, 2, 99)
    items = [
        RECORD.pack(*fields, INLINE, 0, 3) + b"abc",
        RECORD.pack(8, 1.6, c.CMD_READ, 0, 0, 4096, 0.5, 0, 2, 100, CRC, 0xDEADBEEF, 0),
        RECORD.pack(9, 1.7, c.CMD_WRITE, 0, 0, 4096, 0.5, 0, 2, 101, IN_RING, 1 << 40, 4096),
        RECORD.pack(10, 1.8, c.CMD_WRITE, 0, 8, 2, 0.5, 0, 2, 102, INLINE, 0, 2) + b"xy",
        RECORD.pack(11, 1.9, c.CMD_FLUSH, 0, 0, 0, 0.5, 5, 2, 103, NO_DATA, 0, 0),
    ]
    body, inline = frame(items)
    assert inline == 5
    rows, payloads = unframe(memoryview(body))
    assert len(body) == 4 + 5 * SIZE + 5
    assert rows[0] == (*fields, INLINE, 0, 3)
    assert [row[0] for row in rows] == [7, 8, 9, 10, 11]
    assert rows[1][10:12] == (CRC, 0xDEADBEEF) and rows[2][10:] == (IN_RING, 1 << 40, 4096)
    assert payloads == {7: b"abc", 10: b"xy"}
    body, inline = frame(items[1:3])  # no payload in the items: no copying them apart
    assert inline == 0 and unframe(memoryview(body))[1] == {}


def _record_without_the_feeder(tmp_path: Path, monkeypatch, **options):
    """A session recording whose feeder thread never sweeps: only serving threads send."""
    monkeypatch.setattr(recorder_module, "_SWEEP_INTERVAL", 3600.0)
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=8 << 20), ServeOptions(unix=[sock]))
    session.start()
    session.recorder = TraceRecorder.start(session.engine, str(tmp_path / "t.jsonl.zst"), **options)
    return session, sock


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_busy_recording_reaches_the_writer_from_the_serving_threads(tmp_path: Path, monkeypatch) -> None:
    session, sock = _record_without_the_feeder(tmp_path, monkeypatch)
    try:
        count = recorder_module._BATCH + 10
        with NBDClient.connect_unix(sock) as nbd:
            for i in range(count):
                nbd.read((i % 256) * 4096, 4096)
        # The request that filled a batch sent it; the feeder, asleep for an hour, did not.
        assert _wait_until(lambda: session.recorder.sent >= recorder_module._BATCH), session.recorder.sent
        assert session.recorder.sent < count  # the rest waits for a full batch, or the end
    finally:
        session.stop()
    info = session.recorder.info()
    assert info.complete and info.records == count  # stopping wakes the feeder, which sends the rest


def test_big_payloads_are_sent_before_the_ring_fills(tmp_path: Path, monkeypatch) -> None:
    # A 1 MiB ring and 32 KiB writes: a quarter of the ring waits after 8 writes, long before
    # _BATCH requests have queued up and before the ring is full.
    session, sock = _record_without_the_feeder(tmp_path, monkeypatch, backlog_limit=1 << 20)
    try:
        with NBDClient.connect_unix(sock) as nbd:
            for i in range(12):
                nbd.write(i * 32768, bytes([i]) * 32768)
            assert _wait_until(lambda: session.recorder.sent >= 8), session.recorder.sent
    finally:
        session.stop()
    assert session.recorder.info().records == 12


def test_a_trickle_reaches_the_writer_within_the_sweep(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock]))
    session.start()
    session.recorder = TraceRecorder.start(session.engine, str(tmp_path / "t.jsonl"))
    try:
        with NBDClient.connect_unix(sock) as nbd:
            nbd.write(0, b"t" * 512)
            assert _wait_until(lambda: session.recorder.sent == 1, 2.0), "one request waited more than 2 s"
    finally:
        session.stop()


@pytest.mark.parametrize("c_lines", [True, False])
def test_a_record_a_frame_late_is_written_in_seq_order(tmp_path: Path, monkeypatch, c_lines: bool) -> None:
    """The writer holds the newest records of a frame back (writer.Encoder.HOLD) for late ones."""
    from buselab.trace import writer

    if not c_lines:
        monkeypatch.setattr(writer, "format_reads", None)

    def read(seq: int) -> bytes:
        return RECORD.pack(seq, 1000.0 + seq, c.CMD_READ, 0, 0, 4096, 1e-5, 0, 1, seq, CRC, seq, 0)

    late_write = RECORD.pack(300, 1300.0, c.CMD_WRITE, 0, 0, 3, 1e-5, 0, 2, 300, INLINE, 0, 3) + b"abc"
    setup = {"header": {"size": 1 << 20, "start": 1000.0}, "path": str(tmp_path / "t.jsonl"), "level": None}
    fd = os.open(setup["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    encoder = writer.Encoder(setup, fd)
    encoder.encode(frame([read(s) for s in [*range(1, 300), 301]])[0])  # 300's record is late
    assert encoder.records == 301 - writer.Encoder.HOLD  # seqs up to 45 are written
    encoder.encode(frame([late_write, *(read(s) for s in range(302, 601))])[0])
    status = encoder.close(ended=True)
    assert status["records"] == 600
    records = list(open_trace(setup["path"]))
    assert [r.seq for r in records] == list(range(1, 601))
    assert records[299].op == "WRITE" and records[299].data == b"abc"
