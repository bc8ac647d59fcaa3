"""A power cut is a crash: the cache's unflushed writes are lost and the disk goes dark.

After `powercut` every request fails with EIO (reads, writes, flushes, trims) until
`poweron`, as a crashed disk's would, so a client cannot build on data that is gone
and what it finds after power on (an fsck) is what a real crash leaves: the writes
before the last FLUSH, nothing after. The writes thrown away are named: by request
number in the reply, "lost" in the lab's stream and inspector, a lost cell on the
heatmap. Real clients: buselab's own, qemu-io, and a mounted ext4 (root).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import aio, require_root, require_tool, socket_path

from buselab.client import NBDClient, NBDError
from buselab.control.client import ControlClient, ControlError
from buselab.control.protocol import ControlTarget, handle_line
from buselab.engine.telemetry import RequestRecord
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.steering import SteeringError
from buselab.storage.backends.ram import RamBackend
from buselab.ui.heatmap import LOST
from buselab.ui.lab import LabApp
from buselab.ui.screens.filters import FiltersScreen
from buselab.ui.screens.panel import ConfirmScreen

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def session(tmp_path: Path):
    sock = str(tmp_path / "nbd.sock")
    s = Session(RamBackend(16 * MiB), ServeOptions(unix=[sock], control=str(tmp_path / "ctl.sock"), filters=["cache"]))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(session):
    nbd = NBDClient.connect_unix(socket_path(session))
    yield nbd
    nbd.close()


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(NBDError) as failed:
        fn(*args, **kwargs)
    return failed.value.errno


def write_story(client: NBDClient) -> None:
    """64 KiB of A (flushed), then 64 KiB of B and 4 KiB of C over the A (not flushed)."""
    client.write(0, b"A" * 65536)
    client.flush()
    client.write(65536, b"B" * 65536)
    client.write(0, b"C" * 4096)
    assert client.read(0, 4) == b"CCCC"  # the cache answers with what the client wrote


def seqs_of(session: Session, op: str, offset: int) -> list[int]:
    return [r.seq for r in session.engine.telemetry.recent() if r.op == op and r.offset == offset and not r.error]


def test_after_a_powercut_every_request_fails_with_eio_until_poweron(session, client):
    steering = session.steering
    write_story(client)
    cut = steering.powercut()
    assert cut.lost_bytes == 68 * KiB
    assert cut.lost_writes == 2
    assert cut.lost_requests == seqs_of(session, "WRITE", 65536) + seqs_of(session, "WRITE", 0)[1:]
    # The disk is dark: nothing gets through, whatever the op.
    assert errno_of(client.read, 0, 4096) == c.EIO
    assert errno_of(client.write, 0, b"x" * 512) == c.EIO
    assert errno_of(client.flush) == c.EIO
    assert errno_of(client.trim, 0, 4096) == c.EIO
    assert errno_of(client.write_zeroes, 0, 4096) == c.EIO
    # A new connection fares no better.
    with NBDClient.connect_unix(socket_path(session)) as late:
        assert errno_of(late.read, 1 * MiB, 512) == c.EIO
    reasons = [session.engine.telemetry.reason(r.seq) for r in session.engine.telemetry.recent() if r.error]
    assert len(reasons) == 6 and all(reason and "power is off" in reason for reason in reasons), reasons
    with pytest.raises(SteeringError, match="the power is off already"):
        steering.powercut()
    on = steering.poweron()
    assert on.refused == 6 and on.off_seconds >= 0
    # What a crash leaves: the flushed A, and nothing written after the FLUSH.
    assert client.read(0, 65536) == b"A" * 65536
    assert client.read(65536, 65536) == bytes(65536)
    client.write(4096, b"D" * 4096)  # and it serves again, writes included
    assert client.read(4096, 4) == b"DDDD"
    with pytest.raises(SteeringError, match="the power is on"):
        steering.poweron()
    events = [message for _, message in session.engine.telemetry.events]
    assert any(m.startswith("POWER CUT: 68.0 KiB") and "(2 writes)" in m and "until poweron" in m for m in events)
    assert any(m.startswith("POWER ON after") and "6 requests failed" in m for m in events)


def test_stopping_with_the_power_off_is_not_a_failed_flush(tmp_path, caplog):
    """The cut lost what was not flushed: a stop then has nothing to flush and must not warn that it failed."""
    sock = str(tmp_path / "nbd.sock")
    s = Session(RamBackend(4 * MiB), ServeOptions(unix=[sock], filters=["cache"]))
    s.start()
    with NBDClient.connect_unix(sock) as nbd:
        nbd.write(0, b"x" * 4096)
    s.steering.powercut()
    with caplog.at_level("INFO", logger="buselab"):
        s.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "failed" in m], messages
    assert any("stopped with the power off" in m for m in messages), messages


def test_qemu_io_gets_eio_after_the_cut_and_the_flushed_data_after_poweron(session, client):
    require_tool("qemu-io")
    uri = f"nbd+unix:///?socket={socket_path(session)}"
    write_story(client)
    session.steering.powercut()
    for command in ("read 0 4k", "write -P 0x45 0 4k", "flush"):
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0, (command, out.stdout, out.stderr)  # qemu-io says nothing on a failed flush
        assert command == "flush" or "Input/output error" in out.stdout + out.stderr, (command, out.stdout)
    session.steering.poweron()
    read = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x41 0 64k", "-c", "read -P 0 64k 64k", uri],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout + read.stderr
    assert "Input/output error" not in read.stdout + read.stderr


def test_a_cache_added_while_the_power_is_off_is_off_too_and_removing_the_cut_cache_powers_on(session, client):
    steering = session.steering
    client.write(0, b"E" * 4096)
    steering.powercut()
    steering.add_filter("cache")
    assert errno_of(client.write, 0, b"x" * 4096) == c.EIO  # the new top cache is dark as well
    assert steering.restacker.powered_off
    steering.remove_filter(2)
    steering.remove_filter(1)  # out of the stack, the cut cache is simply gone: the disk serves
    assert not steering.restacker.powered_off
    assert client.read(0, 4096) == bytes(4096)


def test_ctl_powercut_and_poweron(session, client, tmp_path):
    write_story(client)
    with ControlClient(str(tmp_path / "ctl.sock"), timeout=30) as control:
        cut = control.call("powercut")
        assert cut == {
            "lost_bytes": 68 * KiB,
            "lost_writes": 2,
            "lost_requests": seqs_of(session, "WRITE", 65536) + seqs_of(session, "WRITE", 0)[1:],
        }
        filters = control.call("filter.list")
        assert filters[0]["stats"]["power"] == "off"
        assert errno_of(client.read, 0, 512) == c.EIO
        with pytest.raises(ControlError, match="the power is off already"):
            control.call("powercut")
        on = control.call("poweron")
        assert set(on) == {"off_seconds", "refused"} and on["refused"] == 1
        assert "power" not in control.call("filter.list")[0]["stats"]
        with pytest.raises(ControlError, match="the power is on"):
            control.call("poweron")
    assert client.read(0, 4) == b"AAAA"
    # The words form too, for socat users.
    target = ControlTarget(session.steering, session.status)
    assert handle_line(target, "power cut")["ok"] is True
    assert handle_line(target, "power on")["ok"] is True


def test_buselab_ctl_says_what_was_lost(session, client, tmp_path):
    write_story(client)
    ctl = [sys.executable, "-m", "buselab", "ctl", str(tmp_path / "ctl.sock")]
    cut = subprocess.run([*ctl, "powercut"], capture_output=True, text=True, timeout=30, check=True).stdout
    lost = seqs_of(session, "WRITE", 65536) + seqs_of(session, "WRITE", 0)[1:]
    assert cut.startswith("power cut: 68.0 KiB of writes since the last FLUSH lost (2 writes: requests ")
    assert f"requests {lost[0]}, {lost[1]})" in cut and "until `buselab ctl poweron`" in cut, cut
    on = subprocess.run([*ctl, "poweron"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert on.startswith("power on after ") and "(0 requests failed meanwhile)" in on, on


# --- the lab ---------------------------------------------------------------------------------


async def settle(app: LabApp, pilot) -> None:
    app.poll()
    await pilot.pause()


async def finish_workers(app: LabApp, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    await settle(app, pilot)


def result_of(app: LabApp, record: RequestRecord) -> str:
    """The result column of `record`'s row in the stream, as drawn."""
    stream = app.stream
    for y in range(1, stream.size.height - 1):
        index = stream.top + y - 2
        if 0 <= index < len(stream.rows) and stream.rows[index] is record:
            return stream.render_line(y).text.strip("│▐ ").split()[-1]
    raise AssertionError(f"request {record.seq} is not on screen")


