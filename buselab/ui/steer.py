"""The lab's steering keys: pause, step, breakpoints, filters, backend switches,
recording a trace and exporting statistics.

Mixed into LabApp. Everything goes through the session's `Steering` (the same
calls `buselab ctl` makes). What is instant (pause, step, breakpoints) runs on
the UI thread; what quiesces the engine or waits on a process (filters, a
switch, a power cut, starting and stopping a recording, summarizing the ring)
runs in a thread worker through `steer()`, which turns a UserError into one
line and never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from textual.binding import Binding
from textual.worker import Worker

from ..errors import UserError
from ..protocol import constants as c
from ..sizes import human_bytes
from ..storage.registry import FilterSpecError
from .export import export_stats
from .inspector import record_from_held
from .screens.backend import SwitchBackendScreen, SwitchChoice
from .screens.breakpoints import BreakpointsScreen
from .screens.filters import FiltersScreen
from .screens.step import StepChoice, StepScreen

if TYPE_CHECKING:
    from ..engine.gate import HeldRequest
    from ..steering import Steering
    from ..steering.results import StepResult, SwitchResult
    from .model import Tick

log = logging.getLogger("buselab")
T = TypeVar("T")
PENDING_FOR = 5.0  # seconds to look for a stepped or caught request's row before giving up

STEERING_BINDINGS = [
    Binding("p", "pause", "Pause"),
    Binding("n", "step", "Step"),
    Binding("N,shift+n", "step_menu", "Step…", show=False),
    Binding("k", "breakpoints", "Breaks"),
    Binding("f", "filters", "Filters"),
    Binding("b", "switch_backend", "Backend"),
    Binding("r", "record", "Rec"),
    Binding("e", "export", "Export"),
]


def user_message(exc: UserError) -> str:
    """The one line the lab shows for a refusal (a filter spec says it came from the lab's filter list)."""
    return exc.worded("filter") if isinstance(exc, FilterSpecError) else str(exc)


def trace_path(directory: str | None = None, stamp: str | None = None) -> str:
    """./buselab-YYYYmmdd-HHMMSS.jsonl.zst (.gz without zstandard), never an existing file."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        ext = ".jsonl.gz"
    else:
        ext = ".jsonl.zst"
    return _fresh_path(directory, f"buselab-{stamp or time.strftime('%Y%m%d-%H%M%S')}", ext)


def _fresh_path(directory: str | None, stem: str, ext: str) -> str:
    directory = os.path.abspath(directory or os.getcwd())
    path = os.path.join(directory, stem + ext)
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"{stem}-{n}{ext}")
    return path


def matched(item: HeldRequest) -> tuple[int, int] | None:
    """The bytes of a held request's payload (offsets in it) that its breakpoint's pattern matched."""
    match_range = getattr(item.breakpoint, "match_range", None)
    found = match_range(item.req) if match_range is not None else None
    return (found[0] - item.req.offset, found[1] - item.req.offset) if found is not None else None


class SteeringActions:
    """The steering half of LabApp (see lab.py for the other half)."""

    steering: Steering

    def init_steering(self) -> None:
        self.steering = self.model.steering
        self._busy: dict[int, str] = {}
        self._busy_ids = 0
        # conn, handle, note, since, and the whole payload and its highlighted bytes, to show again
        self._stepped: tuple[int, int, str, float, bytes | None, tuple[int, int] | None] | None = None
        self._caught: tuple[dict, float] | None = None  # a breakpoint hit whose request to show
        self._recording_busy = False
        self.exported: list[str] = []  # files `e` wrote (tests read them)
        self.export_dir: str | None = None  # None: the current directory
        self.record_dir: str | None = None
        self.stream.lost_source = lambda: self.model.lost_requests  # rows a power cut lost say so
        self.stream.what_source = self.model.what  # and every row what it touched

    # -- running steering calls --------------------------------------------------------------
    def steer(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        done: Callable[[T], None] | None = None,
        failed: Callable[[str], None] | None = None,
        busy: bool = True,
    ) -> Worker:
        """Run `fn` in a thread worker; then `done(result)`, or `failed(one line)`, on the UI thread.

        With `busy`, the header says `what` while it runs (the engine is quiesced: requests wait).
        """
        self._busy_ids += 1
        token = self._busy_ids
        if busy:
            self._busy[token] = what
            self._show_busy()

        def finish(result: Any, error: str | None) -> None:
            self._busy.pop(token, None)
            self._show_busy()
            if error is not None:
                (failed or self.say_error)(error)
            elif done is not None:
                done(result)
            self.refresh_header()

        def work() -> None:
            try:
                result = fn()
            except UserError as exc:
                outcome: tuple[Any, str | None] = (None, user_message(exc))
            except Exception as exc:  # noqa: BLE001 - one line on screen, the traceback in the log
                log.exception("%s failed", what)
                outcome = (None, f"{what} failed: {type(exc).__name__}: {exc}")
            else:
                outcome = (result, None)
            try:
                self.call_from_thread(finish, *outcome)
            except RuntimeError:  # the lab has gone
                pass

        return self.run_worker(work, thread=True, group="steering", name=what, exit_on_error=False)

    def _show_busy(self) -> None:
        self.model.busy = next(reversed(self._busy.values()), None) if self._busy else None
        self.refresh_header()

    def say(self, message: str) -> None:
        self.notify(message, markup=False)

    def say_error(self, message: str) -> None:
        self.notify(message, severity="error", markup=False, timeout=8)

    def refresh_header(self) -> None:
        self.header_widget.update_from_model()

    # -- per tick: a breakpoint hit, a stepped request's answer ------------------------------
    def steering_tick(self, tick: Tick) -> None:
        """Called by poll(); costs nothing unless a step or a breakpoint hit is pending."""
        if tick.new_break is not None:
            hit = tick.new_break
            self.notify(
                f"breakpoint {hit.breakpoint} ({hit.spec}) fired on {hit.op} "
                f"{hit.offset:,}+{hit.length:,}: paused · n step · N step with a choice · p resume",
                severity="warning",
                markup=False,
                timeout=6,
            )
            self._caught = (hit, time.monotonic())
        if self._caught is not None and tick.held:
            hit, since = self._caught
            for item in tick.held:
                if item.req.handle == hit.handle and getattr(item.breakpoint, "id", None) == hit.breakpoint:
                    note = f"caught by breakpoint {hit.breakpoint} ({hit.spec}): held · n releases it"
                    self.inspector.show(
                        record_from_held(item),
                        cell_bytes=self.heatmap.display_cell_bytes,
                        note=note,
                        payload=item.req.payload,
                        mark=matched(item),
                    )
                    self._caught = None
                    break
            else:
                if time.monotonic() - since > PENDING_FOR:
                    self._caught = None
        stepped = self._stepped
        if stepped is not None and tick.records:
            conn, handle, note, since, payload, mark = stepped
            for record in reversed(tick.records):
                if record.handle == handle and record.conn == conn:
                    self.inspector.show(
                        record, cell_bytes=self.heatmap.display_cell_bytes, note=note, payload=payload, mark=mark
                    )
                    self._inspector_shown_at = time.monotonic()
                    self._stepped = None
                    break
            else:
                if time.monotonic() - since > PENDING_FOR:
                    self._stepped = None

    # -- pause and step -------------------------------------------------------------------------
    def action_pause(self) -> None:
        steering = self.steering
        if steering.paused:
            steering.resume()
        else:
            steering.pause()
        self.poll()

    def action_step(self) -> None:
        self.do_step(StepChoice("release"))

    def action_step_menu(self) -> None:
        held = self.steering.gate.held()
        if not held:
            self.say_error(
                "nothing is held: p pauses (or k sets a breakpoint); requests that arrive then can be stepped"
            )
            return
        req = held[0].req
        oldest = f"{req.name} {req.offset:,}+{req.length:,}" if req.length else req.name
        self.push_screen(StepScreen(oldest, len(held)), self._step_chosen)

    def _step_chosen(self, choice: object) -> None:
        if isinstance(choice, StepChoice):
            self.do_step(choice)

    def do_step(self, choice: StepChoice) -> StepResult | None:
        """Step the oldest held request as `choice` says; show it in the inspector."""
        steering = self.steering
        try:
            info = steering.step(choice.action, errno=choice.errno, delay_ms=choice.delay_ms)
        except UserError as exc:
            self.say_error(user_message(exc))
            return None
        item = steering.last_stepped
        still = info.still_held
        note = f"stepped: {choice.describe()}" + (f" · {still} still held" if still else " · nothing else held")
        if item is not None:
            error = c.ERRNO_BY_NAME.get(str(info.errno), 0) if choice.action == "fail" else 0
            payload = bytes(item.req.payload) if item.req.payload is not None else None
            mark = matched(item)
            self.inspector.show(
                record_from_held(item, error=error),
                cell_bytes=self.heatmap.display_cell_bytes,
                note=note,
                payload=payload,
                mark=mark,
            )
            conn = getattr(item.replier, "number", 0)
            self._stepped = (conn, item.req.handle, note, time.monotonic(), payload, mark)
        self.poll()
        return info

    # -- panels ----------------------------------------------------------------------------------
    def action_breakpoints(self) -> None:
        self.push_screen(BreakpointsScreen(self.steering), lambda _: self.refresh_header())

    def action_filters(self) -> None:
        self.push_screen(FiltersScreen(self.steering), lambda _: self.refresh_header())

    def action_switch_backend(self) -> None:
        if self.steering.switching is not None or any(w.name.startswith("switching") for w in self.workers):
            self.say_error("a switch is running already: wait for it to finish")
            return
        base = self.steering.base
        screen = SwitchBackendScreen(
            base.describe(), base.kind, self.model.disk_size, would_overwrite=self.steering.switch_would_overwrite
        )
        self.push_screen(screen, self._switch_chosen)

    def _switch_chosen(self, choice: object) -> None:
        if not isinstance(choice, SwitchChoice):
            return
        steering = self.steering

        def switched(result: SwitchResult) -> None:
            how = f"copied {human_bytes(result.copied_bytes)}" if choice.copy else "contents not copied"
            took = f" in {result.seconds:.2f} s" if result.seconds is not None else ""
            self.say(f"switched backend: {result.from_} → {result.to} ({how}{took})")

        self.steer(
            f"switching to {choice.kind}",
            lambda: steering.switch_backend(
                choice.kind, choice.path, size=choice.size, copy=choice.copy, overwrite=choice.overwrite
            ),
            done=switched,
            failed=lambda message: self.say_error(f"no switch: {message}"),
        )

    # -- traces and export ---------------------------------------------------------------------
    def action_record(self) -> None:
        if self._recording_busy:
            self.say("the recording is starting or stopping: a moment")
            return
        session = self.session
        self._recording_busy = True

        def settled(_: object = None) -> None:
            self._recording_busy = False

        if session.recording is not None:

            def stopped(info: Any) -> None:
                settled()
                if info.error:
                    self.say_error(f"recording ended badly: {info.describe()}")
                else:
                    self.say(f"recorded {info.describe()}")

            self.steer(
                "stopping the recording", session.stop_recording, done=stopped, failed=self._record_failed, busy=False
            )
            return

        path = trace_path(self.record_dir)

        def start() -> Any:
            return session.start_recording(path)  # Session.stop stops it, however the lab ends

        def began(started: Any) -> None:
            settled()
            self.say(f"recording to {started.path}: r stops")

        self.steer("starting a recording", start, done=began, failed=self._record_failed, busy=False)

    def _record_failed(self, message: str) -> None:
        self._recording_busy = False
        self.say_error(message)

    def action_export(self) -> None:
        """The statistics as JSON (off the UI thread) and this screen as SVG, in the current directory."""
        directory = os.path.abspath(self.export_dir or os.getcwd())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        json_path = _fresh_path(directory, f"buselab-stats-{stamp}", ".json")
        svg_path = _fresh_path(directory, f"buselab-lab-{stamp}", ".svg")
        try:
            self.save_screenshot(filename=os.path.basename(svg_path), path=directory)
        except OSError as exc:
            self.say_error(f"cannot write {svg_path}: {exc.strerror or exc}")
            return
        session = self.session
        model = self.model

        def write() -> str:
            telemetry = session.engine.telemetry
            records = telemetry.recent()
            data = export_stats(session, records, telemetry.snapshot(), samples=list(model.samples))
            try:
                with open(json_path, "w") as f:
                    json.dump(data, f, indent=2)
                    f.write("\n")
            except OSError as exc:
                raise UserError(f"cannot write {json_path}: {exc.strerror or exc}") from None
            return json_path

        def written(path: str) -> None:
            self.exported = [path, svg_path]
            self.say(f"exported {os.path.basename(path)} and {os.path.basename(svg_path)} to {directory}")

        self.steer("exporting statistics", write, done=written, busy=False)
