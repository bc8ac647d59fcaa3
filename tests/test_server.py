"""The server in-process: a Session on a Unix socket, driven by buselab.client and raw sockets.

`RawClient`, `serve` and `connect` come from helpers.py: they speak exactly the
bytes a test means to send.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
from helpers import TIMEOUT, RawClient, connect, serve, socket_path, wait_for

from buselab.client import NBDClient, NBDError
from buselab.protocol import constants as c
from buselab.protocol.transmission import encode_request
from buselab.session import ServeOptions, Session
from buselab.storage.backends.ram import RamBackend
from buselab.storage.base import Backend
from buselab.storage.registry import open_backend

MiB = 1 << 20
HOLE = c.STATE_HOLE | c.STATE_ZERO


FAIL_AT = 1 << 20
FAILING_PLUGIN = f"""
import errno

class Failing:
    \"\"\"Reads reaching {FAIL_AT} raise a bug-like error; writes there fail with ENOSPC.\"\"\"

    size = 2 << 20

    def __init__(self):
        self.data = bytearray(self.size)

    def read(self, offset, length):
        if offset + length > {FAIL_AT}:
            raise RuntimeError("the disk is on fire")
        return bytes(self.data[offset : offset + length])

    def write(self, offset, data):
        if offset + len(data) > {FAIL_AT}:
            raise OSError(errno.ENOSPC, "full")
        self.data[offset : offset + len(data)] = data
