"""`buselab attach`: the lab as a viewer of a running, headless buselab.

The whole story with real parts: `buselab ram --headless --control PATH` in a
subprocess, nbdsh (libnbd) as the client, one viewer in this process (Textual's
run_test) and one `buselab attach` in a real terminal (tmux). Both show the same
requests; a request held by a pause from one viewer is stepped from the other;
both quit; the client is still served and the server still runs. Then: a
viewer whose server goes says so in one line; a viewer that does not read
costs the server one frame, not memory; `stop` over the socket stops it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    nbdsh,
    require_tool,
    socket_path,
    start_buselab,
    tmux,
    tmux_capture,
    tmux_seqs,
    tmux_wait_for,
    wait_for_socket,
)

from buselab.control.client import ControlClient
from buselab.control.protocol import ControlTarget
from buselab.control.watch import SEND_BUFFER, Watch
from buselab.storage.filters.cache import CacheFilter
from buselab.ui.attached import AttachedLabApp, run_attached
from buselab.ui.model import LabModel
from buselab.ui.remote import RemoteSession

OFFSET = 40 * 4096  # the held write's offset: nothing else writes there


def io(uri: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([*nbdsh(), "-u", uri, "-c", script], capture_output=True, text=True, timeout=60)


def some_io(uri: str, n: int = 12) -> None:
    done = io(uri, f"for i in range({n}):\n    h.pwrite(b'a' * 4096, i * 4096)\n    h.pread(4096, i * 4096)")
    assert done.returncode == 0, done.stderr


def record_seqs(app: AttachedLabApp) -> set[int]:
    return {row.seq for row in app.stream.rows if hasattr(row, "seq") and hasattr(row, "cmd")}


async def until(predicate, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.fixture
def served(tmp_path: Path):
    ctl = tmp_path / "ctl.sock"
    server = start_buselab(["ram", "--size", "64M", "--control", str(ctl)], tmp_path)
    server.control = str(ctl)  # type: ignore[attr-defined]
    wait_for_socket(str(ctl), server.proc, server.log)  # made after the NBD socket start_buselab waits for
    try:
        yield server
    finally:
        server.stop()


def test_two_viewers_see_the_same_requests_and_steer_each_other(served, tmp_path: Path):
    require_tool("tmux")
    nbdsh()
    ctl = served.control
    some_io(served.uri)
    name = f"buselab-attach-{os.getpid()}"
    done = tmp_path / "viewer-exit"
    command = f"{shlex.quote(sys.executable)} -m buselab attach {shlex.quote(ctl)}"
    # (Textual draws on stderr: the viewer's last line is read back from the pane.)
    shell = f"unset COLUMNS LINES; {command}; echo $? > {shlex.quote(str(done))}; sleep 30"
    tmux(name, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", "sleep 600", check=True)
    held_writer = None
    try:
        tmux(name, "set-option", "-t", name, "window-size", "manual", check=True)
        tmux(name, "resize-window", "-t", name, "-x", "160", "-y", "50", check=True)
        tmux(name, "respawn-pane", "-k", "-t", name, shell, check=True)
        tmux_wait_for(name, lambda s: "viewer:" in s and "q Detach" in s and len(tmux_seqs(s)) >= 5)

        async def in_process_viewer() -> None:
            nonlocal held_writer
            remote = RemoteSession(ctl)
            app = AttachedLabApp(remote)
            try:
                async with app.run_test(size=(160, 50)) as pilot:
                    # More requests once both watch: both must show every one of them.
                    await asyncio.to_thread(some_io, served.uri, 6)
                    await until(lambda: len(record_seqs(app)) >= 36, what="the in-process viewer shows 36 requests")
                    mine = record_seqs(app)
                    newest = max(mine)
                    screen = await asyncio.to_thread(
                        tmux_wait_for, name, lambda s: tmux_seqs(s) and max(tmux_seqs(s)) == newest
                    )
                    theirs = set(tmux_seqs(screen))
                    assert len(theirs) >= 10 and theirs <= mine, (sorted(theirs), sorted(mine))
                    # Pause here; a write arrives and is held; both viewers say so.
                    await pilot.press("p")
                    await until(lambda: remote.engine.gate.paused, what="the pause reached the server")
                    held_writer = subprocess.Popen(
                        [*nbdsh(), "-u", served.uri, "-c", f"h.pwrite(b'H' * 4096, {OFFSET})"],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                    await until(lambda: "1 held" in app.header_widget.plain, what="1 held in the in-process viewer")
                    await asyncio.to_thread(tmux_wait_for, name, lambda s: "1 held, oldest" in s)
                    assert held_writer.poll() is None, "the held write was answered"
                    # Step it from the other viewer (the terminal): this one sees it answered.
                    tmux(name, "send-keys", "-t", name, "n", check=True)

                    def stepped_here() -> bool:
                        return any(getattr(r, "offset", None) == OFFSET and r.cmd == 1 for r in app.stream.rows)

                    await until(stepped_here, what="the write stepped in tmux shows in this viewer's stream")
                    await asyncio.to_thread(tmux_wait_for, name, lambda s: "stepped: release" in s)
                    assert held_writer.wait(15) == 0
                    await until(lambda: "nothing held yet" in app.header_widget.plain, what="nothing held here")
                    await pilot.press("p")
                    await until(lambda: not remote.engine.gate.paused, what="resumed")
                    await pilot.press("q")
                assert app.return_code == 0
            finally:
                remote.close()

        asyncio.run(in_process_viewer())
        # The terminal's viewer saw the resume from this one, and quits on q.
        tmux_wait_for(name, lambda s: "SERVING" in s)
        tmux(name, "send-keys", "-t", name, "q", check=True)
        deadline = time.monotonic() + 20
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.exists(), f"q did not close the viewer:\n{tmux_capture(name)}"
        assert done.read_text().strip() == "0"
        assert "keeps serving" in tmux_capture(name)
        # Both viewers gone: the server still runs and its client is still served.
        assert served.proc.poll() is None, served.output()
        again = io(served.uri, f"assert h.pread(4096, {OFFSET}) == b'H' * 4096; h.pwrite(b'z' * 512, 0)")
        assert again.returncode == 0, again.stderr
    finally:
        if held_writer is not None and held_writer.poll() is None:
            held_writer.kill()
        tmux(name, "kill-server", capture_output=True)


def test_a_viewer_whose_server_goes_says_so_in_one_line(served, capsys):
    outcome: dict[str, int] = {}
    viewer = threading.Thread(target=lambda: outcome.update(rc=run_attached(served.control, headless=True)))
    viewer.start()
    time.sleep(1.5)  # attached and ticking
    assert served.stop(signal.SIGTERM) == 0
    viewer.join(15)
    assert not viewer.is_alive(), "the viewer did not end when its server went"
    assert outcome["rc"] == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "went away" in err[0] and served.control in err[0], err


def fio_load(uri: str, seconds: float) -> list[str]:
    return [
        "fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--size=8M",
        "--offset=4M",  # not where a partition table or superblock would be: no rebuilds of the disk's map
        "--numjobs=2", "--iodepth=8", "--time_based", f"--runtime={seconds}", "--output-format=json",
    ]  # fmt: skip


def write_iops(output: str) -> float:
    """fio's JSON (the nbd engine prints 'fio: connected to NBD server' lines before it)."""
    return json.loads(output[output.index("{") :])["jobs"][0]["write"]["iops"]


