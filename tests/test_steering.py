"""Steering a live engine: pause/step, breakpoints, live filters, live backend switches, power cut.

Most tests run a Session in-process with buselab's own NBD client on a Unix
socket (fast, exact); the root test mounts ext4 through nbdfuse + losetup and
switches the backend under the mounted file system.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import require_root, require_tool

from buselab.client import NBDClient, NBDError
from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.steering import SteeringError
from buselab.steering.breakpoints import parse_breakpoint
from buselab.storage.backends.file import FileBackend
from buselab.storage.backends.ram import RamBackend
from buselab.storage.stack import StackError

MiB = 1 << 20


class Lab:
    def __init__(self, tmp_path: Path, size: int = 16 * MiB, filters: list[str] | None = None) -> None:
        self.sock = str(tmp_path / "nbd.sock")
        self.session = Session(RamBackend(size), ServeOptions(unix=[self.sock], filters=filters or []))
        self.session.start()
        self.steering = self.session.steering
        self.clients: list[NBDClient] = []

    def client(self) -> NBDClient:
        client = NBDClient.connect_unix(self.sock)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except OSError:
                pass
        self.session.stop()


@pytest.fixture
def lab(tmp_path):
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        made = Lab(tmp_path, **kwargs)
        labs.append(made)
        return made

    yield make
    for made in labs:
        made.stop()


class Background:
    """Run one blocking client call on a thread; see whether it has finished."""

    def __init__(self, fn) -> None:
        self.result = self.error = None
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.took = 0.0
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except Exception as exc:  # noqa: BLE001
            self.error = exc
        self.took = time.perf_counter() - self.started
        self.done.set()

    def wait(self, timeout: float = 5.0):
        assert self.done.wait(timeout), "the request was not answered"
        return self


# --- pause, step, resume ----------------------------------------------------------------------


def test_pause_holds_step_releases_exactly_the_oldest(lab):
    lab = lab()
    s = lab.steering
    a, b = lab.client(), lab.client()
    a.write(0, b"A" * 4096)
    s.pause()
    first = Background(lambda: a.read(0, 4096))
    s.wait_held(1)
    second = Background(lambda: b.read(0, 4))
    held = s.wait_held(2)
    assert [h.op for h in held] == ["READ", "READ"] and held[0].conn != held[1].conn
    time.sleep(0.05)
    assert not first.done.is_set() and not second.done.is_set()
    stepped = s.step()
    assert stepped.conn == held[0].conn and stepped.still_held == 1
    assert first.wait().result == b"A" * 4096
    time.sleep(0.05)
    assert not second.done.is_set()  # exactly one was released
    assert s.resume().released == 1
    assert second.wait().result == b"AAAA"
    assert not s.paused and not s.engine.gate.paused  # back on the fast path


def test_step_can_fail_or_delay_the_request(lab):
    lab = lab()
    s = lab.steering
    client = lab.client()
    s.pause()
    write = Background(lambda: client.write(0, b"X" * 4096))
    s.wait_held(1)
    assert s.step("fail", errno="ENOSPC").errno == "ENOSPC"
    assert isinstance(write.wait().error, NBDError) and write.error.errno == c.ENOSPC
    read = Background(lambda: client.read(0, 4))
    s.wait_held(1)
    s.step("delay", delay_ms=200)
    assert read.wait().result == bytes(4)  # the failed write never reached the disk
    assert read.took >= 0.2
    s.resume()


def test_step_refuses_what_makes_no_sense(lab):
    s = lab().steering
    with pytest.raises(SteeringError, match="not paused"):
        s.step()
    s.pause()
    with pytest.raises(SteeringError, match="nothing is held"):
        s.step()
    with pytest.raises(UserError, match="bad errno"):
        s.step("fail", errno="EWHAT")
    with pytest.raises(SteeringError, match="bad delay"):
        s.step("delay", delay_ms=-5)
    with pytest.raises(SteeringError, match="unknown step action"):
        s.step("explode")
    with pytest.raises(SteeringError, match="held after"):
        s.wait_held(1, timeout=0.05)
    s.resume()


# --- breakpoints ---------------------------------------------------------------------------


def test_breakpoint_on_flush_pauses_and_holds_the_flush(lab):
    lab = lab()
    s = lab.steering
    client = lab.client()
    bp = s.add_breakpoint("op=flush")
    client.write(0, b"x" * 512)  # not a flush: runs at once
    flush = Background(client.flush)
    (held,) = s.wait_held(1)
    assert held.op == "FLUSH" and held.breakpoint == bp.id
    assert s.paused and s.last_break.op == "FLUSH"
    reader = lab.client()
    other = Background(lambda: reader.read(0, 512))  # the gate is halted now: held too
    s.wait_held(2)
    s.step()
    flush.wait()
    s.resume()
    assert other.wait().result == b"x" * 512
    assert s.list_breakpoints()[0].hits == 1
    s.set_breakpoint_enabled(bp.id, False)
    client.flush()  # disabled: no pause
    s.remove_breakpoint("all")
    assert not s.engine.gate.paused  # no breakpoints: the fast path is one attribute again


def test_breakpoint_on_the_ext4_superblock_magic(lab):
    lab = lab()
    s = lab.steering
    client = lab.client()
    s.add_breakpoint("ext4-sb")
    block = bytearray(4096)
    client.write(0, bytes(block))  # zeros at the magic's offset: no hit
    client.write(8192, b"\x53\xef" * 2048)  # the pattern, but elsewhere
    block[1080:1082] = b"\x53\xef"
    write = Background(lambda: client.write(0, bytes(block)))
    (held,) = s.wait_held(1)
    assert held.op == "WRITE" and held.offset == 0
    s.resume()
    write.wait()
    assert client.read(1080, 2) == b"\x53\xef"


@pytest.mark.parametrize(
    ("spec", "hit", "miss"),
    [
        ("range=1M-2M", ("read", MiB + 4096), ("read", 0)),
        ("blocks=4-7", ("write", 4 * 4096), ("write", 8 * 4096)),
        ("blocks=0-1,bs=512", ("read", 0), ("read", 512)),
        ("op=write+fua", ("fua", 0), ("write", 0)),
        ("op=trim", ("trim", 0), ("write", 0)),
        ("pattern=text:hello", ("hello", 12345), ("write", 0)),
    ],
)
def test_breakpoint_conditions(lab, spec, hit, miss):
    lab = lab()
    s = lab.steering
    client = lab.client()
    s.add_breakpoint(spec)

    def send(what: str, offset: int):
        if what == "read":
            return lambda: client.read(offset, 4096)
        if what == "trim":
            return lambda: client.trim(offset, 4096)
        payload = b"..hello.." if what == "hello" else b"w" * 4096
        return lambda: client.write(offset, payload, fua=what == "fua")

    send(*miss)()  # answered without a pause
    assert not s.paused
    request = Background(send(*hit))
    s.wait_held(1)
    s.resume()
    request.wait()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("range=0-64M", "past the end"),
        ("op=frobnicate", "unknown op 'frobnicate'"),
        ("at=1080", "give pattern= too"),
        ("pattern=zz", "bad pattern"),
        ("pattern=53ef,at=16M", "past the end"),
        ("", "empty breakpoint"),
        ("colour=red", "do not know 'colour'"),
    ],
)
def test_bad_breakpoints_are_refused_in_one_line(spec, words):
    with pytest.raises(UserError) as info:
        parse_breakpoint(spec, 16 * MiB)
    assert words in str(info.value) and "\n" not in str(info.value)


# --- filters, live -------------------------------------------------------------------------


def test_filters_added_toggled_and_removed_live(lab):
    lab = lab(filters=["delay:read=1ms"])
    s = lab.steering
    client = lab.client()
    client.write(0, b"data")
    err = s.add_filter("error:op=read,errno=EIO")
    with pytest.raises(NBDError) as info:
        client.read(0, 4)
    assert info.value.errno == c.EIO
    s.toggle_filter(err.id)
    assert client.read(0, 4) == b"data"
    s.set_filter_enabled("error", True)
    with pytest.raises(NBDError):
        client.read(0, 4)
    s.remove_filter(err.id)
    assert client.read(0, 4) == b"data"
    assert [f.spec for f in s.list_filters()] == ["delay:read=1ms"]
    with pytest.raises(StackError, match="no filter 'nope'"):
        s.remove_filter("nope")
    with pytest.raises(Exception, match="unknown filter"):
        s.add_filter("nope:x=1")


def test_powercut_loses_exactly_the_writes_after_the_last_flush(lab):
    lab = lab(filters=["cache"])
    s = lab.steering
    client = lab.client()
    rng = random.Random(5)
    before = {i: rng.randbytes(4096) for i in range(0, 64, 3)}
    after = {i: rng.randbytes(4096) for i in range(1, 64, 3)}
    for i, data in before.items():
        client.write(i * 4096, data)
    client.flush()
    for i, data in after.items():
        client.write(i * 4096, data)
    client.write(0, b"overwritten after the flush")
    assert client.read(0, 5) == b"overw"
    assert s.powercut().lost_bytes == (len(after) + 1) * 4096
    s.poweron()  # a power cut is a crash: nothing is served until the power is back
    for i, data in before.items():
        assert client.read(i * 4096, 4096) == data
    for i in after:
        assert client.read(i * 4096, 4096) == bytes(4096)
    lab2_cache_free = s.remove_filter("cache")
    assert lab2_cache_free.name == "cache"
    with pytest.raises(SteeringError, match="no cache filter"):
        s.powercut()


def test_removing_the_cache_writes_it_back(lab):
    lab = lab(filters=["cache"])
    s = lab.steering
    client = lab.client()
    client.write(4096, b"unflushed")
    s.remove_filter("cache")
    assert bytes(s.base.read(4096, 9)) == b"unflushed"


# --- switching backends live ---------------------------------------------------------------------


def test_switch_ram_to_file_keeps_every_byte_under_load(lab, tmp_path):
    lab = lab(size=32 * MiB)
    s = lab.steering
    client = lab.client()
    rng = random.Random(1)
    model = bytearray(32 * MiB)
    for _ in range(200):
        offset = rng.randrange(0, 32 * MiB - 65536) // 512 * 512
        data = rng.randbytes(rng.choice([512, 4096, 65536]))
        client.write(offset, data)
        model[offset : offset + len(data)] = data
    writer = lab.client()
    stop = threading.Event()
    written: list[tuple[int, bytes]] = []

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            data = bytes([i % 250 + 1]) * 4096
            writer.write((i % 512) * 4096, data)
            written.append(((i % 512) * 4096, data))
            i += 1

    thread = threading.Thread(target=keep_writing)
    thread.start()
    time.sleep(0.05)
    target = tmp_path / "disk.img"
    result = s.switch_backend("file", str(target))
    time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert isinstance(s.base, FileBackend) and result.copied_bytes > 0
    for offset, data in written:
        model[offset : offset + len(data)] = data
    got = b"".join(client.read(pos, MiB) for pos in range(0, 32 * MiB, MiB))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest()
    lab.session.engine.backend.flush()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(model).hexdigest()
    assert any("switched backend" in message for _, message in lab.session.engine.telemetry.events)


def test_switch_refusals_change_nothing(lab, tmp_path):
    lab = lab(size=8 * MiB)
    s = lab.steering
    client = lab.client()
    client.write(0, b"precious")
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    for call, words in [
        (lambda: s.switch_backend("tape"), "unknown backend 'tape'"),
        (lambda: s.switch_backend("ram", size="1M"), "smaller than the disk"),
        (lambda: s.switch_backend("file", str(small)), "smaller than the disk"),
        (lambda: s.switch_backend("null"), "null keeps no data"),
        (lambda: s.switch_backend("file"), "needs a PATH"),
        (lambda: s.switch_backend("plugin", str(tmp_path / "none.py")), "does not exist"),
        (lambda: s.cow_commit(), "not cow"),
    ]:
        with pytest.raises(Exception) as info:
            call()
        assert words in str(info.value), str(info.value)
    assert small.stat().st_size == MiB
    assert client.read(0, 8) == b"precious"
    assert isinstance(s.base, RamBackend)


def test_cow_over_the_current_backend_discard_and_commit(lab):
    lab = lab(size=8 * MiB)
    s = lab.steering
    client = lab.client()
    client.write(0, b"original")
    s.switch_backend("cow")
    client.write(0, b"changed!")
    assert client.read(0, 8) == b"changed!"
    assert s.cow_discard().discarded_bytes == 4096
    assert client.read(0, 8) == b"original"
    client.write(0, b"kept it!")
    s.cow_commit()
    s.switch_backend("ram")  # leave cow: the copy carries the committed data
    assert client.read(0, 8) == b"kept it!"
    with pytest.raises(SteeringError, match="not cow"):
        s.cow_discard()


def test_switch_while_paused_keeps_held_requests_held(lab, tmp_path):
    lab = lab(size=4 * MiB)
    s = lab.steering
    client = lab.client()
    client.write(0, b"abcd")
    s.pause()
    read = Background(lambda: client.read(0, 4))
    s.wait_held(1)
    s.switch_backend("file", str(tmp_path / "x.img"))
    assert s.paused and len(s.held()) == 1
    s.step()
    assert read.wait().result == b"abcd"
    s.resume()


# --- a mounted ext4 survives a live switch (root) ---------------------------------------------------


def _sh(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout} {proc.stderr}")
    return proc.stdout


@pytest.mark.root
def test_live_switch_under_a_mounted_ext4(buselab_server, tmp_path):
    require_root()
    require_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3")
    from buselab.control.client import ControlClient

    ctl_path = str(tmp_path / "ctl.sock")
    served = buselab_server(["ram", "--size", "64M", "--control", ctl_path])
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(fuse_dir / "nbd"), "--unix", served.socket])
    loop = None
    mounted = False
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        loop = _sh("losetup", "-f", "--show", str(fuse_dir / "nbd")).strip()
        _sh("mkfs.ext4", "-q", "-F", loop)
        _sh("mount", loop, str(mnt))
        mounted = True
        rng = random.Random(3)
        sums = {}
        for i in range(20):
            data = rng.randbytes(rng.randrange(1000, 400_000))
            (mnt / f"f{i}").write_bytes(data)
            sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
        os.sync()
        with ControlClient(ctl_path) as ctl:
            result = ctl.call("switch", kind="file", path=str(tmp_path / "disk.img"))
            assert result["copied_bytes"] > 0
            for i in range(20, 30):  # keep writing after the switch
                data = rng.randbytes(50_000)
                (mnt / f"f{i}").write_bytes(data)
                sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
            _sh("umount", str(mnt))
            mounted = False
            _sh("mount", loop, str(mnt))  # re-read from the new backend, not the page cache
            mounted = True
            for name, digest in sums.items():
                assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
            _sh("umount", str(mnt))
            mounted = False
            _sh("e2fsck", "-fn", loop)  # exits non-zero on any problem
            assert "file" in ctl.call("status")["backend"]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
