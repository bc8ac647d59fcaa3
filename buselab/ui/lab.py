"""The lab app: header, request stream, inspector, heatmap, graphs, footer.

One loop drives everything: every tick (12 a second) `LabModel.poll()` reads
telemetry once and the widgets that changed are told so. The serve path never
waits for the lab and never sends it a message. The loop is an asyncio task
that sleeps to the next tick, not a chain of one-shot timers: a Textual timer
skips a run whose deadline passed while the event loop was stalled, and a
one-shot timer's only run skipped would end the refresh for good.

`run_lab(session)` runs the app and, however it ends (q, ctrl+c, SIGINT or
SIGTERM via `session.stop_requested`, a crash, `seconds`), stops the session: in-flight requests are answered, the
backend flushed, the device detached.

Steering (pause, step, breakpoints, filters, backend switches, recording and
export) lives in steer.py, mixed in here; its panels are in buselab/screens.
The header shows serving/paused, the oldest held request's wait, the control
socket, breakpoints, filters, recording and replay; the stream lists held
requests and the engine's events, all refreshed by the tick.

Runs (one I/O the kernel split at the queue's max_sectors_kb, readahead) are found by
the tick over the records it already has (`RunTracker`): the stream brackets them and the
inspector says "part 3 of 8 of ...". `/` filters the stream in the breakpoints' language
(`struct=journal,op=write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from ..engine.runs import Run, RunTracker
from ..engine.telemetry import RequestRecord
from ..protocol import constants as c
from ..session import Session
from ..signals import stop_on_signals
from ..sizes import human_bytes
from .graphs import Graphs
from .header import LabHeader
from .heatmap import Heatmap
from .inspector import Inspector
from .model import LabModel, Tick
from .screens.help import HelpScreen
from .screens.stream_filter import StreamFilterScreen, filter_passes
from .steer import STEERING_BINDINGS, SteeringActions
from .stream import OP_GROUPS, RequestStream

log = logging.getLogger("buselab")

DEFAULT_HZ = 12.0
MIN_TICK_GAP = 0.03  # seconds: catching up after a late tick, still leave time for a frame
LAB_GC_THRESHOLD = 50_000  # net allocations between young collections while the lab runs
INSPECTOR_FOLLOW_EVERY = 0.25  # seconds between inspector updates while following
INSPECTOR_FOLLOW_BUSY = 1.0  # ... and while requests pour in (it is unreadable faster anyway)


NARROW_FOOTER = 100  # columns: below this the footer drops and shortens keys to fit 80
# In a narrow footer: l is left out (the stream's frame says "l to stop" / "end/l to
# follow"), and these descriptions are shortened, so every other key fits in 80 columns.
NARROW_HIDDEN = frozenset({"toggle_follow"})
NARROW_DESCRIPTIONS = {
    "heat_mode": "Heat",
    "breakpoints": "Break",
    "filters": "Filter",
    "switch_backend": "Disk",
    "export": "Save",
}


class LabFooter(Footer):
    """Textual's footer, with shorter descriptions (and no l) when the terminal is narrow."""

    narrow: reactive[bool] = reactive(False, recompose=True)

    def compose(self) -> ComposeResult:
        for widget in super().compose():
            if self.narrow and isinstance(widget, FooterKey):
                if widget.action in NARROW_HIDDEN:
                    continue
                widget.description = NARROW_DESCRIPTIONS.get(widget.action, widget.description)
            yield widget


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class LabScreen(Screen):
    """The lab's own screen: the panes in a grid (lab.tcss styles LabScreen only,
    so pushed screens such as help keep their own layout)."""

    def compose(self) -> ComposeResult:
        # No containers: the panes sit straight in the screen's grid, so a
        # frame that redraws the stream composes only the stream over the
        # screen, not two more container backgrounds as well.
        app = self.app
        assert isinstance(app, LabApp)
        yield app.header_widget
        yield app.stream
        yield app.heatmap
        yield app.lower_right_pane()
        yield app.inspector
        yield LabFooter()


