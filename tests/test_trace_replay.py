"""Record a real workload over NBD, replay it elsewhere, and check the result byte for byte.

The recording is the built-in demo workload (a file-system-like story: format,
files written and read back, a journal with FUA and FLUSH, TRIM, random
reads) against an in-process Session on a Unix socket, plus WRITE_ZEROES; and,
as root with nbdfuse, mkfs.ext4 itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import missing, require_root, require_tool

from buselab.client import NBDClient
from buselab.engine import Engine
from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.trace.format import data_hash, open_trace, read_trailer
from buselab.trace.recorder import TraceRecorder
from buselab.trace.replay import Replayer, device_checksum, open_replay_backend, replay
from buselab.workload import DemoWorkload

SIZE = 32 << 20


def image_digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def drive(sock: str, rounds: int = 3) -> None:
    with NBDClient.connect_unix(sock) as nbd:
        workload = DemoWorkload(sock, pace=0, seed=7)
        for _ in range(rounds):
            workload.run_round(nbd)
        assert not workload.errors
        nbd.write_zeroes(3 << 20, 64 << 10)  # may punch a hole
        nbd.write_zeroes(5 << 20, 8 << 10, no_hole=True)
        nbd.write(SIZE - 4096, b"tail" * 1024)
        assert nbd.read(SIZE - 4096, 4096) == b"tail" * 1024


def record_demo(directory: Path, name: str = "demo.jsonl.zst", **recorder_options) -> tuple[str, str]:
    """Record the demo workload; (trace path, checksum of the image it left)."""
    path = str(directory / name)
    sock = str(directory / f"{name}.sock")
    options = ServeOptions(unix=[sock], record=None if recorder_options else path)
    session = Session(open_backend("ram", size=SIZE), options)
    if recorder_options:
        session.recorder = TraceRecorder.start(session.engine, path, **recorder_options)
    session.start()
    try:
        drive(sock)
        digest = image_digest(session.backend.read(0, SIZE))
    finally:
        session.stop()
    assert session.recorder.error is None
    return path, digest


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, str]:
    return record_demo(tmp_path_factory.mktemp("trace"))


def trace_records(path: str) -> list[dict]:
    """The records, read with json alone (not the code under test)."""
    import zstandard

    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["format"] == "buselab-trace" and lines[-1]["end"] is True
    return lines[1:-1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "buselab", *args], capture_output=True, text=True, timeout=timeout)


# -- the recording itself --------------------------------------------------------------


def test_recording_holds_every_request_with_hashes_and_payloads(demo) -> None:
    path, _ = demo
    records = trace_records(path)
    ops = {r["op"] for r in records}
    assert {"READ", "WRITE", "FLUSH", "TRIM", "WRITE_ZEROES"} <= ops
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert len({r["seq"] for r in records}) == len(records)
    assert read_trailer(path)["records"] == len(records)
    for r in records:
        if r["op"] == "WRITE":
            data = bytes(r["length"]) if r.get("zeros") else base64.b64decode(r["data"])
            assert len(data) == r["length"]
            assert r["hash"] == f"{__import__('zlib').crc32(data):08x}"
        elif r["op"] == "READ":
            assert len(r["hash"]) == 8 and "data" not in r
        else:
            assert "hash" not in r
    fua = [r for r in records if r["op"] == "WRITE" and r["flags"] & c.CMD_FLAG_FUA]
    assert fua, "the demo's journal commit is a FUA write"
    nohole = [r for r in records if r["op"] == "WRITE_ZEROES" and r["flags"] & c.CMD_FLAG_NO_HOLE]
    assert len(nohole) == 1


# -- replay: identical images ----------------------------------------------------------------


def test_replay_on_a_fresh_ram_disk_gives_the_same_image(demo) -> None:
    path, digest = demo
    summary = replay(path, "ram", speed=None, checksum=True)
    reads = sum(1 for r in trace_records(path) if r["op"] == "READ")
    assert summary.ok, summary.lines()
    assert summary.reads_compared == reads and summary.reads_matched == reads
    assert summary.requests == summary.executed == len(trace_records(path))
    assert summary.checksum == digest


def test_replay_on_a_file_gives_the_same_image(demo, tmp_path: Path) -> None:
    path, digest = demo
    image = tmp_path / "disk.img"
    summary = replay(path, f"file:{image}", speed=None)
    assert summary.ok, summary.lines()
    assert image.stat().st_size == SIZE  # created at the trace's size
    assert image_digest(image.read_bytes()) == digest


def test_replay_cli_exit_zero_and_checksum(demo, tmp_path: Path) -> None:
    path, digest = demo
    proc = run_cli("replay", path, "--backend", f"file:{tmp_path / 'img'}", "--afap", "--headless", "--checksum")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"device checksum (blake2b-128): {digest}" in proc.stdout
    assert "divergences: 0" in proc.stdout
    proc = run_cli("replay", path, "--afap", "--headless", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["divergences"] == 0 and result["first_divergence"] is None


# -- replay: finding a broken driver ------------------------------------------------------------

BROKEN_PLUGIN = '''
class BrokenDisk:
    """Right until BAD, then every byte it returns is flipped."""

    BAD = {bad}

    def __init__(self, size):
        self.size = size
        self.data = bytearray(size)

    def read(self, offset, length):
        out = bytearray(self.data[offset:offset + length])
        for i in range(max(self.BAD, offset), offset + length):
            out[i - offset] ^= 0xFF
        return bytes(out)

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def flush(self):
        pass

    def trim(self, offset, length):
        self.data[offset:offset + length] = bytes(length)
'''


def test_broken_plugin_is_reported_at_the_right_request(demo, tmp_path: Path) -> None:
    path, _ = demo
    records = trace_records(path)
    reads = [(i, r) for i, r in enumerate(records, 1) if r["op"] == "READ" and not r["error"]]
    # A threshold that some reads cross and some earlier ones do not.
    bad = sorted(r["offset"] + r["length"] for _, r in reads)[len(reads) // 2] - 1
    expected_index, expected = next((i, r) for i, r in reads if r["offset"] + r["length"] > bad)
    assert expected_index > 1
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN_PLUGIN.format(bad=bad))

    summary = replay(path, f"plugin:{plugin}", speed=None)
    assert not summary.ok
    first = summary.first
    assert first is not None and first.kind == "data"
    assert first.index == expected_index
    assert (first.offset, first.length, first.line) == (expected["offset"], expected["length"], expected_index + 1)
    assert first.expected == expected["hash"] and first.got != expected["hash"]
    assert summary.reads_matched + summary.divergences == summary.reads_compared

    proc = run_cli("replay", path, "--backend", f"plugin:{plugin}", "--afap", "--headless", "-q")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"first divergence: request {expected_index} (line {expected_index + 1}" in proc.stdout
    assert f"READ offset {expected['offset']} length {expected['length']}" in proc.stdout
    assert f"expected crc32 {expected['hash']}" in proc.stdout

    stopped = replay(path, f"plugin:{plugin}", speed=None, stop_on_divergence=True)
    assert stopped.stopped and stopped.requests == expected_index and stopped.divergences == 1


def test_a_backend_without_trim_is_adapted_and_the_reads_tell(demo, tmp_path: Path) -> None:
    path, _ = demo
    plugin = tmp_path / "notrim.py"
    plugin.write_text(
        "class NoTrim:\n"
        "    def __init__(self, size):\n        self.size = size\n        self.data = bytearray(size)\n"
        "    def read(self, offset, length):\n        return bytes(self.data[offset:offset + length])\n"
        "    def write(self, offset, data):\n        self.data[offset:offset + len(data)] = data\n"
    )
    summary = replay(path, f"plugin:{plugin}", speed=None)
    trims = sum(1 for r in trace_records(path) if r["op"] == "TRIM")
    flushes = sum(1 for r in trace_records(path) if r["op"] == "FLUSH")
    assert summary.adapted["TRIM skipped (backend has none)"] == trims
    assert summary.adapted["FLUSH skipped (backend has none)"] == flushes
    assert summary.adapted["FUA dropped"] >= 1
    assert summary.skipped == trims + flushes


# -- replay: refusals ----------------------------------------------------------------------------


def test_trace_for_a_bigger_device_is_refused_before_any_request(demo, tmp_path: Path) -> None:
    path, _ = demo
    image = tmp_path / "small.img"
    image.write_bytes(b"\xaa" * (1 << 20))
    with pytest.raises(UserError, match="is for a 32.0 MiB device .* but the backend has 1.0 MiB"):
        replay(path, f"file:{image}", speed=None)
    assert image.read_bytes() == b"\xaa" * (1 << 20)  # untouched
    proc = run_cli("replay", path, "--backend", "ram:1M", "--headless")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--backend ram:33554432" in proc.stderr


def test_bad_backend_specs(demo) -> None:
    path, _ = demo
    for spec, words in [
        ("floppy", "unknown backend"),
        ("file:", "needs a path"),
        ("plugin:/nope.py", "does not exist"),
    ]:
        proc = run_cli("replay", path, "--backend", spec, "--headless")
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert open_replay_backend("ram:1M", SIZE).size == 1 << 20
    assert open_replay_backend("null", SIZE).size == SIZE


def test_requests_past_the_end_are_refused_not_run(tmp_path: Path) -> None:
    """A trace whose records point past its own device: replay must never write there."""
    size = 1 << 20
    header = {"format": "buselab-trace", "version": 1, "size": size, "payload": "writes", "hash": "crc32"}
    data = b"\x55" * 8192
    lines = [
        header,
        {
            "seq": 1,
            "t": 0,
            "op": "WRITE",
            "flags": 0,
            "offset": size - 4096,
            "length": 8192,
            "latency": 0,
            "error": 0,
            "conn": 1,
            "handle": 1,
            "data": base64.b64encode(data).decode(),
        },
        {
            "seq": 2,
            "t": 0,
            "op": "WRITE",
            "flags": 0,
            "offset": 0,
            "length": 8192,
            "latency": 0,
            "error": 0,
            "conn": 1,
            "handle": 2,
            "data": base64.b64encode(data).decode(),
        },
        {"end": True, "records": 2},
    ]
    path = tmp_path / "past.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    plugin = tmp_path / "watch.py"
    plugin.write_text(
        "class Watch:\n    writes = []\n"
        "    def __init__(self, size):\n        self.size = size\n        self.data = bytearray(size)\n"
        "    def read(self, offset, length):\n        return bytes(self.data[offset:offset + length])\n"
        "    def write(self, offset, data):\n        Watch.writes.append((offset, len(data)))\n"
    )
    engine = Engine(open_replay_backend(f"plugin:{plugin}", size))
    try:
        summary = Replayer(engine, str(path), speed=None).run()
        assert type(engine.backend.disk).writes == [(0, 8192)]  # the one past the end never reached it
    finally:
        engine.close()
    assert summary.refused == 1 and summary.executed == 1
    assert summary.first is not None and summary.first.index == 1 and summary.first.kind == "result"
    assert summary.first.expected == "OK" and summary.first.got == "ENOSPC"


def test_without_write_payloads_replay_needs_synthetic_writes(tmp_path: Path) -> None:
    path, _ = record_demo(tmp_path, "nopayload.jsonl.zst", payload="none")
    records = trace_records(path)
    assert all("data" not in r and "zeros" not in r for r in records)
    assert all("hash" in r for r in records if r["op"] in ("READ", "WRITE"))
    with pytest.raises(UserError, match="without write payloads.*--synthetic-writes"):
        replay(path, "ram", speed=None)
    proc = run_cli("replay", path, "--headless", "--afap")
    assert proc.returncode == 2 and "--synthetic-writes" in proc.stderr and "Traceback" not in proc.stderr
    summary = replay(path, "ram", speed=None, synthetic_writes=True)
    assert summary.ok and not summary.verify_reads and summary.reads_compared == 0
    assert summary.executed == len(records)


# -- pacing ------------------------------------------------------------------------------------------


def test_speed_keeps_the_recorded_spacing(tmp_path: Path) -> None:
    lines = [{"format": "buselab-trace", "version": 1, "size": 1 << 20}]
    for i, t in enumerate([0.0, 0.2, 0.4], 1):
        lines.append({"seq": i, "t": t, "op": "FLUSH", "offset": 0, "length": 0, "latency": 0, "error": 0})
    lines.append({"end": True, "records": 3})
    path = tmp_path / "paced.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    began = time.monotonic()
    assert replay(str(path), "ram", speed=1.0).ok
    assert 0.38 <= time.monotonic() - began < 2.0
    began = time.monotonic()
    assert replay(str(path), "ram", speed=4.0).ok
    assert 0.09 <= time.monotonic() - began < 0.35
    began = time.monotonic()
    assert replay(str(path), "ram", speed=None).ok
    assert time.monotonic() - began < 0.09


# -- recording at runtime, and a recording cut short ------------------------------------------------


def test_recorder_started_and_stopped_at_runtime(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock]))
    session.start()
    try:
        with NBDClient.connect_unix(sock) as nbd:
            nbd.write(0, b"a" * 4096)  # before: not recorded
            recorder = TraceRecorder.start(session.engine, str(tmp_path / "mid.jsonl"), payload="all")
            nbd.write(4096, b"b" * 4096)
            assert nbd.read(4096, 4096) == b"b" * 4096
            info = recorder.stop()
            assert recorder.stop() == info  # idempotent
            nbd.write(8192, b"c" * 4096)  # after: not recorded
    finally:
        session.stop()
    assert info.records == 2 and info.complete and info.error is None
    with open_trace(str(tmp_path / "mid.jsonl")) as reader:
        records = list(reader)
    assert [(r.op, r.offset) for r in records] == [("WRITE", 4096), ("READ", 4096)]
    assert records[1].data == b"b" * 4096  # payload "all" keeps reads too
    assert session.engine.telemetry.taps == []


def test_unwritable_trace_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "ram",
        "--size",
        "1M",
        "--unix",
        str(tmp_path / "s"),
        "--headless",
        "--seconds",
        "1",
        "--record",
        str(tmp_path / "no" / "such" / "dir" / "t.jsonl"),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot write trace" in proc.stderr


def test_killed_server_leaves_a_trace_that_says_it_was_cut_short(buselab_server, tmp_path: Path) -> None:
    trace = str(tmp_path / "killed.jsonl.zst")
    served = buselab_server(["ram", "--size", "4M", "--record", trace])
    with NBDClient.connect_unix(served.socket) as nbd:
        for i in range(50):
            nbd.write(i * 4096, bytes([i]) * 4096)
            nbd.read(i * 4096, 4096)
        time.sleep(1.6)  # the writer flushes within its 1 s interval even when idle
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
    # The writer sees its input end and closes the file; what it had is on disk, with no end line.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if sum(1 for _ in open_trace(trace, partial=True)) == 100:
                break
        except UserError:
            pass
        time.sleep(0.1)
    proc = run_cli("stats", trace)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "--partial" in proc.stderr, proc.stderr
    proc = run_cli("stats", trace, "--partial", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requests"] == 100
    proc = run_cli("replay", trace, "--partial", "--afap", "--headless", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matched: 50" in proc.stdout and "cut short" in proc.stdout


def test_sigint_ends_the_trace_properly(buselab_server, tmp_path: Path) -> None:
    trace = str(tmp_path / "clean.jsonl.gz")
    served = buselab_server(["ram", "--size", "4M", "--record", trace])
    with NBDClient.connect_unix(served.socket) as nbd:
        nbd.write(0, b"x" * 4096)
        nbd.flush()
    assert served.stop(signal.SIGINT) == 0
    trailer = read_trailer(trace)
    assert trailer is not None and trailer["records"] == 2 and trailer["ops"] == {"WRITE": 1, "FLUSH": 1}


# -- mkfs.ext4, the real thing ----------------------------------------------------------------------------


@pytest.mark.root
def test_mkfs_ext4_recorded_through_nbdfuse_replays_identically(buselab_server, tmp_path: Path) -> None:
    require_root()
    require_tool("nbdfuse", "mkfs.ext4")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        missing("fusermount is not installed")
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse does not exist")
    trace = str(tmp_path / "mkfs.jsonl.zst")
    served = buselab_server(["ram", "--size", "64M", "--record", trace])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(mnt), "--unix", served.socket])
    try:
        wait_for_file(mnt / "nbd", fuse)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(mnt / "nbd")], check=True, timeout=120)
        image = image_digest((mnt / "nbd").read_bytes())
    finally:
        subprocess.run([fusermount, "-u", str(mnt)], check=False)
        fuse.wait(20)
    assert served.stop() == 0
    assert read_trailer(trace) is not None
    summary = replay(trace, "ram", speed=None, checksum=True)
    assert summary.ok, summary.lines()
    assert summary.reads_compared > 0
    assert summary.checksum == image
    file_image = tmp_path / "replayed.img"
    assert replay(trace, f"file:{file_image}", speed=None).ok
    assert image_digest(file_image.read_bytes()) == image
    out = subprocess.run(["dumpe2fs", "-h", str(file_image)], capture_output=True, text=True)
    if out.returncode == 0:
        assert "Filesystem magic number:  0xEF53" in out.stdout


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nbdfuse exited with {proc.returncode}")
        if path.exists():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear")


def test_device_checksum_matches_a_plain_hash() -> None:
    backend = open_backend("ram", size=3 << 20)
    backend.write(12345, b"hello")
    try:
        assert device_checksum(backend) == image_digest(bytes(backend.read(0, 3 << 20)))
    finally:
        backend.close()


def test_a_failing_recording_stops_but_serving_goes_on(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        missing("/dev/full does not exist")
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock], record="/dev/full"))
    session.start()
    try:
        with NBDClient.connect_unix(sock) as nbd:
            deadline = time.monotonic() + 10
            while session.recorder.error is None and time.monotonic() < deadline:
                nbd.write(0, b"z" * 4096)
                time.sleep(0.01)
            assert session.engine.telemetry.taps == []  # detached: no more queueing
            nbd.write(4096, b"w" * 4096)
            assert nbd.read(4096, 4096) == b"w" * 4096
    finally:
        session.stop()
    info = session.recorder.info()
    assert info.error == "No space left on device" and not info.complete
    assert any("recording to /dev/full failed" in message for _, message in session.engine.telemetry.events)


def test_a_slow_writer_slows_serving_rather_than_losing_requests(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=4 << 20), ServeOptions(unix=[sock]))
    session.start()
    path = str(tmp_path / "tight.jsonl.gz")  # gzip: the slow compressor
    session.recorder = TraceRecorder.start(session.engine, path, backlog_limit=64 << 10, level=6)
    try:
        with NBDClient.connect_unix(sock) as nbd:
            for i in range(200):
                nbd.write((i % 64) * 65536, os.urandom(32768))
    finally:
        session.stop()
    info = session.recorder.info()
    assert info.error is None and info.complete
    assert info.records == 200 and info.payload_bytes == 200 * 32768
    assert sum(1 for _ in open_trace(path)) == 200


def _hold_after_first_reply(monkeypatch, number: int = 1) -> list:
    """Connection `number`'s first sending of replies sleeps 0.5 s after it (the GIL let go)."""
    from buselab.transport.connection import Connection

    flush = Connection._flush_replies
    held: list = []

    def flush_then_wait(self) -> None:
        flush(self)
        if not held and self.number == number:
            held.append(self.number)
            time.sleep(0.5)  # without the GIL: the other connection runs

    monkeypatch.setattr(Connection, "_flush_replies", flush_then_wait)
    return held


