"""The lab, driven by Textual's Pilot over a real Session and a real NBD client.

Each test serves a RAM disk on a Unix socket in tmp_path, sends requests with
buselab.client.NBDClient, lets the app poll telemetry, and checks what the
widgets show: rows for the requests, the heatmap cell of the written range,
the graphs, the inspector's hexdump, the op filter, held requests, and that q
and `seconds` end the lab with the session stopped.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import aio, socket_path

from buselab.client import NBDClient
from buselab.engine.telemetry import RequestRecord
from buselab.protocol import constants as c
from buselab.ui.heatmap import NEVER, READ_RGB, WRITE_RGB
from buselab.ui.lab import LabApp, run_lab
from buselab.ui.model import Gap, LabModel
from buselab.ui.screens.help import HelpScreen

MiB = 1 << 20


@pytest.fixture
def client(session):
    nbd = NBDClient.connect_unix(socket_path(session))
    yield nbd
    nbd.close()


def screen_lines(widget) -> list[str]:
    """The text of every line a line-API widget renders now."""
    return [widget.render_line(y).text for y in range(widget.size.height)]


async def settle(app: LabApp, pilot) -> None:
    """One poll of telemetry, then let the screen catch up."""
    app.poll()
    await pilot.pause()


@aio
async def test_rows_appear_for_the_requests_a_client_sent(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        client.write(3 * MiB, b"a" * 8192)
        client.read(5 * MiB, 4096)
        client.flush()
        client.trim(7 * MiB, 65536)
        client.write(9 * MiB, b"f" * 4096, fua=True)
        await settle(app, pilot)
        ops = [(r.op, r.offset, r.length) for r in app.stream.rows if isinstance(r, RequestRecord)]
        assert ops == [
            ("WRITE", 3 * MiB, 8192),
            ("READ", 5 * MiB, 4096),
            ("FLUSH", 0, 0),
            ("TRIM", 7 * MiB, 65536),
            ("WRITE", 9 * MiB, 4096),
        ]
        text = "\n".join(screen_lines(app.stream))
        assert "seq" in text and "offset" in text and "latency" in text
        rows = [line for line in text.splitlines() if "WRITE" in line or "READ" in line or "TRIM" in line]
        assert any("WRITE" in line and str(3 * MiB) in line and "8K" in line for line in rows), text
        assert any("READ" in line and str(5 * MiB) in line and "4K" in line for line in rows), text
        assert any("TRIM" in line and str(7 * MiB) in line and "64K" in line for line in rows), text
        assert any("WRITE" in line and str(9 * MiB) in line and "FUA" in line for line in rows), text
        assert "FLUSH" in text
        header = app.header_widget.plain
        assert "SERVING" in header and "16.0 MiB" in header and "requests 5" in header


@aio
async def test_heatmap_cell_of_the_written_range_lights_up(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        before = app.heatmap.colour_at(11 * MiB)
        assert before == NEVER
        client.write(11 * MiB, b"w" * MiB)
        client.read(2 * MiB, 4096)
        await settle(app, pilot)
        hot = app.heatmap.colour_at(11 * MiB)
        read = app.heatmap.colour_at(2 * MiB)
        untouched = app.heatmap.colour_at(14 * MiB)
        assert untouched == NEVER
        # Writes tint toward orange, reads toward blue.
        assert hot != NEVER and hot[0] > hot[2], hot
        assert read != NEVER and read[2] > read[0], read
        assert abs(hot[0] - WRITE_RGB[0]) < abs(hot[0] - NEVER[0]) and abs(read[2] - READ_RGB[2]) < 120
        # The cell under the cursor names its range and counts.
        app.heatmap.focus()
        cell = app.heatmap.point_at(11 * MiB)
        await pilot.pause()
        start, end = app.heatmap.cell_range(cell)
        assert start <= 11 * MiB < end
        info = "\n".join(screen_lines(app.heatmap))
        assert f"cell {cell} " in info and "W 1" in info
        assert "1 cell = " in info


@aio
async def test_graphs_move_with_traffic(session, client):
    clock = FakeClock(1000.0)
    app = LabApp(session, auto_poll=False, clock=clock)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        for second in range(3):
            for i in range(16):
                client.write((second * 16 + i) * 65536, b"g" * 65536)
                client.read(i * 4096, 4096)
            clock.advance(1.0)
            await settle(app, pilot)
        samples = list(app.model.samples)
        assert len(samples) == 3
        assert all(s.write_bps > 0 and s.read_iops > 0 for s in samples)
        assert samples[-1].write_iops == pytest.approx(16, rel=0.01)
        assert samples[-1].write_bps == pytest.approx(16 * 65536, rel=0.01)
        lines = screen_lines(app.graphs)
        text = "\n".join(lines)
        assert "throughput" in text and "IOPS" in text and "latency" in text
        assert "MB/s" in text and "now" in text
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in text), "no braille plot drawn"


@aio
async def test_inspector_shows_a_hexdump_of_the_written_pattern(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        client.write(8192, b"BUSELAB!" * 1024, fua=True)
        client.read(0, 4096)
        await settle(app, pilot)
        await pilot.press("up", "up")  # select the write (the newest row is the read)
        record = app.stream.selected_record
        assert record is not None and record.op == "WRITE"
        assert not app.stream.follow
        text = app.inspector.text
        assert "WRITE" in text and "FUA" in text
        assert "8,192 – 16,383" in text and "blocks   2 – 3" in text
        assert "first 1,024 of 8,192 bytes written" in text
        assert "00002000  42 55 53 45 4c 41 42 21  42 55 53 45 4c 41 42 21  |BUSELAB!BUSELAB!|" in text
        shown = "\n".join(screen_lines(app.inspector))
        assert "|BUSELAB!BUSELAB!|" in shown
        # end follows the stream again; the inspector shows the newest request
        await pilot.press("end")
        await pilot.pause()
        assert app.stream.follow and app.inspector.record.op == "READ"


@aio
async def test_op_filter_hides_other_ops(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        for i in range(5):
            client.write(i * 4096, b"x" * 4096)
            client.read(i * 4096, 4096)
        client.flush()
        await settle(app, pilot)
        await pilot.press("2", "3")  # hide WRITE and FLUSH
        ops = {r.op for r in app.stream.rows if isinstance(r, RequestRecord)}
        assert ops == {"READ"}
        assert "only READ TRIM OTHER" in app.stream.pane_title
        client.write(99 * 4096, b"y" * 4096)
        client.read(98 * 4096, 4096)
        await settle(app, pilot)
        assert {r.op for r in app.stream.rows if isinstance(r, RequestRecord)} == {"READ"}
        assert "WRITE" not in "\n".join(screen_lines(app.stream)).split("\n", 1)[1]
        await pilot.press("0")
        ops = [r.op for r in app.stream.rows if isinstance(r, RequestRecord)]
        assert ops.count("WRITE") == 6 and ops.count("FLUSH") == 1 and ops.count("READ") == 6


@aio
async def test_a_flood_coalesces_into_a_more_row(session):
    app = LabApp(session, auto_poll=False)
    app.model.rows_per_tick = 100
    telemetry = session.engine.telemetry
    rec = telemetry.recorder()
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        now = time.perf_counter()
        for i in range(1000):
            telemetry.record(rec, c.CMD_READ, 0, i * 4096, 4096, now, now + 1e-5, 0, 1, i, None)
        await settle(app, pilot)
        rows = app.stream.rows
        gaps = [r for r in rows if isinstance(r, Gap)]
        assert len(gaps) == 1 and gaps[0].count == 900
        assert sum(isinstance(r, RequestRecord) for r in rows) == 100
        assert rows[-1].seq == telemetry.snapshot().last_seq
        await pilot.press("home")  # scroll back to the top, where the gap row is
        text = "\n".join(screen_lines(app.stream))
        assert "+900 more requests not shown" in text


@aio
async def test_held_requests_show_while_paused(session, client):
    app = LabApp(session, auto_poll=False)
    gate = session.engine.gate
    async with app.run_test(size=(160, 50)) as pilot:
        gate.pause()
        done = threading.Event()

        def read() -> None:
            client.read(4 * MiB, 4096)
            done.set()

        thread = threading.Thread(target=read)
        thread.start()
        deadline = time.monotonic() + 5
        while not gate.held() and time.monotonic() < deadline:
            time.sleep(0.01)
        await settle(app, pilot)
        assert "PAUSED" in app.header_widget.plain and "1 held" in app.header_widget.plain
        text = "\n".join(screen_lines(app.stream))
        assert "held" in text and str(4 * MiB) in text and "waiting" in text
        gate.resume()
        assert done.wait(5)
        thread.join()
        await settle(app, pilot)
        await settle(app, pilot)
        assert "SERVING" in app.header_widget.plain
        assert app.stream.rows[-1].op == "READ" and not app.stream.held


@aio
async def test_help_heat_time_mode_and_quit(session, client):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        client.write(0, b"z" * 4096)
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("m")
        assert app.heatmap.mode == "time"
        await settle(app, pilot)
        text = "\n".join(screen_lines(app.heatmap))
        assert "offset by time" in text and "now" in text and "1 col = 1 s" in text
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@aio
async def test_offset_by_time_view(session, client):
    clock = FakeClock(50.0)
    app = LabApp(session, auto_poll=False, clock=clock)
    async with app.run_test(size=(160, 50)) as pilot:
        for second in range(4):
            client.write((1 + second * 3) * MiB, b"t" * 65536)
            clock.advance(1.0)
            await settle(app, pilot)
        columns = list(app.model.columns)
        assert len(columns) == 4 and all(columns)
        rows = app.model.time_rows
        buckets = [next(iter(col.items()))[0] for col in columns]
        assert buckets == sorted(buckets) and buckets[0] < buckets[-1] < rows  # later writes, higher offsets
        await pilot.press("m")
        heat = app.heatmap
        _axis, plot, bands = heat._time_geometry(heat.inner_width, heat.inner_height)
        shown = heat._time_columns(plot)
        heat.hover_time = (len(shown) - 2, buckets[-1] * bands // rows)  # the last closed second
        app.heatmap.refresh()
        await pilot.pause()
        text = "\n".join(screen_lines(app.heatmap))
        assert "offset by time" in text and "1 row = " in text and "now" in text
        assert "1s ago: " in text and "write 16 " in text  # a 64 KiB write touches 16 cells of 4 KiB


def test_run_lab_stops_the_session(session, client, capsys):
    client.write(0, b"s" * 4096)
    started = time.monotonic()
    assert run_lab(session, seconds=0.6, headless=True) == 0
    assert time.monotonic() - started < 10
    assert session.stopped
    assert "stopped cleanly after 1 requests" in capsys.readouterr().out


def test_a_stop_request_ends_the_lab(session):
    """SIGINT/SIGTERM (buselab.signals) and control clients set session.stop_requested."""
    threading.Timer(0.5, session.stop_requested.set).start()
    started = time.monotonic()
    assert run_lab(session, headless=True) == 0
    assert time.monotonic() - started < 10 and session.stopped


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@aio
async def test_the_header_total_keeps_up_with_the_stream_between_snapshots(session):
    """Under load the model takes a snapshot only every busy_snapshot_every seconds;
    the header's request total follows the newest row's seq in between."""
    clock = [100.0]
    model = LabModel(session, clock=lambda: clock[0], busy_rows=50, busy_snapshot_every=10.0)
    app = LabApp(session, auto_poll=False, model=model)
    telemetry = session.engine.telemetry
    rec = telemetry.recorder()

    def flood(n: int) -> None:
        now = time.perf_counter()
        for i in range(n):
            telemetry.record(rec, c.CMD_READ, 0, i * 4096, 4096, now, now + 1e-5, 0, 1, i, None)

    async with app.run_test(size=(160, 50)) as pilot:
        clock[0] += 0.1
        await settle(app, pilot)
        for _ in range(3):
            flood(400)
            clock[0] += 0.1  # well inside busy_snapshot_every: no snapshot this tick
            tick = app.poll()
            await pilot.pause()
            assert not tick.snapshot_taken and tick.requests_changed
            newest = app.stream.rows[-1].seq
            assert newest == telemetry.snapshot().last_seq
            assert f"requests {newest:,}" in app.header_widget.plain
            assert model.snapshot.total_requests < newest  # the snapshot is stale; the header is not
        header_lines = app.header_widget.plain.splitlines()
        assert len(header_lines) == 3 and "SERVING" in header_lines[0]


@aio
async def test_the_footer_and_help_fit_80x24(session):
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        for key in ("q Quit", "? Help", "p Pause", "n Step", "k Break", "f Filter", "b Disk", "r Rec", "e Save"):
            assert key in footer, footer
        await pilot.press("question_mark")
        await pilot.pause()
        lines = screen_text(app).splitlines()
        # The intro reflows as one paragraph; a key's description wraps beside its key.
        first = next(i for i, line in enumerate(lines) if "quit: answer in-flight" in line)
        column = lines[first].index("quit: answer")
        assert lines[first + 1][column:].lstrip("│ ").startswith("detach, exit"), lines[first : first + 2]
        assert lines[first + 1][column - 3 : column].strip() == "", "the wrapped description lost its indent"
        intro = next(i for i, line in enumerate(lines) if "Every request a client" in line)
        assert "engine; the lab reads its telemetry" in lines[intro + 1], lines[intro : intro + 2]
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert "l Live" in footer and "k Breaks" in footer and "e Export" in footer, footer


def screen_text(app: LabApp) -> str:
    return "\n".join(strip.text.rstrip() for strip in app.screen._compositor.render_strips())