class LabApp(SteeringActions, App[int]):
    """The live lab over one Session."""

    CSS_PATH = "lab.tcss"
    TITLE = "buselab"
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("1", "toggle_ops(0)", "Ops", key_display="1-5"),
        Binding("2", "toggle_ops(1)", "WRITE", show=False),
        Binding("3", "toggle_ops(2)", "FLUSH", show=False),
        Binding("4", "toggle_ops(3)", "TRIM", show=False),
        Binding("5", "toggle_ops(4)", "other ops", show=False),
        Binding("0", "all_ops", "All ops", show=False),
        Binding("m", "heat_mode", "Heatmap"),
        Binding("slash", "stream_filter", "Filter stream", key_display="/", show=False),
        *STEERING_BINDINGS,
    ]

    HELP_KEYS: list[tuple[str, str]] = []
    """(keys, what they do) lines the help screen adds to its own (for extensions)."""

    def __init__(
        self,
        session: Session,
        *,
        seconds: float | None = None,
        hz: float = DEFAULT_HZ,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        auto_poll: bool = True,
        model: LabModel | None = None,
    ) -> None:
        # Every colour here is truecolor: no ANSI-to-truecolor filter pass per line.
        super().__init__(ansi_color=True)
        self.session = session
        self.seconds = seconds
        self.hz = hz
        self.auto_poll = auto_poll
        self.model = model or LabModel(session, clock=clock, wall=wall)
        self.header_widget = LabHeader(self.model, id="header")
        self.stream = RequestStream(device_size=session.engine.size, id="stream")
        self.inspector = Inspector(id="inspector")
        self.heatmap = Heatmap(self.model, id="heatmap")
        self.graphs = Graphs(self.model, id="graphs")
        self.hidden_groups: set[int] = set()
        self.stream_filter = ""  # the typed filter's spec ("" shows every request)
        self.runs = RunTracker()  # split I/Os and readahead among the rows, found by the tick
        self.queue_limits: dict[str, int | str] = {}  # the kernel device's, when attached
        self.stream.run_source = self.runs.run_of
        self._grid_rows = ""
        self._inspector_shown_at = 0.0
        self._inspector_every = INSPECTOR_FOLLOW_EVERY  # the last tick with records: busy or not
        # The request following put in the inspector (a step's or a breakpoint's may replace it).
        self._inspector_followed: RequestRecord | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._tick_failures = 0  # failed ticks in a row (logged once per streak)
        # Measurements for bench/lab_bench.py (BUSELAB_LAB_STATS=path writes them at exit).
        self.frames = 0
        self.frame_times: list[float] = []
        self.tick_times: list[float] = []
        self.rss: list[tuple[float, int]] = []
        self._started = time.monotonic()
        self._cpu_started = time.thread_time()
        self.freeze_gc = False  # run_lab: freeze the startup objects once the screen is up
        # Per-tick and per-frame times, for bench/lab_bench.py only (they grow).
        self.collect_stats = bool(os.environ.get("BUSELAB_LAB_STATS"))
        self.init_steering()

    # -- layout ------------------------------------------------------------------
    def get_default_screen(self) -> Screen:
        return LabScreen()

    def lower_right_pane(self) -> Widget:
        """What sits under the heatmap: the graphs (a lesson puts its pane there)."""
        return self.graphs

    def on_mount(self) -> None:
        self.stream.pane_title = "requests"
        self.inspector.pane_title = "inspector"
        self.heatmap.pane_title = "address space · heat"
        self.graphs.pane_title = "graphs · last minutes"
        self.stream.focus()
        self._fit_layout()
        self.header_widget.update_from_model()
        if self.freeze_gc:
            self.call_after_refresh(gc.freeze)
        if self.auto_poll:
            self._tick_task = asyncio.create_task(self._tick_loop(), name="buselab lab ticks")
        if self.seconds is not None:
            # An interval, not a one-shot timer: one run skipped after a stall must not mean never.
            deadline = time.monotonic() + self.seconds
            self.set_interval(min(0.1, self.seconds), lambda: self._quit_after(deadline), name="seconds")

    def on_unmount(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None

    def _quit_after(self, deadline: float) -> None:
        if time.monotonic() >= deadline:
            self.action_quit()

    @property
    def lab_screen(self) -> Screen:
        """The screen with the panes (help may be on top of it)."""
        return self.screen_stack[0] if self.screen_stack else self.screen

    def on_resize(self, event: events.Resize) -> None:
        self._fit_layout(event.size.width, event.size.height)

    def _fit_layout(self, width: int | None = None, height: int | None = None) -> None:
        if width is None or height is None:
            width, height = self.size
        screen = self.lab_screen
        screen.set_class(width < 130, "narrow")
        screen.set_class(height < 40, "short")
        for footer in screen.query(LabFooter):
            footer.compact = width < 130  # every key still fits at 100 columns
            footer.narrow = width < NARROW_FOOTER  # ... and at 80 with shorter words
        self.call_after_refresh(self._fit_heatmap)

    def _fit_heatmap(self) -> None:
        """Give the heatmap exactly the rows its grid needs; the graphs get the rest."""
        width = self.heatmap.size.width
        if not width:
            return
        body = self.lab_screen.size.height - 4  # header and footer
        inspector = 9 if body < 37 else 18
        heat = self.heatmap.preferred_height(width, max(8, min(24, body - inspector - 6)))
        rows = f"{heat} 1fr {inspector}"
        if rows != self._grid_rows:
            self._grid_rows = rows
            self.lab_screen.styles.grid_rows = rows

    # -- the tick -------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        """Tick on a fixed schedule until the lab ends, whatever a tick or a stall does.

        An interval timer skips the ticks it could not run on time; when the
        serving threads hold the GIL that drops the refresh rate below 10 Hz.
        Here a late tick makes the next one come sooner (never closer than
        MIN_TICK_GAP, so a frame fits between), which keeps the average rate.
        A stall of the event loop only makes the next tick late; a tick that
        raises is logged and the next one runs.
        """
        period = 1.0 / self.hz
        next_tick = time.monotonic() + period
        while True:
            await asyncio.sleep(max(MIN_TICK_GAP, next_tick - time.monotonic()))
            if not self.is_running or self._exit:
                return
            if not self._tick():
                return
            now = time.monotonic()
            next_tick += period
            if next_tick < now - period:
                next_tick = now  # far behind (suspended, debugger): start afresh

    def _tick(self) -> bool:
        """One tick: poll, or end the lab if a stop was asked for. False: no more ticks."""
        if self.session.stop_requested.is_set():
            # SIGINT/SIGTERM (see buselab.signals) or a control client asked to stop.
            self.exit(0)
            return False
        notice = getattr(self.session, "notice", None)
        if notice is not None and notice != getattr(self, "_notice_shown", None):
            self._notice_shown = notice  # e.g. --run's command ended: stays up until q
            self.notify(notice, title="buselab", timeout=24 * 3600)
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - one bad tick must not end the refresh
            self._tick_failures += 1
            if self._tick_failures == 1:
                log.exception("a lab tick failed; the lab goes on ticking")
            else:
                log.debug("a lab tick failed again (%d in a row)", self._tick_failures, exc_info=True)
        else:
            if self._tick_failures:
                log.info("the lab ticks again after %d failed ticks", self._tick_failures)
            self._tick_failures = 0
        return True

    def poll(self) -> Tick:
        """Read telemetry once and hand each widget what changed."""
        started = time.perf_counter()
        tick = self.model.poll()
        if tick.records:
            self._read_queue_limits()
            changed = self.runs.add(tick.records, after_gap=tick.gap is not None)
            if changed:
                self.stream.runs_changed(changed)
                # The request shown may be in a run that grew: "part 6 of 6" is now "part 6 of 32".
                self.inspector.refresh_run()
        self.stream.set_want_what(self.model.disk_known or self.runs.seen, self.runs.seen)
        self.stream.add(tick.records, tick.gap, tick.held, tick.events)
        if tick.heat_changed:
            self.heatmap.refresh_heat()
        if tick.sampled:
            self.graphs.refresh_graphs()
        if tick.snapshot_taken or tick.requests_changed or tick.held or tick.events:
            # Under load snapshots are rarer; the request total still follows the stream
            # (only the header's changed line is drawn again).
            self.header_widget.update_from_model()
        if tick.records and self.stream.follow:
            busy = len(tick.records) >= self.model.busy_rows
            self._inspector_every = INSPECTOR_FOLLOW_BUSY if busy else INSPECTOR_FOLLOW_EVERY
        if self.stream.follow and (tick.records or self.inspector.record is self._inspector_followed):
            # Also on a tick without records: a burst that came within the interval after the
            # last update (the rest of a split write, a tick later under load) is shown once the
            # interval is over, not only when the next request arrives (maybe never: a lesson's
            # step waits). A request a step or a breakpoint put there stays until new ones come.
            self._follow_inspector()
        if tick.new_break is not None or self._caught is not None or self._stepped is not None:
            self.steering_tick(tick)
        if self.collect_stats:
            self.tick_times.append(time.perf_counter() - started)
        if self.collect_stats and self.model.ticks % 120 == 1:
            self.rss.append((time.monotonic() - self._started, _rss_bytes()))
        return tick

    def _follow_inspector(self) -> None:
        """While the stream follows, show its newest request in the inspector, at most every
        `_inspector_every` seconds (drawing it at every tick under load is unreadable anyway)."""
        newest = self.stream.newest_record
        if newest is None or newest is self.inspector.record:
            return
        now = time.monotonic()
        if now - self._inspector_shown_at >= self._inspector_every:
            self._inspector_shown_at = now
            self._show_followed(newest)

    def _show_followed(self, record: RequestRecord | None) -> None:
        self._inspector_followed = record
        self.inspector.show(record, cell_bytes=self.heatmap.display_cell_bytes)

    def _display(self, screen, renderable) -> None:  # type: ignore[no-untyped-def]
        # Counted for the bench's refresh rate; Textual calls this once per frame written.
        if renderable is not None:
            self.frames += 1
            if self.collect_stats:
                self.frame_times.append(time.time())
        super()._display(screen, renderable)

    def _read_queue_limits(self) -> None:
        """The kernel device's queue limits, for the runs' piece size (the model re-reads them
        every few seconds: read_ahead_kb and max_sectors_kb can change)."""
        self.queue_limits = self.model.queue_limits or {}
        max_kb = self.queue_limits.get("max_sectors_kb")
        self.runs.max_request = max_kb * 1024 if isinstance(max_kb, int) and max_kb > 0 else None

    def disk_now(self, offset: int, length: int) -> bytes:
        """The disk's bytes [offset, offset+length) now, through the stack the clients see (the
        inspector pages an answered request past the first KiB telemetry kept). Raises as a read would."""
        return bytes(self.session.engine.stack.top.read(offset, length))

    def run_text(self, record: RequestRecord) -> str:
        """The inspector's "run" rows: which run the request belongs to, then what the queue says."""
        run: Run | None = self.runs.run_of(record.seq) if record.seq else None
        if run is None:
            return ""
        text = run.part(record.seq)
        limits = self.queue_limits
        if run.kind == "split":
            if "max_sectors_kb" in limits:
                text += f"\npieces of the queue's max_sectors_kb: {limits['max_sectors_kb']} KiB ({self.session.where})"
            else:
                text += "\nguessed: back-to-back pieces of one size (queue limits known on /dev/nbdN)"
        elif "read_ahead_kb" in limits:
            text += f"\nthe queue's read_ahead_kb: {limits['read_ahead_kb']} KiB"
        return text

    # -- messages ----------------------------------------------------------------------
    def on_heatmap_resized(self, message: Heatmap.Resized) -> None:
        self._fit_heatmap()

    def on_request_stream_selected(self, message: RequestStream.Selected) -> None:
        record = message.record
        if record is None:
            self._show_followed(self.stream.newest_record)
            return
        self.inspector.show(record, cell_bytes=self.heatmap.display_cell_bytes)
        if record.length:
            self.heatmap.cursor = self.heatmap.cell_for_offset(record.offset)
            self.heatmap.refresh()

    # -- actions ----------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.HELP_KEYS))

    def action_toggle_ops(self, group: int) -> None:
        if group in self.hidden_groups:
            self.hidden_groups.discard(group)
        else:
            self.hidden_groups.add(group)
        if len(self.hidden_groups) == len(OP_GROUPS):
            self.hidden_groups.discard(group)  # hiding everything helps nobody
        self._apply_op_filter()

    def action_all_ops(self) -> None:
        self.hidden_groups.clear()
        self._apply_op_filter()

    def _apply_op_filter(self) -> None:
        hidden: frozenset[int] = frozenset()
        for i in self.hidden_groups:
            hidden |= OP_GROUPS[i][1]
        self.stream.set_hidden_ops(hidden)
        self._stream_title()

    def action_stream_filter(self) -> None:
        if isinstance(self.screen, StreamFilterScreen):
            return

        def chosen(match: object) -> None:
            if match is None:
                return  # esc: the filter in use stays
            if match == "":
                self.stream_filter = ""
                self.stream.set_row_filter(None)
            else:
                self.stream_filter = match.spec  # type: ignore[attr-defined]
                labeller = self.session.labeller
                self.stream.set_row_filter(filter_passes(match, lambda: labeller.map))  # type: ignore[arg-type]
            self._stream_title()

        self.push_screen(StreamFilterScreen(self.stream_filter, self.session.engine.size), chosen)

    def _stream_title(self) -> None:
        shown = [name for i, (name, _ops) in enumerate(OP_GROUPS) if i not in self.hidden_groups]
        title = "requests" if not self.hidden_groups else "requests · only " + " ".join(shown)
        if self.stream_filter:
            title += f" · / {self.stream_filter}"
        self.stream.pane_title = title

    def action_heat_mode(self) -> None:
        self.heatmap.action_toggle_mode()

    def action_quit(self) -> None:  # type: ignore[override]
        self.exit(0)

    # -- measurements ------------------------------------------------------------------
    def stats(self) -> dict:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        ticks = sorted(self.tick_times)
        return {
            "elapsed": elapsed,
            "ticks": self.model.ticks,
            "tick_hz": self.model.ticks / elapsed,
            "frames": self.frames,
            "ui_cpu": (time.thread_time() - self._cpu_started) / elapsed,
            "frame_hz": self.frames / elapsed,
            "tick_ms_mean": 1e3 * sum(ticks) / len(ticks) if ticks else 0.0,  # empty unless collect_stats
            "tick_ms_p99": 1e3 * ticks[int(len(ticks) * 0.99)] if ticks else 0.0,
            "tick_ms_max": 1e3 * ticks[-1] if ticks else 0.0,
            "rows_added": self.stream.rows_added,
            "gaps": self.stream.gaps_added,
            "rows_skipped": self.model.rows_skipped,
            "rss": self.rss + [(elapsed, _rss_bytes())],
            "gc": gc.get_stats(),
            "frame_times": self.frame_times,
        }