@pytest.mark.parametrize("recording", [False, True])
def test_a_request_sent_after_a_reply_is_numbered_and_recorded_after_it(
    tmp_path: Path, monkeypatch, recording: bool
) -> None:
    """A request's seq comes before that of any request a client sends once it has the reply.

    The first write's thread is held for a moment just after its reply has gone out. Meanwhile
    the client, holding that reply, reads the block back on a second connection, and that read
    is finished first. The write must still have the smaller seq (without a recorder its reply
    went out before its bookkeeping: the seq is taken before the reply), and come first in the
    trace, or the replayed read would run before the write and differ.
    """
    held = _hold_after_first_reply(monkeypatch)
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock]))
    session.start()
    trace = str(tmp_path / "order.jsonl")
    if recording:
        session.recorder = TraceRecorder.start(session.engine, trace)
    try:
        with NBDClient.connect_unix(sock) as first, NBDClient.connect_unix(sock) as second:
            first.write(0, b"w" * 4096)
            assert second.read(0, 4096) == b"w" * 4096
        seen = [(r.op, r.conn, r.seq) for r in session.engine.telemetry.recent() if r.op in ("WRITE", "READ")]
    finally:
        session.stop()
    assert held, "the write's reply was never sent"
    assert min(seen, key=lambda x: x[2])[:2] == ("WRITE", 1)
    if recording:
        records = [r for r in open_trace(trace) if r.cmd in (c.CMD_WRITE, c.CMD_READ)]
        assert [(r.op, r.conn) for r in records] == [("WRITE", 1), ("READ", 2)]
        assert replay(trace, "ram", speed=None).ok


