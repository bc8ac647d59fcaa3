"""Payloads reach the trace writer through shared memory (buselab/trace/ring.py).

The ring is small here so that it wraps many times, fills up (the serving
thread must wait for the writer), and some payloads are too big for it and
take the pipe instead. Every byte written must come out of the trace as it
went in, in order: a ring that freed a payload before the writer had encoded
it, or a reservation that raced, shows up as a wrong payload here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from buselab.backends import open_backend
from buselab.client import NBDClient
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.trace.codecs import b64decode, b64encode, crc32
from buselab.trace.format import data_hash, open_trace
from buselab.trace.recorder import TraceRecorder
from buselab.trace.ring import PayloadRing, RingReader


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
