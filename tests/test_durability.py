"""FLUSH and FUA on the file backend: acknowledged means durable.

The kill -9 tests run the real `buselab` and kill it the moment the reply
arrives: every byte written before must be in the file. A page cache survives
the death of a process, so those tests catch a server that acknowledges before
writing; the in-process tests below also check that fdatasync / RWF_DSYNC
really happened before the reply left the server.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from helpers import RawClient, serve, socket_path

from buselab.client import NBDClient
from buselab.protocol import constants as c
from buselab.protocol.transmission import encode_request
from buselab.storage.backends.file import FileBackend

MiB = 1 << 20


def kill9(served) -> None:
    served.proc.send_signal(signal.SIGKILL)
    assert served.proc.wait(10) == -signal.SIGKILL


def test_flush_then_kill9_keeps_every_byte(buselab_server, tmp_path):
    path = tmp_path / "disk.img"
    served = buselab_server(["file", str(path), "--size", "16M"])
    client = NBDClient.connect_unix(served.socket)
    assert client.flags & c.TF_SEND_FLUSH and client.flags & c.TF_SEND_FUA
    blocks = {off: os.urandom(64 * 1024) for off in range(0, 16 * MiB, 2 * MiB)}
    for off, data in blocks.items():
        client.write(off, data)
    client.write(16 * MiB - 3, b"end")
    client.flush()
    kill9(served)
    raw = path.read_bytes()
    assert len(raw) == 16 * MiB
    for off, data in blocks.items():
        assert raw[off : off + len(data)] == data, f"lost the write at {off}"
    assert raw[-3:] == b"end"


def test_pipelined_writes_then_flush_then_kill9(buselab_server, tmp_path):
    path = tmp_path / "disk.img"
    served = buselab_server(["file", str(path), "--size", "8M"])
    raw = RawClient(served.socket)
    blocks = {i: os.urandom(4096) for i in range(256)}
    raw.send(b"".join(encode_request(c.CMD_WRITE, i, i * 8192, 4096) + blocks[i] for i in blocks))
    assert {raw.simple_reply() for _ in blocks} == {(0, i) for i in blocks}
    raw.request(c.CMD_FLUSH, 999)
    assert raw.simple_reply() == (0, 999)
    kill9(served)
    content = path.read_bytes()
    for i, data in blocks.items():
        assert content[i * 8192 : i * 8192 + 4096] == data


def test_fua_write_then_kill9_keeps_it(buselab_server, tmp_path):
    path = tmp_path / "disk.img"
    served = buselab_server(["file", str(path), "--size", "4M"])
    client = NBDClient.connect_unix(served.socket)
    data = os.urandom(MiB)
    client.write(MiB, data, fua=True)
    kill9(served)
    assert path.read_bytes()[MiB : 2 * MiB] == data


def test_fua_write_zeroes_then_kill9(buselab_server, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xff" * (4 * MiB))
    served = buselab_server(["file", str(path)])
    raw = RawClient(served.socket)
    raw.request(c.CMD_WRITE_ZEROES, 1, MiB, MiB, flags=c.CMD_FLAG_FUA)
    assert raw.simple_reply() == (0, 1)
    kill9(served)
    content = path.read_bytes()
    assert content[MiB : 2 * MiB] == bytes(MiB)
    assert content[:MiB] == b"\xff" * MiB


# --- in process: the sync really happens before the reply ---------------------------------------


class SyncSpy:
    """Wraps os.fdatasync and os.pwritev; records finished calls, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        real_sync, real_pwritev = os.fdatasync, os.pwritev

        def fdatasync(fd: int) -> None:
            real_sync(fd)
            with self.lock:
                self.events.append(("fdatasync", fd))

        def pwritev(fd: int, buffers, offset: int, flags: int = 0) -> int:
            n = real_pwritev(fd, buffers, offset, flags)
            with self.lock:
                self.events.append(("pwritev-dsync" if flags & os.RWF_DSYNC else "pwritev", fd))
            return n

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwritev", pwritev)

    def take(self) -> list[tuple[str, int]]:
        with self.lock:
            events, self.events = self.events, []
        return events


def test_flush_reply_comes_after_fdatasync(tmp_path, monkeypatch):
    spy = SyncSpy(monkeypatch)
    disk = FileBackend(str(tmp_path / "disk.img"), 4 * MiB)
    fd = disk._fd
    with serve(disk, tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 0, 4096, payload=os.urandom(4096))
        assert raw.simple_reply() == (0, 1)
        assert spy.take() == [("pwritev", fd)]  # a plain write is not synced
        raw.request(c.CMD_FLUSH, 2)
        assert raw.simple_reply() == (0, 2)
        assert spy.take() == [("fdatasync", fd)]  # already done when the reply arrived
        raw.close()


def test_fua_reply_comes_after_a_synchronous_write(tmp_path, monkeypatch):
    spy = SyncSpy(monkeypatch)
    disk = FileBackend(str(tmp_path / "disk.img"), 4 * MiB)
    fd = disk._fd
    with serve(disk, tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 8192, 4096, flags=c.CMD_FLAG_FUA, payload=os.urandom(4096))
        assert raw.simple_reply() == (0, 1)
        events = spy.take()
        assert events and all(e == ("pwritev-dsync", fd) for e in events)
        for cmd, length in ((c.CMD_TRIM, 4096), (c.CMD_WRITE_ZEROES, 4096)):
            raw.request(cmd, 2, 0, length, flags=c.CMD_FLAG_FUA)
            assert raw.simple_reply() == (0, 2)
            assert ("fdatasync", fd) in spy.take()
        raw.close()


def test_stopping_the_server_syncs_the_file(tmp_path, monkeypatch):
    spy = SyncSpy(monkeypatch)
    disk = FileBackend(str(tmp_path / "disk.img"), 4 * MiB)
    fd = disk._fd
    with serve(disk, tmp_path) as session:
        with NBDClient.connect_unix(socket_path(session)) as client:
            client.write(0, b"unsynced")
        spy.take()
    assert ("fdatasync", fd) in spy.take()