@aio(timeout=30)
async def test_the_lab_cuts_the_power_marks_the_lost_writes_and_powers_on(session, client):
    client.write(1 * MiB, b"A" * 65536)
    client.flush()
    client.write(5 * MiB, b"B" * 65536)
    client.write(9 * MiB, b"C" * 4096)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        await pilot.press("f")
        screen = app.screen
        assert isinstance(screen, FiltersScreen)
        screen.query_one("#list").focus()
        await pilot.press("exclamation_mark")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await finish_workers(app, pilot)
        assert "POWER CUT: 68.0 KiB of writes since the last FLUSH lost (2 writes" in screen.status_text
        assert errno_of(client.read, 1 * MiB, 4096) == c.EIO
        await pilot.pause(0.6)  # the panel's list refreshes twice a second
        assert "POWER OFF" in str(screen.query_one("#actions").render())
        await pilot.press("escape")
        await settle(app, pilot)
        assert "POWER OFF" in app.header_widget.plain and "SERVING" not in app.header_widget.plain
        records = {(r.op, r.offset): r for r in app.stream.rows if isinstance(r, RequestRecord)}
        kept, lost_b, lost_c = records["WRITE", 1 * MiB], records["WRITE", 5 * MiB], records["WRITE", 9 * MiB]
        assert app.model.lost_requests == {lost_b.seq, lost_c.seq}
        assert [result_of(app, r) for r in (kept, lost_b, lost_c)] == ["ok", "lost", "lost"]
        assert result_of(app, records["READ", 1 * MiB]) == "EIO"
        # The inspector says so, and the heatmap marks the cells whose data is gone.
        app.inspector.show(lost_b)
        first = app.inspector.text.splitlines()[0]
        assert " lost " in first and "answered ok, then a power cut threw it away" in first, first
        app.inspector.show(kept)
        assert app.inspector.text.splitlines()[0].endswith(" ok")
        assert app.heatmap.colour_at(5 * MiB) == LOST and app.heatmap.colour_at(9 * MiB) == LOST
        assert app.heatmap.colour_at(1 * MiB) != LOST
        assert "lost" in app.heatmap.render_line(app.heatmap.size.height - 2).text
        # o in the filters panel brings the power back.
        await pilot.press("f")
        screen = app.screen
        screen.query_one("#list").focus()
        await pilot.press("o")
        await finish_workers(app, pilot)
        assert "POWER ON after" in screen.status_text and "(1 request failed meanwhile)" in screen.status_text
        assert client.read(1 * MiB, 4) == b"AAAA" and client.read(5 * MiB, 4) == bytes(4)
        # Written again, a lost cell is no longer lost; the rows stay marked.
        client.write(5 * MiB, b"b" * 65536)
        await pilot.press("escape")
        await settle(app, pilot)
        assert "POWER OFF" not in app.header_widget.plain and "SERVING" in app.header_widget.plain
        assert app.heatmap.colour_at(5 * MiB) != LOST and app.heatmap.colour_at(9 * MiB) == LOST
        assert result_of(app, lost_b) == "lost"
        assert any(row.message.startswith("POWER ON") for row in app.stream.events)