def test_a_viewer_that_does_not_read_costs_the_server_one_frame(session):
    """A watcher that never reads (as a viewer stopped with SIGSTOP), while fio pours requests
    in: the server holds at most one frame for it plus the kernel's send buffer (whatever the
    duration: nothing queues), skips the ticks it cannot send, and tells it so once it reads."""
    require_tool("fio")
    server_end, viewer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    viewer_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    watch = Watch(server_end, ControlTarget(session.steering, session.status), hz=30)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    largest = 0
    load = subprocess.Popen(fio_load(f"nbd+unix:///?socket={socket_path(session)}", 5), stdout=subprocess.PIPE)
    while load.poll() is None:
        largest = max(largest, len(watch.pending))
        queued = fcntl.ioctl(server_end, termios.TIOCOUTQ, b"\0" * 4)
        assert int.from_bytes(queued, sys.byteorder) <= 2 * SEND_BUFFER + 65536
        time.sleep(0.05)
    assert write_iops(load.stdout.read().decode()) > 0
    frames, dropped = watch.frames, watch.dropped
    # The first frames fill the socket's buffers; from then on every tick is skipped.
    assert dropped > 100, "the ticks that could not be sent were not counted"
    assert frames < 0.25 * (frames + dropped), f"{frames} frames built for a viewer that reads nothing"
    assert 0 < largest < 400_000, f"one frame is at most {largest} bytes"
    # Once it reads again, the next frames carry the count of what it missed.
    viewer_end.settimeout(10)
    reader = viewer_end.makefile("rb")
    seen = 0
    for line in reader:
        seen = json.loads(line).get("dropped", 0)
        if seen:
            break
    assert seen >= dropped
    reader.close()
    viewer_end.close()
    thread.join(5)
    assert not thread.is_alive(), "the watch did not end when its viewer went"


