"""Steering and traces from the lab's keys, with Pilot over a real Session and a real NBD client.

Each test serves a RAM disk on a Unix socket (and a control socket) in
tmp_path, presses the lab's keys, and checks what the client sees (held,
answered, EIO, the bytes it wrote) and what the lab shows. Requests that the
lab holds are sent from a thread, so the test can watch the client wait.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from helpers import aio, socket_path
from textual.widgets import Input, OptionList, Static

from buselab.client import NBDClient, NBDError
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.backends.file import FileBackend
from buselab.storage.registry import open_backend
from buselab.trace.recorder import TraceRecorder
from buselab.trace.replay import Replayer
from buselab.trace.stats import summarize_trace
from buselab.ui.lab import LabApp, run_lab
from buselab.ui.screens.backend import SwitchBackendScreen
from buselab.ui.screens.breakpoints import BreakpointsScreen
from buselab.ui.screens.filters import FiltersScreen
from buselab.ui.screens.panel import ConfirmScreen
from buselab.ui.screens.step import StepScreen

SIZE = 16 << 20
MiB = 1 << 20


@pytest.fixture
def session(tmp_path: Path):
    sock = str(tmp_path / "nbd.sock")  # helpers.socket_path(session)
    s = Session(open_backend("ram", size=SIZE), ServeOptions(unix=[sock], control=str(tmp_path / "ctl.sock")))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(session):
    nbd = NBDClient.connect_unix(socket_path(session))
    yield nbd
    nbd.close()


class Call:
    """A client call on its own thread: the test can see whether it has returned."""

    def __init__(self, fn, *args) -> None:
        self.result = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = fn(*args)
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 5.0) -> Call:
        assert self.done.wait(timeout), "the client never got its reply"
        return self


def wait_held(session: Session, count: int, timeout: float = 5.0) -> None:
    gate = session.engine.gate
    deadline = time.monotonic() + timeout
    while len(gate.held()) < count:
        assert time.monotonic() < deadline, f"{len(gate.held())} held, not {count}"
        time.sleep(0.005)


async def settle(app: LabApp, pilot) -> None:
    app.poll()
    await pilot.pause()


async def finish_workers(app: LabApp, pilot) -> None:
    """Let the steering's thread workers end, and their results reach the screen."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    await settle(app, pilot)


def stream_text(app: LabApp) -> str:
    return "\n".join(app.stream.render_line(y).text for y in range(app.stream.size.height))


@aio(timeout=30)
async def test_p_holds_a_read_and_n_releases_exactly_one(session, tmp_path):
    first, second = NBDClient.connect_unix(socket_path(session)), NBDClient.connect_unix(socket_path(session))
    first.write(4 * MiB, b"ONE!" * 1024)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        assert f"ctl {tmp_path / 'ctl.sock'}" in app.header_widget.plain
        await pilot.press("p")
        assert session.engine.gate.halted and "PAUSED" in app.header_widget.plain
        one = Call(first.read, 4 * MiB, 4096)
        wait_held(session, 1)
        two = Call(second.read, 8 * MiB, 4096)
        wait_held(session, 2)
        time.sleep(0.2)
        assert not one.done.is_set() and not two.done.is_set(), "a read was answered while paused"
        await settle(app, pilot)
        assert "2 held, oldest" in app.header_widget.plain
        assert stream_text(app).count("waiting") == 2
        await pilot.press("n")
        assert one.wait().result == b"ONE!" * 1024
        time.sleep(0.2)
        assert not two.done.is_set(), "n released more than one request"
        assert len(session.engine.gate.held()) == 1
        assert "stepped: release" in app.inspector.text and "4,194,304" in app.inspector.text
        await settle(app, pilot)
        # The answered read replaces the held one in the inspector, with its data.
        record = app.inspector.record
        assert record is not None and record.seq and record.offset == 4 * MiB
        assert "|ONE!ONE!ONE!ONE!|" in app.inspector.text and "stepped: release" in app.inspector.text
        assert "1 held" in app.header_widget.plain
        await pilot.press("p")  # resume: the other one goes too
        assert two.wait().result == bytes(4096)
        await settle(app, pilot)
        assert "SERVING" in app.header_widget.plain
        events = [row.message for row in app.stream.events]
        assert any(m.startswith("paused") for m in events) and any(m.startswith("stepped READ") for m in events)
        assert any(m.startswith("resumed: released 1") for m in events)
        assert "◆" in stream_text(app)
    first.close()
    second.close()


