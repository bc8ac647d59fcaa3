"""Bad input: the connection gets the spec's error or is closed with one log line, nothing
partial is applied, every other client keeps being served, and memory stays bounded."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from helpers import TIMEOUT, RawClient, connect, serve, socket_path, wait_for

from buselab.protocol import constants as c
from buselab.protocol.transmission import encode_request
from buselab.storage.backends.ram import RamBackend

MiB = 1 << 20
PATTERN = b"\x5a" * (8 * MiB)


def filled_ram() -> RamBackend:
    ram = RamBackend(16 * MiB)
    ram.write(0, PATTERN)
    return ram


def buselab_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "buselab" and r.levelno >= logging.WARNING]


# --- malformed handshakes -------------------------------------------------------------------------


def opt(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, option, len(data) if length is None else length) + data


BAD_HANDSHAKES = {
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown client flags": struct.pack(">I", 0xFF),
    "bad option magic": struct.pack(">I", 3) + struct.pack(">QII", 0xDEADBEEF, c.OPT_GO, 0),
    "option too long": struct.pack(">I", 3) + opt(c.OPT_GO, length=1 << 30),
    "unknown export": struct.pack(">I", 3) + opt(c.OPT_EXPORT_NAME, b"no-such-export"),
    "too many options": struct.pack(">I", 3) + opt(c.OPT_LIST) * (c.MAX_OPTIONS + 1),
}


@pytest.mark.parametrize("name", BAD_HANDSHAKES)
def test_malformed_handshake_closes_that_connection_only(tmp_path, caplog, name):
    caplog.set_level(logging.WARNING, logger="buselab")
    with serve(filled_ram(), tmp_path) as session:
        bystander = connect(session)  # connected before, in transmission
        bad = RawClient(socket_path(session), handshake=False)
        bad.recv_exact(18)
        bad.send(BAD_HANDSHAKES[name])
        assert bad.closed_by_server(), f"server kept a '{name}' connection open"
        wait_for(lambda: len(buselab_warnings(caplog)) >= 1)
        warnings = buselab_warnings(caplog)
        assert len(warnings) == 1, warnings
        assert "handshake failed" in warnings[0]
        assert bystander.read(0, 16) == PATTERN[:16]
        with connect(session) as newcomer:
            assert newcomer.read(0, 16) == PATTERN[:16]
        bystander.close()


@pytest.mark.parametrize("cut", [3, 18, 30])
def test_client_vanishing_mid_handshake(tmp_path, caplog, cut):
    caplog.set_level(logging.WARNING, logger="buselab")
    stream = struct.pack(">I", 3) + opt(c.OPT_GO, struct.pack(">IH", 0, 0))
    with serve(filled_ram(), tmp_path) as session:
        bad = RawClient(socket_path(session), handshake=False)
        bad.recv_exact(18)
        bad.send(stream[:cut])
        bad.sock.close()
        wait_for(lambda: session.engine.telemetry.snapshot().connections == 0)
        assert buselab_warnings(caplog) == []  # a client going away is not a warning
        with connect(session) as client:
            assert client.read(0, 4) == PATTERN[:4]


# --- bad requests ----------------------------------------------------------------------------------


def test_bad_request_magic_closes_that_connection_and_others_go_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="buselab")
    with serve(filled_ram(), tmp_path) as session:
        good = RawClient(socket_path(session))
        bad = RawClient(socket_path(session))
        good.request(c.CMD_READ, 1, 0, 8)
        bad.send(struct.pack(">IHHQQI", 0x12345678, 0, c.CMD_READ, 1, 0, 512))
        assert bad.closed_by_server()
        assert good.simple_reply() == (0, 1)
        assert good.recv_exact(8) == PATTERN[:8]
        wait_for(lambda: bool(buselab_warnings(caplog)))
        warnings = buselab_warnings(caplog)
        assert len(warnings) == 1 and "magic" in warnings[0]
        assert good.read(4096, 8, handle=2) == PATTERN[:8]
        good.close()


def test_unknown_command_gets_einval_and_the_connection_continues(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session))
        for handle, cmd in enumerate((8, 42, 0xFFFF), start=1):
            raw.request(cmd, handle, 0, 512)
            assert raw.simple_reply() == (c.EINVAL, handle)
        assert raw.read(0, 8, handle=9) == PATTERN[:8]
        raw.close()


def test_unknown_command_with_structured_replies(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True)
        raw.request(200, 1, 0, 512)
        magic, error, handle = struct.unpack(">IIQ", raw.recv_exact(16))
        if magic == c.STRUCTURED_REPLY_MAGIC:  # an error chunk is fine too
            rtype = error & 0xFFFF
            length = struct.unpack(">I", raw.recv_exact(4))[0]
            payload = raw.recv_exact(length)
            assert rtype == c.REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == c.EINVAL
        else:
            assert (magic, error, handle) == (c.SIMPLE_REPLY_MAGIC, c.EINVAL, 1)
        raw.request(c.CMD_READ, 2, 0, 4)
        assert raw.chunk() == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, 2, bytes(8) + PATTERN[:4])
        raw.close()


@pytest.mark.parametrize(
    "length, sent",
    [(4096, 100), (64 * 1024, 64 * 1024 - 1), (4 * MiB, MiB), (4 * MiB, 0)],
    ids=["small", "one-byte-short", "large", "header-only"],
)
def test_disconnect_mid_write_payload_applies_nothing(tmp_path, length, sent):
    with serve(filled_ram(), tmp_path) as session:
        writes_before = session.engine.telemetry.snapshot().count[c.CMD_WRITE]
        raw = RawClient(socket_path(session))
        raw.send(encode_request(c.CMD_WRITE, 1, 4096, length) + b"\xee" * sent)
        time.sleep(0.05)  # let the server take what was sent
        raw.sock.close()
        events = session.engine.telemetry.events
        wait_for(lambda: any("nothing of it was applied" in m for _, m in list(events)))
        with connect(session) as checker:
            assert checker.read(0, 4096 + length + 4096) == PATTERN[: 4096 + length + 4096]
        assert session.engine.telemetry.snapshot().count[c.CMD_WRITE] == writes_before


def test_overlong_write_gets_einval_payload_skipped_connection_continues(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session))
        length = c.MAX_PAYLOAD + MiB
        raw.send(encode_request(c.CMD_WRITE, 1, 0, length))
        chunk = b"\xee" * MiB
        for _ in range(length // MiB):
            raw.send(chunk)
        raw.request(c.CMD_READ, 2, 0, 16)
        # The spec: SHOULD NOT answer EOVERFLOW to a command that carries its payload.
        assert raw.simple_reply() == (c.EINVAL, 1)
        assert raw.simple_reply() == (0, 2)
        assert raw.recv_exact(16) == PATTERN[:16]  # nothing of the skipped payload was written
        raw.close()
        snap = session.engine.telemetry.snapshot()
        assert snap.errors[c.CMD_WRITE] == 1
        assert snap.bytes[c.CMD_WRITE] == 0


def test_overlong_read_is_refused_without_data(tmp_path):
    with serve(RamBackend(64 * MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_READ, 1, 0, c.MAX_PAYLOAD + 1)
        raw.request(c.CMD_READ, 2, 0, 4)
        error, handle = raw.simple_reply()
        assert handle == 1 and error in (c.EOVERFLOW, c.EINVAL)
        assert raw.simple_reply() == (0, 2)
        assert raw.recv_exact(4) == bytes(4)
        raw.close()


def test_requests_out_of_range_and_overflowing_offsets(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_READ, 1, (1 << 64) - 256, 512)  # offset + length wraps a u64
        raw.request(c.CMD_WRITE, 2, (1 << 64) - 256, 512, payload=bytes(512))
        raw.request(c.CMD_TRIM, 3, MiB, 1)
        raw.request(c.CMD_WRITE_ZEROES, 4, 0, MiB + 1)
        assert raw.simple_reply() == (c.EINVAL, 1)
        assert raw.simple_reply() == (c.ENOSPC, 2)
        assert raw.simple_reply() == (c.EINVAL, 3)  # TRIM past the end: EINVAL (only writes get ENOSPC)
        assert raw.simple_reply() == (c.ENOSPC, 4)
        assert raw.read(0, 4, handle=5) == bytes(4)
        raw.close()


def test_write_to_read_only_export_consumes_the_payload(tmp_path):
    with serve(filled_ram(), tmp_path, readonly=True) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 0, 8192, payload=b"\xee" * 8192)
        raw.request(c.CMD_TRIM, 2, 0, 8192)
        raw.request(c.CMD_READ, 3, 0, 8)
        assert raw.simple_reply() == (c.EPERM, 1)
        assert raw.simple_reply()[1] == 2  # EPERM or EINVAL: TRIM was never advertised
        assert raw.simple_reply() == (0, 3)
        assert raw.recv_exact(8) == PATTERN[:8]
        raw.close()


def test_zero_length_requests(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 0, 0)
        raw.request(c.CMD_READ, 2, 0, 0)
        raw.request(c.CMD_READ, 3, 0, 4)
        assert raw.simple_reply() == (0, 1)
        assert raw.simple_reply() == (0, 2)
        assert raw.simple_reply() == (0, 3)
        assert raw.recv_exact(4) == PATTERN[:4]
        raw.close()


def test_requests_trickling_one_byte_at_a_time(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session))
        stream = encode_request(c.CMD_WRITE, 1, 100, 5) + b"hello" + encode_request(c.CMD_READ, 2, 98, 9)
        for i in range(len(stream)):
            raw.send(stream[i : i + 1])
        assert raw.simple_reply() == (0, 1)
        assert raw.simple_reply() == (0, 2)
        assert raw.recv_exact(9) == b"\x5a\x5ahello\x5a\x5a"
        raw.close()


def test_client_vanishing_mid_header(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.send(encode_request(c.CMD_WRITE, 1, 0, 4)[:13])
        raw.sock.close()
        wait_for(lambda: session.engine.telemetry.snapshot().connections == 0)
        with connect(session) as client:
            assert client.read(0, 4) == PATTERN[:4]


# --- memory stays bounded ----------------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_until_closed(raw: RawClient, pieces: list[bytes]) -> None:
    """Send pieces until the server hangs up (which it may do at any point)."""
    try:
        for piece in pieces:
            raw.send(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_memory_stays_bounded_under_abuse(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])
    pid = served.proc.pid
    warm = RawClient(served.socket)
    warm.request(c.CMD_WRITE, 1, 0, 4096, payload=bytes(4096))
    assert warm.simple_reply() == (0, 1)
    baseline = rss(pid)

    # 1. Over-long writes on several connections: skipped, never buffered whole.
    clients = [RawClient(served.socket) for _ in range(3)]
    length = c.MAX_PAYLOAD + 16 * MiB
    chunk = bytes(MiB)
    for raw in clients:
        raw.send(encode_request(c.CMD_WRITE, 1, 0, length))
    for _ in range(length // MiB):
        for raw in clients:
            raw.send(chunk)
    for raw in clients:
        assert raw.simple_reply() == (c.EINVAL, 1)  # an over-long WRITE: see check_request

    # 2. Handshakes that try to make the server buffer: a 4 GiB option, endless options.
    huge = RawClient(served.socket, handshake=False)
    huge.greet()
    send_until_closed(huge, [opt(99, length=0xFFFFFFFF)] + [bytes(MiB)] * 4)
    flood = RawClient(served.socket, handshake=False)
    flood.greet()
    send_until_closed(flood, [opt(99, bytes(c.MAX_OPTION_LENGTH))] * (c.MAX_OPTIONS + 1))
    assert huge.closed_by_server()
    assert flood.closed_by_server()

    # 3. A write header promising 4 GiB, then silence and a disconnect.
    liar = RawClient(served.socket)
    liar.send(encode_request(c.CMD_WRITE, 1, 0, 0xFFFFFFFF) + bytes(MiB))
    time.sleep(0.2)
    liar.sock.close()

    grown = rss(pid) - baseline
    assert grown < 48 * MiB, f"buselab grew by {grown / MiB:.0f} MiB"
    assert warm.read(0, 4, handle=2) == bytes(4)  # and it still serves
    for raw in clients:
        raw.close()
    warm.close()


def test_many_idle_connections_are_cheap(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])
    first = RawClient(served.socket)
    baseline = rss(served.proc.pid)
    idle = [RawClient(served.socket) for _ in range(30)]
    grown = rss(served.proc.pid) - baseline
    # Per-connection buffers are mapped lazily: 30 idle clients must not cost 30 x 32 MiB.
    assert grown < 30 * MiB, f"30 idle connections cost {grown / MiB:.0f} MiB"
    for raw in idle:
        raw.close()
    assert first.read(0, 4) == bytes(4)
    first.close()


def test_server_survives_connect_and_close_storm(tmp_path):
    with serve(filled_ram(), tmp_path) as session:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(socket_path(session))
            s.close()
        wait_for(lambda: session.engine.telemetry.snapshot().connections == 0)
        with connect(session) as client:
            assert client.read(0, 4) == PATTERN[:4]
        assert os.path.exists(socket_path(session))
        assert TIMEOUT > 0