"""


def failing_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "failing.py"
    path.write_text(FAILING_PLUGIN)
    return open_backend("plugin", path=str(path))


# --- basics -----------------------------------------------------------------------------------


def test_round_trip_with_nbdclient(tmp_path):
    with serve(RamBackend(16 * MiB), tmp_path) as session:
        with connect(session) as client:
            assert client.size == 16 * MiB
            data = os.urandom(100_000)
            client.write(12345, data)
            assert client.read(12345, len(data)) == data
            client.write(0, b"fua", fua=True)
            client.flush()
            client.trim(MiB, MiB)
            client.write_zeroes(12345, 1000)
            client.write_zeroes(2 * MiB, 4096, no_hole=True)
            assert client.read(12345, 1000) == bytes(1000)
            assert client.read(13345, 99_000) == data[1000:]
            assert client.read(0, 3) == b"fua"


def test_ram_flags_advertised(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session, connect(session) as client:
        flags = client.flags
        for bit in (
            c.TF_HAS_FLAGS,
            c.TF_SEND_FLUSH,
            c.TF_SEND_FUA,
            c.TF_SEND_TRIM,
            c.TF_SEND_WRITE_ZEROES,
            c.TF_SEND_FAST_ZERO,
            c.TF_SEND_CACHE,
            c.TF_CAN_MULTI_CONN,
        ):
            assert flags & bit, f"bit {bit:#x} missing from {flags:#x}"
        assert not flags & c.TF_READ_ONLY
        assert not flags & c.TF_SEND_DF  # this client did not ask for structured replies


def test_read_only_export(tmp_path):
    with serve(RamBackend(MiB), tmp_path, readonly=True) as session, connect(session) as client:
        assert client.flags & c.TF_READ_ONLY
        assert not client.flags & (c.TF_SEND_TRIM | c.TF_SEND_WRITE_ZEROES)
        with pytest.raises(NBDError) as info:
            client.write(0, b"nope")
        assert info.value.errno == c.EPERM
        assert client.read(0, 4) == bytes(4)  # the connection goes on
        client.flush()


def test_minimal_plugin_advertises_nothing_optional(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(
        "class Tiny:\n    size = 65536\n    def __init__(self):\n        self.d = bytearray(65536)\n"
        "    def read(self, o, n):\n        return bytes(self.d[o:o+n])\n"
        "    def write(self, o, b):\n        self.d[o:o+len(b)] = b\n"
    )
    with serve(open_backend("plugin", path=str(path)), tmp_path) as session, connect(session) as client:
        assert not client.flags & (c.TF_SEND_FLUSH | c.TF_SEND_FUA | c.TF_SEND_TRIM | c.TF_CAN_MULTI_CONN)
        with pytest.raises(NBDError) as info:
            client.flush()
        assert info.value.errno == c.EINVAL
        with pytest.raises(NBDError):
            client.trim(0, 4096)
        with pytest.raises(NBDError) as info:
            client.write(0, b"x", fua=True)
        assert info.value.errno == c.EINVAL
        client.write(0, b"plain")
        assert client.read(0, 5) == b"plain"


def test_export_name(tmp_path):
    with serve(RamBackend(MiB), tmp_path, export_name="disk") as session:
        connect(session, "disk").close()
        connect(session, "").close()  # the default export is ours too
        with pytest.raises(ConnectionError, match="refused"):
            connect(session, "other")
        raw = RawClient(socket_path(session), handshake=False)
        raw.greet()
        raw.option(c.OPT_LIST)
        replies = raw.replies_until_final()
        assert replies == [(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x04disk"), (c.OPT_LIST, c.REP_ACK, b"")]
        raw.sock.close()


def test_where_names_the_export_in_its_uri(tmp_path):
    """The header, ctl status and the stats line show Session.where: a URI a client can use as is."""
    with serve(RamBackend(MiB), tmp_path, export_name="disk 1") as session:
        assert session.where == f"nbd+unix:///disk%201?socket={socket_path(session)}"
    with serve(RamBackend(MiB), tmp_path) as session:
        assert session.where == f"nbd+unix:///?socket={socket_path(session)}"


def test_tcp_listener(tmp_path):
    backend = RamBackend(MiB)
    session = Session(backend, ServeOptions())
    session.start()
    try:
        host, port = session.network.listen_tcp("127.0.0.1", 0)
        assert port > 0
        assert f"nbd://127.0.0.1:{port}" in session.network.addresses
        with NBDClient.connect_tcp(host, port) as client:
            client.write(0, b"tcp")
            assert client.read(0, 3) == b"tcp"
    finally:
        session.stop()


def test_max_payload_read_and_write(tmp_path):
    with serve(RamBackend(64 * MiB), tmp_path) as session, connect(session) as client:
        data = os.urandom(c.MAX_PAYLOAD)
        client.write(MiB, data)
        assert client.read(MiB, c.MAX_PAYLOAD) == data


def test_disc_closes_the_connection_after_answering(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 0, 4, payload=b"disc")
        raw.request(c.CMD_DISC, 2)
        assert raw.simple_reply() == (0, 1)
        assert raw.closed_by_server()
        with connect(session) as client:
            assert client.read(0, 4) == b"disc"


# --- many requests in flight, many clients ---------------------------------------------------------


def test_pipeline_64_requests_matched_by_handle(tmp_path):
    with serve(RamBackend(16 * MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        blocks = {i: os.urandom(4096 + 512 * (i % 5)) for i in range(64)}
        handles = {(1 << 63) | (i * 0x0101010101 + 7): i for i in range(64)}  # 64-bit handles come back intact
        burst = b"".join(
            encode_request(c.CMD_WRITE, h, i * 65536, len(blocks[i])) + blocks[i] for h, i in handles.items()
        )
        raw.send(burst)  # all 64 before reading a single reply
        answered = set()
        for _ in range(64):
            error, handle = raw.simple_reply()
            assert error == 0
            assert handle in handles and handle not in answered
            answered.add(handle)
        assert answered == set(handles)

        lengths = {h: len(blocks[i]) for h, i in handles.items()}
        raw.send(b"".join(encode_request(c.CMD_READ, h, i * 65536, lengths[h]) for h, i in handles.items()))
        seen = set()
        for _ in range(64):
            error, handle = raw.simple_reply()
            assert error == 0 and handle not in seen
            seen.add(handle)
            assert raw.recv_exact(lengths[handle]) == blocks[handles[handle]]
        assert seen == set(handles)
        raw.close()


def test_pipelined_mix_with_errors_stays_in_sync(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.send(
            encode_request(c.CMD_WRITE, 1, 0, 4)
            + b"abcd"
            + encode_request(c.CMD_READ, 2, MiB, 512)  # out of range: EINVAL, no data
            + encode_request(c.CMD_WRITE, 3, MiB - 2, 4)  # past the end: ENOSPC, payload consumed
            + b"wxyz"
            + encode_request(c.CMD_WRITE, 4, 4, 4, flags=1 << 9)  # unknown flag: EINVAL, payload consumed
            + b"1234"
            + encode_request(c.CMD_FLUSH, 5, 4096, 0)  # flush with an offset: EINVAL
            + encode_request(c.CMD_READ, 6, 0, 8)
        )
        assert raw.simple_reply() == (0, 1)
        assert raw.simple_reply() == (c.EINVAL, 2)
        assert raw.simple_reply() == (c.ENOSPC, 3)
        assert raw.simple_reply() == (c.EINVAL, 4)
        assert raw.simple_reply() == (c.EINVAL, 5)
        assert raw.simple_reply() == (0, 6)
        assert raw.recv_exact(8) == b"abcd" + bytes(4)
        raw.close()


def test_queued_replies_go_out_while_a_write_payload_is_awaited(tmp_path):
    # The client must get its READ answer even though the server then blocks
    # waiting for the rest of a large write's payload (no deadlock).
    with serve(RamBackend(8 * MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        for size in (2 * MiB, 8192):  # large payloads go straight in, small ones via the buffer
            payload = os.urandom(size)
            raw.send(encode_request(c.CMD_READ, 1, 0, 16) + encode_request(c.CMD_WRITE, 2, 0, size) + payload[:100])
            assert raw.simple_reply() == (0, 1)
            raw.recv_exact(16)
            raw.send(payload[100:])
            assert raw.simple_reply() == (0, 2)
            assert raw.read(0, size, handle=3) == payload
        raw.close()


def test_several_clients_at_once(tmp_path):
    with serve(RamBackend(32 * MiB), tmp_path) as session:
        n_clients, region = 4, 4 * MiB
        barrier = threading.Barrier(n_clients)
        errors: list[BaseException] = []
        written: dict[int, bytes] = {}

        def work(k: int) -> None:
            try:
                with connect(session) as client:
                    barrier.wait(TIMEOUT)
                    data = os.urandom(region)
                    for off in range(0, region, 256 * 1024):
                        client.write(k * region + off, data[off : off + 256 * 1024])
                    client.flush()
                    assert client.read(k * region, region) == data
                    written[k] = data
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(written) == n_clients
        with connect(session) as checker:
            for k, data in written.items():
                assert checker.read(k * region, region) == data


# --- structured replies, block status ---------------------------------------------------------------


def test_structured_read_is_one_offset_data_chunk(tmp_path):
    with serve(RamBackend(4 * MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True, meta=True)
        assert raw.flags & c.TF_SEND_DF  # DF is advertised once structured replies are on
        data = os.urandom(5000)
        raw.request(c.CMD_WRITE, 1, 777, len(data), payload=data)
        assert raw.simple_reply() == (0, 1)  # non-read replies may stay simple
        raw.request(c.CMD_READ, 2, 777, len(data), flags=c.CMD_FLAG_DF)
        flags, rtype, handle, payload = raw.chunk()
        assert (flags, rtype, handle) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, 2)
        assert len(payload) == 8 + len(data)
        assert struct.unpack_from(">Q", payload)[0] == 777
        assert payload[8:] == data
        raw.close()


def test_structured_read_error_is_an_error_chunk_without_data(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True)
        raw.request(c.CMD_READ, 5, MiB, 4096)  # out of range
        raw.request(c.CMD_READ, 6, 0, 4)
        flags, rtype, handle, payload = raw.chunk()
        assert (flags, rtype, handle) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, 5)
        error, msg_len = struct.unpack_from(">IH", payload)
        assert error == c.EINVAL
        assert len(payload) == 6 + msg_len
        flags, rtype, handle, payload = raw.chunk()
        assert (rtype, handle, payload) == (c.REPLY_TYPE_OFFSET_DATA, 6, bytes(8) + bytes(4))
        raw.close()


def block_status(raw: RawClient, handle: int, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
    raw.request(c.CMD_BLOCK_STATUS, handle, offset, length, flags)
    cflags, rtype, got, payload = raw.chunk()
    assert (cflags, rtype, got) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, handle)
    assert struct.unpack_from(">I", payload)[0] == raw.context_id
    body = payload[4:]
    return [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]


def test_block_status_shows_holes_of_the_ram_disk(tmp_path):
    with serve(RamBackend(4 * MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True, meta=True)
        assert raw.context_id is not None
        assert block_status(raw, 1, 0, 4 * MiB) == [(4 * MiB, HOLE)]
        raw.request(c.CMD_WRITE, 2, MiB, 8192, payload=b"\x01" * 8192)
        assert raw.simple_reply() == (0, 2)
        assert block_status(raw, 3, 0, 4 * MiB) == [(MiB, HOLE), (8192, 0), (3 * MiB - 8192, HOLE)]
        assert block_status(raw, 4, 0, 4 * MiB, c.CMD_FLAG_REQ_ONE) == [(MiB, HOLE)]
        raw.request(c.CMD_TRIM, 5, MiB, 4096)
        assert raw.simple_reply() == (0, 5)
        assert block_status(raw, 6, MiB, MiB) == [(4096, HOLE), (4096, 0), (MiB - 8192, HOLE)]
        raw.close()


def test_block_status_on_a_sparse_file(tmp_path):
    disk = open_backend("file", path=str(tmp_path / "sparse.img"), size=8 * MiB)
    with serve(disk, tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True, meta=True)
        raw.request(c.CMD_WRITE, 1, 2 * MiB, MiB, payload=os.urandom(MiB))
        assert raw.simple_reply() == (0, 1)
        assert block_status(raw, 2, 0, 8 * MiB) == [(2 * MiB, HOLE), (MiB, 0), (5 * MiB, HOLE)]
        raw.request(c.CMD_TRIM, 3, 2 * MiB, MiB)
        assert raw.simple_reply() == (0, 3)
        assert block_status(raw, 4, 0, 8 * MiB) == [(8 * MiB, HOLE)]
        raw.close()


def test_block_status_needs_meta_context_and_range(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True)  # no SET_META_CONTEXT
        raw.request(c.CMD_BLOCK_STATUS, 1, 0, 4096)
        _, rtype, handle, payload = raw.chunk()
        assert (rtype, handle) == (c.REPLY_TYPE_ERROR, 1)
        assert struct.unpack_from(">I", payload)[0] == c.EINVAL
        raw.close()
        raw = RawClient(socket_path(session), structured=True, meta=True)
        raw.request(c.CMD_BLOCK_STATUS, 2, MiB - 512, 4096)  # past the end
        _, rtype, handle, payload = raw.chunk()
        assert (rtype, handle) == (c.REPLY_TYPE_ERROR, 2)
        assert struct.unpack_from(">I", payload)[0] == c.EINVAL
        assert block_status(raw, 3, 0, 4096) == [(4096, HOLE)]  # still serving
        raw.close()


def test_df_refused_without_structured_replies(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_READ, 1, 0, 512, flags=c.CMD_FLAG_DF)
        assert raw.simple_reply() == (c.EINVAL, 1)
        assert raw.read(0, 4, handle=2) == bytes(4)
        raw.close()


# --- telemetry ------------------------------------------------------------------------------------


def test_telemetry_counts_what_was_sent(tmp_path):
    with serve(RamBackend(4 * MiB), tmp_path) as session:
        telemetry = session.engine.telemetry
        with connect(session) as client:
            for i in range(3):
                client.write(i * 4096, bytes([65 + i]) * 4096)
            client.read(0, 8192)
            client.read(4096, 8192)
            client.flush()
            client.trim(MiB, 65536)
            client.write_zeroes(2 * MiB, 16384)
            with pytest.raises(NBDError):
                client.read(4 * MiB, 512)  # out of range
            snap = telemetry.snapshot()
            assert snap.connections == 1
        assert snap.count[c.CMD_WRITE] == 3
        assert snap.bytes[c.CMD_WRITE] == 3 * 4096
        assert snap.count[c.CMD_READ] == 3
        assert snap.bytes[c.CMD_READ] == 2 * 8192  # the failed read moved no bytes
        assert snap.errors[c.CMD_READ] == 1
        assert snap.errors[c.CMD_WRITE] == 0
        assert snap.count[c.CMD_FLUSH] == 1
        assert (snap.count[c.CMD_TRIM], snap.bytes[c.CMD_TRIM]) == (1, 65536)
        assert (snap.count[c.CMD_WRITE_ZEROES], snap.bytes[c.CMD_WRITE_ZEROES]) == (1, 16384)
        assert snap.total_requests == 9
        assert sum(sum(h) for h in snap.latency) == 9

        records = telemetry.recent()
        assert [r.op for r in records] == ["WRITE"] * 3 + ["READ", "READ", "FLUSH", "TRIM", "WRITE_ZEROES", "READ"]
        assert [(r.offset, r.length) for r in records[:5]] == [
            (0, 4096),
            (4096, 4096),
            (8192, 4096),
            (0, 8192),
            (4096, 8192),
        ]
        assert records[0].preview == b"A" * 1024  # first KiB of the data written
        assert records[4].preview == b"B" * 1024  # ...and of the data read
        assert records[-1].error == c.EINVAL and records[-1].offset == 4 * MiB
        assert all(r.error == 0 for r in records[:-1])
        assert all(r.latency >= 0 for r in records)
        assert len({r.conn for r in records}) == 1
        assert [r.seq for r in records] == sorted(r.seq for r in records)
        # The heatmap saw the writes at the start of the disk.
        assert snap.heat[1][0] >= 1
        wait_for(lambda: telemetry.snapshot().connections == 0)


def test_telemetry_counts_pipelined_requests_of_several_connections(tmp_path):
    with serve(RamBackend(4 * MiB), tmp_path) as session:
        raws = [RawClient(socket_path(session)) for _ in range(3)]
        for raw in raws:
            raw.send(b"".join(encode_request(c.CMD_WRITE, i, i * 512, 512) + bytes(512) for i in range(20)))
        for raw in raws:
            for _ in range(20):
                assert raw.simple_reply()[0] == 0
        snap = session.engine.telemetry.snapshot()
        assert snap.count[c.CMD_WRITE] == 60
        assert snap.bytes[c.CMD_WRITE] == 60 * 512
        assert snap.connections == 3
        assert len({r.conn for r in session.engine.telemetry.recent()}) == 3
        for raw in raws:
            raw.close()


# --- a backend that fails --------------------------------------------------------------------------


def test_failed_read_sends_no_data_and_the_connection_goes_on(tmp_path):
    with serve(failing_backend(tmp_path), tmp_path) as session:
        raw = RawClient(socket_path(session))
        raw.request(c.CMD_WRITE, 1, 0, 4, payload=b"good")
        raw.request(c.CMD_READ, 2, FAIL_AT - 4096, 8192)  # the plugin raises
        raw.request(c.CMD_READ, 3, 0, 4)
        assert raw.simple_reply() == (0, 1)
        assert raw.simple_reply() == (c.EIO, 2)
        # If any data followed the error, this header would be garbage.
        assert raw.simple_reply() == (0, 3)
        assert raw.recv_exact(4) == b"good"
        raw.request(c.CMD_WRITE, 4, FAIL_AT, 4, payload=b"full")
        assert raw.simple_reply() == (c.ENOSPC, 4)
        assert raw.read(0, 4, handle=5) == b"good"
        raw.close()
        with connect(session) as client:
            with pytest.raises(NBDError) as info:
                client.read(FAIL_AT, 512)
            assert info.value.errno == c.EIO
            assert client.read(0, 4) == b"good"
        assert session.engine.telemetry.snapshot().errors[c.CMD_READ] == 2


def test_failed_structured_read_is_an_error_chunk_only(tmp_path):
    with serve(failing_backend(tmp_path), tmp_path) as session:
        raw = RawClient(socket_path(session), structured=True)
        raw.request(c.CMD_READ, 7, FAIL_AT, 4096)
        raw.request(c.CMD_READ, 8, 0, 4)
        flags, rtype, handle, payload = raw.chunk()
        assert (flags, rtype, handle) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, 7)
        assert struct.unpack_from(">I", payload)[0] == c.EIO
        assert raw.chunk() == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_OFFSET_DATA, 8, bytes(12))
        raw.close()


def test_stop_closes_clients_and_removes_the_socket(tmp_path):
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session))
        path = socket_path(session)
    assert not os.path.exists(path)
    assert raw.closed_by_server(5)


def test_abort_is_acknowledged_then_closed(tmp_path, caplog):
    caplog.set_level("WARNING", logger="buselab")
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), handshake=False)
        raw.greet()
        raw.option(c.OPT_ABORT)
        assert raw.option_reply() == (c.OPT_ABORT, c.REP_ACK, b"")
        assert raw.closed_by_server()
        wait_for(lambda: session.engine.telemetry.snapshot().connections == 0)
    assert [r for r in caplog.records if r.name == "buselab"] == []  # aborting is not an error


def test_info_then_go_over_a_socket(tmp_path):
    with serve(RamBackend(3 * MiB), tmp_path, export_name="d") as session:
        raw = RawClient(socket_path(session), handshake=False)
        raw.greet()
        raw.option(c.OPT_INFO, struct.pack(">I", 1) + b"d" + struct.pack(">HH", 1, c.INFO_NAME))
        replies = raw.replies_until_final()
        infos = {struct.unpack_from(">H", p)[0]: p[2:] for _, t, p in replies if t == c.REP_INFO}
        assert struct.unpack(">QH", infos[c.INFO_EXPORT])[0] == 3 * MiB
        assert infos[c.INFO_NAME] == b"d"
        assert struct.unpack(">III", infos[c.INFO_BLOCK_SIZE]) == (1, 4096, c.MAX_PAYLOAD)
        raw.option(c.OPT_GO, struct.pack(">I", 1) + b"d" + struct.pack(">H", 0))
        assert raw.replies_until_final()[-1][1] == c.REP_ACK
        assert raw.read(0, 4) == bytes(4)
        raw.close()


def test_requests_sent_together_with_the_go_option(tmp_path):
    # A client may send its first requests right behind NBD_OPT_GO, in one packet.
    with serve(RamBackend(MiB), tmp_path) as session:
        raw = RawClient(socket_path(session), handshake=False)
        raw.greet()
        go = struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, 6) + struct.pack(">IH", 0, 0)
        raw.send(go + encode_request(c.CMD_WRITE, 1, 0, 5) + b"early" + encode_request(c.CMD_READ, 2, 0, 5))
        assert raw.replies_until_final()[-1][1] == c.REP_ACK
        assert raw.simple_reply() == (0, 1)
        assert raw.simple_reply() == (0, 2)
        assert raw.recv_exact(5) == b"early"
        raw.close()


def test_backend_errors_logged_only_for_bugs(tmp_path, caplog):
    caplog.set_level("WARNING", logger="buselab")
    with serve(failing_backend(tmp_path), tmp_path) as session, connect(session) as client:
        with pytest.raises(NBDError) as info:
            client.write(FAIL_AT, b"x")  # OSError(ENOSPC): an expected failure, not logged
        assert info.value.errno == c.ENOSPC
        assert [r for r in caplog.records if r.name == "buselab"] == []
        for _ in range(3):
            with pytest.raises(NBDError) as info:
                client.read(FAIL_AT, 512)  # RuntimeError: a bug in the plugin, logged
            assert info.value.errno == c.EIO
        messages = [r.getMessage() for r in caplog.records if r.name == "buselab"]
        assert messages and all("RuntimeError: the disk is on fire" in m for m in messages)
        assert client.read(0, 4) == bytes(4)


def test_a_lone_request_is_answered_before_its_bookkeeping(session, monkeypatch) -> None:
    """At iodepth 1 the client waits for each reply: telemetry comes after it (not while a trace
    is recorded: tests/test_trace_replay.py, the recorded read's hash)."""
    import threading

    from buselab.client import NBDClient

    telemetry = session.engine.telemetry
    in_record = threading.Event()
    go_on = threading.Event()
    record = telemetry.record

    def slow_record(*args):
        in_record.set()
        go_on.wait(30)
        return record(*args)

    monkeypatch.setattr(telemetry, "record", slow_record)  # connections look it up when they start
    try:
        with NBDClient.connect_unix(socket_path(session)) as nbd:
            written = threading.Event()
            writer = threading.Thread(target=lambda: (nbd.write(0, b"x" * 4096), written.set()))
            writer.start()
            # The reply comes while the bookkeeping still blocks; before, it waited for it.
            assert written.wait(5), "the reply waited for the telemetry"
            assert in_record.is_set() or in_record.wait(5)
            go_on.set()
            writer.join()
            assert nbd.read(0, 4096) == b"x" * 4096
    finally:
        go_on.set()
    assert telemetry.snapshot().count[c.CMD_WRITE] == 1


@pytest.mark.parametrize("scale", [1, 16], ids=["real-buffer", "buffer-16x-smaller"])
def test_pipelined_writes_of_every_size_land_intact(tmp_path, monkeypatch, scale) -> None:
    """Requests sent back to back, big and small, cross the receive buffer's end many times.

    Writes up to _SMALL_WRITE are applied from where they were received, bigger ones are
    assembled apart; a request split across the buffer's end must be moved, not lost or
    mixed up. With the buffer 16x smaller the same code moves partial requests hundreds
    of times in this test.
    """
    import random
    import threading

    from buselab.transport import connection

    monkeypatch.setattr(connection, "_SMALL_WRITE", connection._SMALL_WRITE // scale)
    monkeypatch.setattr(connection, "_RECV_BUFFER", connection._RECV_BUFFER // scale)
    rng = random.Random(5)
    size = 32 * MiB
    model = bytearray(size)
    blob = bytearray()
    expected_reads: list[tuple[int, bytes]] = []
    handle = 0
    small = connection._SMALL_WRITE
    for _ in range(300):
        handle += 1
        length = rng.choice([0, 512, 4096, 12_345, small // 3, small - 28, small, small + 4096, 3 * small // 2])
        offset = rng.randrange(0, size - length + 1) // 512 * 512
        if rng.random() < 0.6:
            data = rng.randbytes(length)
            model[offset : offset + length] = data
            blob += encode_request(c.CMD_WRITE, handle, offset, length) + data
        else:
            blob += encode_request(c.CMD_READ, handle, offset, length)
            expected_reads.append((handle, bytes(model[offset : offset + length])))
    reads = dict(expected_reads)
    with serve(RamBackend(size), tmp_path) as session:
        raw = RawClient(socket_path(session))
        sender = threading.Thread(target=raw.send, args=(bytes(blob),))
        sender.start()
        for _ in range(handle):
            error, got = raw.simple_reply()
            assert error == 0, f"request {got} failed with {error}"
            if got in reads:
                assert raw.recv_exact(len(reads[got])) == reads[got], f"READ {got} returned other data"
        sender.join()
        with connect(session) as nbd:
            assert nbd.read(0, size) == bytes(model)