# --- a mounted ext4: the crash an fsck expects (root) ---------------------------------------------


def _sh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def test_a_mounted_ext4_crashes_and_fsck_after_poweron_finds_what_a_crash_leaves(tmp_path):
    """ext4 over nbdfuse + loop over a cache: after the cut the file system gets EIO (it
    cannot go on over data that is gone); after power on, e2fsck replays the journal and
    finds what a crash leaves: what `sync` made durable, nothing of what came after."""
    require_root()
    require_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3")
    sock = str(tmp_path / "nbd.sock")
    session = Session(RamBackend(64 * MiB), ServeOptions(unix=[sock], filters=["cache"]))
    session.start()
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", "-P", str(tmp_path / "pid"), str(fuse_dir / "nbd"), "--unix", sock])
    loop = None
    mounted = False
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "pid").exists():
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        loop = _sh("losetup", "-f", "--show", str(fuse_dir / "nbd")).stdout.strip()
        _sh("mkfs.ext4", "-q", "-F", loop)
        # commit=300: nothing is committed to the journal unless `sync` asks.
        _sh("mount", "-o", "commit=300", loop, str(mnt))
        mounted = True
        (mnt / "d").mkdir()
        for i in range(20):
            (mnt / "d" / f"synced{i}").write_bytes(b"S" * 5000)
        _sh("sync", "-f", str(mnt))
        for i in range(20):
            (mnt / "d" / f"unsynced{i}").write_bytes(b"U" * 5000)
        _sh("dd", "if=/dev/urandom", f"of={mnt / 'direct'}", "bs=64k", "count=4", "oflag=direct", "status=none")
        cut = session.steering.powercut()
        assert cut.lost_writes >= 4 and cut.lost_bytes >= 256 * KiB  # the direct writes at least
        # A crashed disk answers nothing: the file system sees I/O errors, not a disk that forgot.
        synced = _sh("sync", "-f", str(mnt), check=False)
        assert synced.returncode != 0 and "Input/output error" in synced.stderr, synced.stderr
        dd = _sh("dd", "if=/dev/zero", f"of={mnt / 'after'}", "bs=4k", "count=1", "oflag=direct", check=False)
        # ... and then (errors=remount-ro) it stops writing.
        assert dd.returncode != 0 and ("Input/output error" in dd.stderr or "Read-only" in dd.stderr), dd.stderr
        _sh("umount", str(mnt), check=False)
        mounted = False
        session.steering.poweron()
        fsck = _sh("e2fsck", "-fy", loop, check=False)
        # 0: clean; 1: fixed what a crash leaves (a journal replayed, free counts). More is damage.
        assert fsck.returncode in (0, 1) and "recovering journal" in fsck.stdout, fsck.stdout + fsck.stderr
        assert _sh("e2fsck", "-fn", loop, check=False).returncode == 0
        _sh("mount", loop, str(mnt))
        mounted = True
        names = sorted(path.name for path in (mnt / "d").iterdir())
        assert names == sorted(f"synced{i}" for i in range(20)), names
        assert all((mnt / "d" / f"synced{i}").read_bytes() == b"S" * 5000 for i in range(20))
        assert not (mnt / "direct").exists() and not (mnt / "after").exists()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        fuse.wait(15)
        session.stop()


def test_the_labeller_does_not_read_a_dark_disk(session, client):
    """Its reads are not a client's: power on must not count them as requests the cut refused."""
    write_story(client)
    session.steering.powercut()
    builds = session.labeller.builds
    session.labeller.rebuild()
    assert session.labeller.builds == builds  # it waits for power on
    assert session.steering.poweron().refused == 0
    session.labeller.rebuild()
    assert session.labeller.builds == builds + 1