def test_a_stopped_viewer_does_not_grow_or_slow_the_server(tmp_path: Path, monkeypatch):
    """`buselab attach` in a terminal, stopped with SIGSTOP while fio runs: the server's RSS
    stays within a few MB, fio keeps its pace, and the viewer catches up after SIGCONT.

    The server says what it holds for the viewer (`viewers`: one frame at most, plus the
    socket's buffer) and that it builds no frames for it. Its RSS bound is loose on purpose:
    under this load the server's own RSS wanders by 4-17 MB over these seconds with no viewer
    at all (measured; MALLOC_ARENA_MAX=2 and one fio run throughout already take out glibc's
    per-thread arenas and new connections). A server that queued frames for a stopped viewer
    would grow by ~10 MB a second at 30 frames a second.
    """
    require_tool("tmux", "fio")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    ctl = str(tmp_path / "ctl.sock")
    served = start_buselab(["ram", "--size", "64M", "--control", ctl], tmp_path)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    name = f"buselab-attach-stop-{os.getpid()}"
    command = f"{shlex.quote(sys.executable)} -m buselab attach --hz 30 {shlex.quote(ctl)}"
    try:
        wait_for_socket(ctl, served.proc, served.log)
        # The viewer is the shell's child, not the pane's own process: tmux sends SIGCONT to a
        # pane process that stops.
        shell = f"unset COLUMNS LINES; {command}; sleep 30"
        tmux(name, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", shell, check=True)
        tmux_wait_for(name, lambda s: "q Detach" in s)
        pane = tmux(name, "display-message", "-p", "-t", name, "#{pane_pid}", capture_output=True, text=True)
        pane_pid = pane.stdout.strip()
        (viewer,) = map(int, Path(f"/proc/{pane_pid}/task/{pane_pid}/children").read_text().split())
        assert "attach" in Path(f"/proc/{viewer}/cmdline").read_text()
        pid = served.proc.pid
        load = subprocess.Popen(fio_load(served.uri, 8), stdout=subprocess.PIPE, text=True)
        time.sleep(1)  # requests flow to the viewer, the ring fills
        client = ControlClient(ctl)
        os.kill(viewer, signal.SIGSTOP)
        try:
            time.sleep(2)
            before = rss_kib(pid)
            most = before
            (stalled,) = client.call("viewers")
            while load.poll() is None:
                most = max(most, rss_kib(pid))
                (now,) = client.call("viewers")
                # What the server holds for it: one frame, and what the kernel buffers.
                assert now["pending_bytes"] < 1 << 20 and now["queued_bytes"] <= 1 << 20, now
                time.sleep(0.25)
        finally:
            os.kill(viewer, signal.SIGCONT)
        grown = most - before
        assert grown < 16 * 1024, f"the server grew {grown} KiB while its viewer was stopped"
        assert now["frames"] <= stalled["frames"] + 1, "frames were built for a stopped viewer"
        assert now["dropped"] > stalled["dropped"] + 100, (stalled, now)
        assert write_iops(load.stdout.read()) > 0
        total = client.call("status")["requests"]
        client.close()
        # Awake again, it catches up (what it missed is a gap in its stream).
        screen = tmux_wait_for(name, lambda s: bool(tmux_seqs(s)) and max(tmux_seqs(s)) >= total)
        assert served.proc.poll() is None, screen
    finally:
        tmux(name, "kill-server", capture_output=True)
        served.stop()


def test_q_detaches_and_a_confirmed_S_stops_the_server(served):
    async def viewer(keys: str) -> AttachedLabApp:
        remote = RemoteSession(served.control)
        app = AttachedLabApp(remote)
        try:
            async with app.run_test(size=(160, 50)) as pilot:
                await pilot.pause()
                for key in keys:
                    await pilot.press(key)
                    await pilot.pause()
                await until(lambda: not app.is_running, what="the viewer ended")
        finally:
            remote.close()
        return app

    app = asyncio.run(viewer("Snq"))  # S asked, n answered: only q ended the viewer
    assert not app.stopped_server
    time.sleep(0.5)
    assert served.proc.poll() is None, "the server stopped though the viewer only detached"
    app = asyncio.run(viewer("Sy"))
    assert app.stopped_server
    assert served.proc.wait(20) == 0


def test_stop_over_the_control_socket_stops_the_server(served):
    with ControlClient(served.control) as ctl:
        assert ctl.call("status")["kind"] == "ram"
        with pytest.raises(Exception, match="watch starts a stream"):
            ctl.call("watch")  # not as a later line of a command connection
    done = subprocess.run(
        [sys.executable, "-m", "buselab", "ctl", served.control, "stop"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and done.stdout.startswith("stopping"), done
    assert served.proc.wait(20) == 0
    assert re.search(r"stopped cleanly|stopped", served.output()), served.output()


def test_a_viewer_adds_a_cache_and_cuts_the_power(served):
    """The filters panel's questions work in a viewer: it sees the server's cache (and its
    unflushed bytes), cuts the power, and marks the requests the cut lost."""
    nbdsh()
    remote = RemoteSession(served.control)
    try:
        assert remote.steering.add_filter("cache").name == "cache"
        some_io(served.uri, 4)  # writes that no FLUSH sends down

        def caches() -> list:
            return [layer.filter for layer in remote.steering.layers if isinstance(layer.filter, CacheFilter)]

        wait_until(lambda: caches() and caches()[0].dirty_bytes() > 0, "the viewer sees the cache's dirty bytes")
        assert not caches()[0].powered_off
        cut = remote.steering.powercut()
        assert cut.lost_bytes > 0 and cut.lost_requests
        wait_until(lambda: remote.steering.restacker.powered_off, "the power is off in the viewer")
        model = LabModel(remote)  # type: ignore[arg-type]
        wait_until(lambda: (model.poll(), model.lost_requests)[1], "the viewer marks the lost requests")
        assert set(cut.lost_requests) <= model.lost_requests
        wait_until(lambda: caches()[0].powered_off, "the filters panel sees the power off")
        assert remote.steering.poweron().refused >= 0
    finally:
        remote.close()


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_attach_through_a_forwarded_socket(served, tmp_path: Path):
    """What `ssh -L /local.sock:/remote.ctl host` does: another socket whose connections are
    relayed byte for byte to the control socket. The viewer needs nothing else (no peer
    credentials, no file descriptors, not the server's path)."""
    local = str(tmp_path / "local.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(local)
    listener.listen(4)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def relay() -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return
            far = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            far.connect(served.control)
            threading.Thread(target=pump, args=(near, far), daemon=True).start()
            threading.Thread(target=pump, args=(far, near), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    remote = RemoteSession(local)
    try:
        some_io(served.uri, 3)
        model = LabModel(remote)  # type: ignore[arg-type]
        wait_until(lambda: len(model.poll().records) or model.requests >= 6, "requests through the forward")
        other = RemoteSession(local)  # a second viewer through the same forward
        try:
            remote.steering.pause()
            wait_until(lambda: other.engine.gate.paused, "the other viewer's frames say paused")
            remote.steering.resume()
            wait_until(lambda: not other.engine.gate.paused, "... and then serving")
        finally:
            other.close()
        assert "attached to " + local in remote.where
    finally:
        remote.close()
        listener.close()


def test_bad_attach_targets_are_one_line(tmp_path: Path):
    def attach(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "buselab", "attach", *args], capture_output=True, text=True, timeout=30
        )

    for args, words in (
        ([str(tmp_path / "nothing.ctl")], "no control socket at"),
        (["--hz", "0", str(tmp_path / "x.ctl")], "--hz 0: give 0.5 to 30"),
    ):
        done = attach(*args)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_attach_without_a_terminal_says_so(served):
    done = subprocess.run(
        [sys.executable, "-m", "buselab", "attach", served.control],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2 and "needs a terminal" in done.stderr and "Traceback" not in done.stderr, done
    assert served.proc.poll() is None