def release_for_exit(session: Session) -> None:
    """The lab is ending: let clients the lab was holding finish before they are stopped.

    A replay (or the demo's client) waiting for a held reply cannot notice that
    it should stop; Session.stop would wait for it before closing the engine,
    which is what releases held requests. So stop the replay from sending more,
    disarm breakpoints and answer what is held, as Engine.close would.
    """
    replayer = session.replayer
    if replayer is not None:
        replayer.stop()
    # Before the demo's client is stopped (it may wait on a held reply); Session.stop does
    # the same again for everyone else.
    session.engine.gate.release_all()


def run_lab(session: Session, seconds: float | None = None, *, headless: bool = False) -> int:
    """Run the lab until q (or `seconds`), then stop the session cleanly.

    `headless` runs the app without a terminal (tests); without one otherwise,
    the lab falls back to the headless stats printer.
    """
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        from ..headless import run_headless

        print("buselab: no terminal for the lab; printing stats instead (--headless)", file=sys.stderr)
        return run_headless(session, seconds=seconds)
    app = LabApp(session, seconds=seconds)
    threshold = gc.get_threshold()
    # The serve path allocates and frees a record per request in balance, so
    # headless it almost never triggers the cycle collector. The lab keeps
    # rows and caches alive, which turns that into net growth: at the default
    # threshold the collector then runs hundreds of times a second, each time
    # walking every young record in the telemetry ring with the GIL held,
    # which cost fio a third of its IOPS. Collect rarely while the lab runs,
    # and (gc.freeze, once the screen is up) never walk the app's own widgets.
    app.freeze_gc = True
    gc.set_threshold(max(threshold[0], LAB_GC_THRESHOLD), *threshold[1:])
    try:
        # Signals set session.stop_requested, which the tick turns into a clean exit.
        main = threading.current_thread() is threading.main_thread()
        with stop_on_signals(session.stop_requested) if main else contextlib.nullcontext():
            app.run(headless=headless)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
        release_for_exit(session)
        workload = session.demo_workload
        if workload is not None:
            workload.stop()  # before the server goes, so the demo client sees no errors
        session.stop()
        stats_path = os.environ.get("BUSELAB_LAB_STATS")
        if stats_path:
            Path(stats_path).write_text(json.dumps(app.stats(), indent=1))
    if app.return_code not in (None, 0):
        return app.return_code
    snap = session.engine.telemetry.snapshot()
    print(
        f"buselab: stopped cleanly after {snap.total_requests:,} requests"
        f" (read {human_bytes(snap.bytes[c.CMD_READ])}, wrote {human_bytes(snap.bytes[c.CMD_WRITE])})"
    )
    return 0