def test_a_recorded_read_has_the_hash_of_the_data_its_client_got(tmp_path: Path, monkeypatch) -> None:
    """A read's data is a view of the RAM disk: a write sent after the read's reply must not
    change what the trace says the read returned."""
    held = _hold_after_first_reply(monkeypatch)
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock]))
    session.start()
    trace = str(tmp_path / "hash.jsonl")
    try:
        with NBDClient.connect_unix(sock) as first, NBDClient.connect_unix(sock) as second:
            second.write(0, b"a" * 4096)
            session.recorder = TraceRecorder.start(session.engine, trace)
            got = first.read(0, 4096)  # its thread is held after the reply: the write below runs
            second.write(0, b"b" * 4096)
    finally:
        session.stop()
    assert held and got == b"a" * 4096
    (read,) = [r for r in open_trace(trace) if r.op == "READ"]
    assert read.hash == data_hash(b"a" * 4096)


def test_a_recording_begun_mid_run_says_why_its_reads_differ(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock]))
    session.start()
    trace = str(tmp_path / "late.jsonl")
    try:
        with NBDClient.connect_unix(sock) as nbd:
            nbd.write(0, b"before" * 512)  # not in the trace: recording starts after it
            session.recorder = TraceRecorder.start(session.engine, trace)
            assert nbd.read(0, 3072) == b"before" * 512
            nbd.write(8192, b"during" * 512)
            assert nbd.read(8192, 3072) == b"during" * 512
    finally:
        session.stop()
    summary = replay(trace, "ram", speed=None)
    assert (summary.reads_compared, summary.divergences, summary.first_seq) == (2, 1, 2)
    assert summary.first.offset == 0
    assert any("recording began after 1 earlier request;" in line for line in summary.lines())
    # From the start, a divergence has other causes: no such note.
    trace2 = str(tmp_path / "whole.jsonl")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock], record=trace2))
    session.start()
    try:
        with NBDClient.connect_unix(sock) as nbd:
            nbd.write(0, b"x" * 512)
            nbd.read(0, 512)
    finally:
        session.stop()
    broken = tmp_path / "broken.py"
    broken.write_text(
        "class Disk:\n"
        "    def __init__(self, size):\n        self.size = size\n"
        "    def read(self, offset, length):\n        return bytes(length)\n"
        "    def write(self, offset, data):\n        pass\n"
    )
    summary = replay(trace2, f"plugin:{broken}", speed=None)
    assert summary.first_seq == 1 and summary.divergences == 1
    assert not any("recording began" in line for line in summary.lines())


def test_an_interrupted_replay_still_says_how_far_it_got(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    trace = str(tmp_path / "slow.jsonl")
    session = Session(open_backend("ram", size=1 << 20), ServeOptions(unix=[sock], record=trace))
    session.start()
    try:
        with NBDClient.connect_unix(sock) as nbd:
            for _ in range(160):  # 8 s at --speed 1: it starts (imports and all, on a busy machine too) before the end
                nbd.write(0, b"s" * 512)
                time.sleep(0.05)
    finally:
        session.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "buselab", "replay", trace, "--speed", "1", "--headless"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupt it once it is replaying (a fixed sleep raced its start on a loaded CI machine).
    first = proc.stderr.readline()
    assert first.startswith("buselab: replaying"), first
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, first + err
    assert "stopped before the end of the trace" in out
    assert "recorded over 0.00 s" not in out and "recorded over" in out
    assert all(line.startswith("replay: ") for line in err.splitlines()), err  # progress, no traceback