@aio(timeout=30)
async def test_step_menu_fails_the_request_with_eio(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("N")  # nothing held: refused in one line, no screen
        assert not isinstance(app.screen, StepScreen)
        await pilot.press("p")
        read = Call(client.read, 0, 4096)
        wait_held(session, 1)
        await pilot.press("N")
        assert isinstance(app.screen, StepScreen)
        await pilot.press("e")  # fail with EIO
        await pilot.pause()
        assert not isinstance(app.screen, StepScreen)
        read.wait()
        assert isinstance(read.error, NBDError) and read.error.errno == c.EIO, read.error
        assert "stepped: fail with EIO" in app.inspector.text and "failed: EIO" in app.inspector.text
        # ... and the delay choice, by the list: the request is answered, late.
        write = Call(client.write, 0, b"late" * 1024)
        wait_held(session, 1)
        await pilot.press("N")
        screen = app.screen
        assert isinstance(screen, StepScreen)
        await pilot.press("tab")
        screen.query_one("#delay_ms").value = "300"
        started = time.monotonic()
        await pilot.press("enter")
        write.wait()
        assert write.error is None and time.monotonic() - started >= 0.25
        await pilot.press("p")
    assert client.read(0, 4) == b"late"


@aio(timeout=30)
async def test_a_breakpoint_on_flush_added_in_the_panel_pauses_on_the_flush(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("k")
        screen = app.screen
        assert isinstance(screen, BreakpointsScreen)
        await pilot.press(*"op=bogus", "enter")
        assert "unknown op 'bogus'" in screen.status_text and not len(session.steering.breakpoints)
        screen.query_one("#spec").value = "op=flush"
        await pilot.press("enter")
        assert "breakpoint 1 set: op=flush" in screen.status_text
        await pilot.press("escape")
        await settle(app, pilot)
        assert "1 breakpoint armed" in app.header_widget.plain and "breakpoints 1/1 armed" in app.header_widget.plain
        client.write(0, b"w" * 4096)  # not a flush: answered at once
        flush = Call(client.flush)
        wait_held(session, 1)
        time.sleep(0.1)
        assert not flush.done.is_set(), "the flush was answered through a breakpoint"
        await settle(app, pilot)
        header = app.header_widget.plain
        assert "PAUSED" in header and "1 held" in header and "breakpoint 1 (op=flush)" in header
        assert "break" in stream_text(app)
        assert "caught by breakpoint 1 (op=flush)" in app.inspector.text and "FLUSH" in app.inspector.text
        # The panel shows the hit; space disables the breakpoint.
        await pilot.press("k")
        screen = app.screen
        assert isinstance(screen, BreakpointsScreen)
        label = str(screen.query_one("#list").get_option_at_index(0).prompt)
        assert "op=flush" in label and "1 hit" in label and "fired last" in label
        assert isinstance(screen.focused, Input)  # the panel opens in its spec input
        await pilot.press("tab", "space")
        assert not session.steering.breakpoints.find(1).enabled
        await pilot.press("escape")
        await pilot.press("n")
        flush.wait()
        assert flush.error is None
        await pilot.press("p")  # resume (the breakpoint halted the gate)
        client.flush()  # the disabled breakpoint no longer catches it
        await pilot.press("k", "tab", "x", "escape")
        assert not len(session.steering.breakpoints)


@aio(timeout=30)
async def test_an_error_filter_added_in_the_panel_fails_reads_until_toggled_off(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        client.write(MiB, b"ok" * 2048)
        await pilot.press("f")
        screen = app.screen
        assert isinstance(screen, FiltersScreen)
        await pilot.press(*"error:rate=1,errno=EIO,op=read", "enter")
        await finish_workers(app, pilot)
        assert "filter 1 added on top: error:errno=EIO,op=read" in screen.status_text
        with pytest.raises(NBDError) as failed:
            client.read(MiB, 4096)
        assert failed.value.errno == c.EIO
        client.write(2 * MiB, b"x" * 4096)  # only reads fail
        screen.query_one("#list").focus()
        await pilot.press("space")
        await finish_workers(app, pilot)
        assert "filter 1 disabled" in screen.status_text
        assert client.read(MiB, 4096) == b"ok" * 2048
        # Bad input is one line in the panel; the stack is unchanged.
        screen.query_one("#spec").focus()
        await pilot.press(*"error:errno=EBOGUS", "enter")
        await finish_workers(app, pilot)
        assert "EBOGUS" in screen.status_text and len(session.steering.layers) == 1
        # A cache filter, then a power cut (after a yes) loses the unflushed write.
        await pilot.press(*"cache", "enter")
        await finish_workers(app, pilot)
        client.write(3 * MiB, b"D" * 4096)
        screen.query_one("#list").focus()
        await pilot.press("exclamation_mark")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await finish_workers(app, pilot)
        assert "POWER CUT: 4.0 KiB" in screen.status_text
        await pilot.press("o")  # a power cut is a crash: nothing is served until the power is back
        await finish_workers(app, pilot)
        assert "POWER ON after" in screen.status_text
        assert client.read(3 * MiB, 4096) == bytes(4096)
        await pilot.press("escape")
        await settle(app, pilot)
        assert "filters cache → error:errno=EIO,op=read" in app.header_widget.plain
        assert any("POWER CUT" in row.message for row in app.stream.events)


@aio(timeout=30)
async def test_the_filters_panel_keeps_typing_in_the_spec_input(session, client):
    app = LabApp(session, auto_poll=False)
    steering = app.model.steering
    steering.add_filter("delay:read=1ms")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f")
        screen = app.screen
        assert isinstance(screen, FiltersScreen)
        spec = screen.query_one("#spec", Input)
        assert screen.focused is spec, "the panel opened in the list: typing would run its keys"
        await pilot.press(*"error:rate=1,errno=EIO,op=trim", "enter")
        await finish_workers(app, pilot)
        assert "filter 2 added on top" in screen.status_text and len(steering.layers) == 2
        assert screen.focused is spec, "enter moved the focus away from the spec input"
        # The list's keys are letters of the next spec while the input has the focus.
        await pilot.press(*"xc d!", "space")
        assert spec.value == "xc d! " and not isinstance(app.screen, ConfirmScreen)
        assert [f.spec for f in steering.layers] == ["delay:read=1ms", "error:errno=EIO,op=trim"]
        assert all(f.enabled for f in steering.layers)
        spec.value = ""
        await pilot.press(*"cache", "enter")
        await finish_workers(app, pilot)
        assert len(steering.layers) == 3 and screen.focused is spec
        # Tab reaches the list (the new filter highlighted, top first): there they act.
        await pilot.press("tab")
        assert isinstance(screen.focused, OptionList)
        await pilot.press("enter")  # enter toggles the highlighted filter: the cache
        await finish_workers(app, pilot)
        assert "filter 3 disabled: cache" in screen.status_text
        await pilot.press("x")
        await finish_workers(app, pilot)
        assert "filter 3 removed: cache" in screen.status_text and len(steering.layers) == 2
        await pilot.press("c")  # not cow: one line says so, nothing else happens
        assert "not cow" in screen.status_text


@aio(timeout=30)
async def test_the_breakpoints_panel_keeps_typing_in_the_spec_input(session):
    app = LabApp(session, auto_poll=False)
    steering = app.model.steering
    steering.add_breakpoint("op=trim")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("k")
        screen = app.screen
        assert isinstance(screen, BreakpointsScreen)
        spec = screen.query_one("#spec", Input)
        assert screen.focused is spec
        await pilot.press(*"op=flush", "enter")
        assert "breakpoint 2 set: op=flush" in screen.status_text and screen.focused is spec
        await pilot.press(*"Xx ", "enter")  # typed, not "remove all", "remove", "toggle"
        assert sorted(steering.breakpoints.by_id) == [1, 2] and all(bp.enabled for bp in steering.breakpoints)
        assert "Xx" in screen.status_text  # refused as a spec, in one line
        spec.value = ""
        await pilot.press("tab", "space")  # the new one is highlighted in the list
        assert isinstance(screen.focused, OptionList)
        assert not steering.breakpoints.find(2).enabled and steering.breakpoints.find(1).enabled
        await pilot.press("x")
        assert sorted(steering.breakpoints.by_id) == [1]


@aio(timeout=30)
async def test_switching_from_ram_to_a_file_keeps_the_data(session, client, tmp_path):
    data = bytes(range(256)) * 64
    client.write(5 * MiB, data)
    target = tmp_path / "disk.img"
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("b")
        screen = app.screen
        assert isinstance(screen, SwitchBackendScreen)
        await pilot.press("ctrl+s")  # file is chosen, without a path
        assert "file needs a path" in screen.status_text
        screen.query_one("#path").value = str(target)
        screen.query_one("#size").value = "1M"
        await pilot.press("ctrl+s")
        assert "smaller than the disk" in screen.status_text
        screen.query_one("#size").value = ""
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SwitchBackendScreen)
        await finish_workers(app, pilot)
        base = session.steering.base
        assert isinstance(base, FileBackend) and Path(base.path) == target
        assert client.read(5 * MiB, len(data)) == data
        with open(target, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(len(data)) == data
        assert any(row.message.startswith("switched backend: ram") for row in app.stream.events)
        assert str(target) in app.header_widget.plain
        # A switch that cannot work is refused in one line, and the device keeps serving.
        await pilot.press("b")
        app.screen.query_one("#path").value = str(tmp_path / "no" / "such" / "dir" / "x.img")
        await pilot.press("ctrl+s")
        await finish_workers(app, pilot)
        assert session.steering.base is base
        assert client.read(5 * MiB, 16) == data[:16]


@aio(timeout=30)
async def test_r_records_a_trace_that_stats_can_read(session, client, tmp_path):
    app = LabApp(session, auto_poll=False)
    app.record_dir = str(tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("r")
        await finish_workers(app, pilot)
        recorder = session.recorder
        assert recorder is not None and recorder.running
        assert "● REC" in app.header_widget.plain and Path(recorder.path).name in app.header_widget.plain
        for i in range(12):
            client.write(i * 4096, bytes([i]) * 4096)
        for i in range(5):
            client.read(i * 4096, 4096)
        client.flush()
        await pilot.press("r")
        await finish_workers(app, pilot)
        assert not recorder.running and "REC" not in app.header_widget.plain
    path = recorder.path
    assert Path(path).parent == tmp_path and path.endswith((".jsonl.zst", ".jsonl.gz"))
    stats = summarize_trace(path)
    assert stats["requests"] == 18
    assert stats["ops"]["WRITE"]["count"] == 12 and stats["ops"]["READ"]["count"] == 5


@aio(timeout=30)
async def test_r_stops_the_recording_the_session_started_with(tmp_path):
    sock = str(tmp_path / "nbd.sock")
    trace = str(tmp_path / "given.jsonl")
    s = Session(open_backend("ram", size=SIZE), ServeOptions(unix=[sock], record=trace))
    s.start()
    try:
        with NBDClient.connect_unix(sock) as nbd:
            nbd.write(0, b"r" * 4096)
        app = LabApp(s, auto_poll=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(app, pilot)
            assert "● REC" in app.header_widget.plain
            await pilot.press("r")
            await finish_workers(app, pilot)
            assert not s.recorder.running
    finally:
        s.stop()
    assert summarize_trace(trace)["requests"] == 1


@aio(timeout=30)
async def test_e_exports_statistics_as_json_and_the_screen_as_svg(session, client, tmp_path):
    for i in range(7):
        client.write(i * 65536, b"e" * 65536)
    for i in range(3):
        client.read(i * 4096, 4096)
    client.trim(10 * MiB, MiB)
    app = LabApp(session, auto_poll=False)
    app.export_dir = str(tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        await pilot.press("e")
        await finish_workers(app, pilot)
        json_path, svg_path = (Path(p) for p in app.exported)
    assert json_path.parent == tmp_path and svg_path.parent == tmp_path
    data = json.loads(json_path.read_text())
    assert data["counters"]["requests"] == 11 and data["recent"]["requests"] == 11
    assert data["counters"]["ops"]["WRITE"]["count"] == 7 and data["recent"]["ops"]["WRITE"]["count"] == 7
    assert data["counters"]["bytes_written"] == 7 * 65536 == data["recent"]["bytes_written"]
    assert data["recent"]["ops"]["READ"]["count"] == 3 and data["recent"]["complete"]
    svg = svg_path.read_text()
    assert svg.startswith("<svg") and "address" in svg and "graphs" in svg


@aio(timeout=30)
async def test_the_lab_stays_readable_with_everything_on_at_100x30(session, client, tmp_path):
    """Paused at a breakpoint, with filters, recording: the header keeps its state in view."""
    steering = session.steering
    app = LabApp(session, auto_poll=False)
    app.record_dir = str(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        steering.add_breakpoint("op=write+fua")
        steering.add_filter("delay:read=1ms")
        await pilot.press("r")
        await finish_workers(app, pilot)
        write = Call(client.write, 0, b"f" * 4096, True)
        wait_held(session, 1)
        await settle(app, pilot)
        lines = app.header_widget.plain.splitlines()
        assert len(lines) == 3
        assert lines[0].startswith(" buselab   ‖ PAUSED  1 held")
        assert "breakpoint 1 (op=write+fua)" in lines[0]
        assert lines[2].startswith("  ● REC ")
        await pilot.press("p")
        write.wait()
        await pilot.press("r")
        await finish_workers(app, pilot)
        await pilot.press("question_mark")
        help_text = app.screen.plain
        assert "step with a choice" in help_text and "switch the backend live" in help_text


def record_five(session: Session, client: NBDClient, tmp_path: Path) -> str:
    """A trace of 4 writes and a read."""
    trace = str(tmp_path / "run.jsonl")
    recorder = TraceRecorder.start(session.engine, trace)
    for i in range(4):
        client.write(i * 4096, bytes([i + 1]) * 4096)
    client.read(0, 4096)
    recorder.stop()
    return trace


@aio(timeout=30)
async def test_the_header_shows_a_replays_progress(session, client, tmp_path):
    """`buselab replay` in the lab sets session.replayer; the header counts it, paused or not."""
    trace = record_five(session, client, tmp_path)
    target = Session(open_backend("ram", size=SIZE), ServeOptions())
    target.start()
    try:
        replayer = Replayer(target.engine, trace, speed=None)
        target.replayer = replayer
        app = LabApp(target, auto_poll=False)
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.press("p")  # the replay waits at the gate like any client
            replayer.start()
            wait_held(target, 1)
            await settle(app, pilot)
            assert re.search(r"replaying [01]/5 \(\d+%\)", app.header_widget.plain), app.header_widget.plain
            await pilot.press("n")
            await pilot.press("p")
            replayer.join(10)
            await settle(app, pilot)
            assert "replayed 5/5 (100%)" in app.header_widget.plain
            assert replayer.summary.divergences == 0
    finally:
        target.stop()


def test_the_lab_ends_while_a_replay_waits_at_a_pause(session, client, tmp_path):
    """q while paused: the held replay request is answered and the replay stopped, no hang."""
    trace = record_five(session, client, tmp_path)
    target = Session(open_backend("ram", size=SIZE), ServeOptions())
    target.start()
    replayer = Replayer(target.engine, trace, speed=None)
    target.replayer = replayer
    target.engine.gate.pause()
    replayer.start()
    wait_held(target, 1)
    ended = Call(lambda: run_lab(target, 0.3, headless=True))
    assert ended.done.wait(15), "the lab did not end while a replay waited at the pause"
    assert ended.result == 0 and target.stopped and not replayer.running
    assert replayer.summary.stopped or replayer.done < 5


@aio(timeout=30)
async def test_cow_from_the_switch_screen_then_discard_and_commit_in_the_filters_panel(session, client):
    client.write(0, b"base" * 1024)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("b", "down", "down", "enter")  # file, ram, cow: press cow
        assert app.screen.kind == "cow"
        await pilot.press("ctrl+s")  # no path: an overlay over the current backend
        await finish_workers(app, pilot)
        steering = session.steering
        assert steering.base.kind == "cow"
        client.write(0, b"new!" * 1024)
        await pilot.press("f")
        screen = app.screen
        assert isinstance(screen, FiltersScreen)
        assert "c commit the changes" in str(screen.query_one("#actions").render())
        screen.query_one("#list").focus()
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await finish_workers(app, pilot)
        assert "discarded 4.0 KiB" in screen.status_text
        assert client.read(0, 4096) == b"base" * 1024
        client.write(4096, b"kept" * 1024)
        await pilot.press("c")  # a commit cannot be undone either: it asks first
        assert isinstance(app.screen, ConfirmScreen) and "4.0 KiB of changes" in str(
            app.screen.query_one(Static).render()
        )
        await pilot.press("n")
        await finish_workers(app, pilot)
        assert "no cow commit" in screen.status_text and steering.base.base.read(4096, 4) != b"kept"
        await pilot.press("c", "y")
        await finish_workers(app, pilot)
        assert "committed 4.0 KiB" in screen.status_text
        assert steering.base.base.read(4096, 4) == b"kept"  # in the backend under the overlay
