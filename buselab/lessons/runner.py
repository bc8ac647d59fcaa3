"""A lesson running against a live session: steps, checkpoints, the pause at the moment that matters.

The runner never touches the serve path. It reads finished requests from the telemetry ring
when it is polled (the lab's tick, or `run_auto`'s loop), matches them against the current
step's checkpoint with the breakpoints' own matcher (struct= included), and sets the one
breakpoint a checkpoint asks for, so the device pauses on the very request the class should
look at. `run_auto` runs each step's commands itself (a projector demo, and the VM test).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable

from ..control.protocol import ControlTarget, dispatch, parse_text_line
from ..engine.runs import find_runs
from ..engine.telemetry import RequestRecord, max_overlap
from ..errors import UserError
from ..session import Session
from ..steering.breakpoints import Breakpoint, parse_match
from .facts import describe, facts
from .model import Checkpoint, Lesson, LessonError, Step

RECORDS_KEPT = 100_000  # requests since the lesson began that a checkpoint of scope "lesson" can see
COMMAND_TIMEOUT = 600.0  # seconds one command of --auto may run
TAIL = 256  # requests before the new ones that a run or an overlap may begin in
# A run checkpoint fires once the run is over, so its numbers are the whole run's ("4M WRITE
# split 32x128K", not the 11 pieces that had come when it was first seen): when no request has
# come for RUN_SETTLE seconds, or RUN_SETTLE_MAX after the run was seen if I/O never stops.
RUN_SETTLE = 0.5
RUN_SETTLE_MAX = 5.0


@dataclasses.dataclass
class CommandResult:
    command: str
    status: int
    output: str  # stdout and stderr, the last lines


Execute = Callable[..., CommandResult]  # (command line, env=None) -> its result


class LessonRunner:
    def __init__(
        self,
        session: Session,
        lesson: Lesson,
        *,
        device: str,
        mount_dir: str = "/mnt",
        execute: Execute | None = None,
        where: str = "",
    ) -> None:
        self.session = session
        self.lesson = lesson
        # Where the step's commands run: here (run_command), or in the lesson's VM (--vm).
        self.execute: Execute = execute or run_command
        self.where = where  # "" for this machine, else where execute runs them ("the VM")
        self.fields = {
            "dev": device,
            "mnt": mount_dir,
            "name": os.path.basename(device),
            "size": str(session.engine.size),
        }
        self.index = -1
        self.state = "idle"  # reading (no checkpoint) | waiting | paused | reached | finished
        self.explanation = ""
        self.held = ""  # the request the checkpoint's breakpoint holds, described
        self.reached: list[int] = []  # steps whose checkpoint fired, in order
        self.results: list[CommandResult] = []  # what --auto (or `x` in the lab) ran in this step
        self._records: deque[RequestRecord] = deque(maxlen=RECORDS_KEPT)
        self._last_seq = self._newest_seq()
        self._step_first_seq = self._last_seq + 1
        self._step_starts: dict[int, int] = {}  # step index -> the first request seq it saw
        self._wait: Breakpoint | None = None
        self._breakpoint: int | None = None
        self._held_flags: set[str] = set()
        self._lock = threading.RLock()  # the lab's tick and --auto's thread both poll

    # -- moving through the lesson ---------------------------------------------------------------
    @property
    def step(self) -> Step | None:
        return self.lesson.steps[self.index] if 0 <= self.index < len(self.lesson.steps) else None

    @property
    def holding(self) -> bool:
        """Is the device paused by this step's breakpoint (the class is looking)?"""
        return self._breakpoint is not None and self.session.steering.paused

    def command_lines(self, step: Step | None = None) -> list[str]:
        """The step's commands with {dev}, {mnt}, {name}, {size} filled in, as the class types them."""
        step = step or self.step
        return [command.format_map(self.fields) for command in step.commands] if step else []

    def goto(self, index: int) -> None:
        """Leave the current step (its pause released) and begin step `index`."""
        with self._lock:
            self.poll()  # what came before belongs to the step before ...
            first = self._last_seq + 1
            self._leave()  # ... and what the released pause lets through to this one
            if index >= len(self.lesson.steps):
                self.index, self.state = len(self.lesson.steps), "finished"
                return
            self.index = max(0, index)
            step = self.lesson.steps[self.index]
            self._step_first_seq = first
            self._step_starts[self.index] = first
            self.explanation = self.held = ""
            self._held_flags = set()
            self.results = []
            for line in step.steer:
                self._steer(line, step)
            checkpoint = step.checkpoint
            if checkpoint is None:
                self.state = "reading"
                return
            self._wait = parse_match(checkpoint.wait, what="checkpoint") if checkpoint.wait else None
            self._begin_scope(checkpoint)
            if checkpoint.pause:
                self._breakpoint = self._steer_result(f"break add {checkpoint.pause}", step)["id"]
            self.state = "waiting"

    def next(self) -> None:
        self.goto(self.index + 1)

    def previous(self) -> None:
        self.goto(max(0, self.index - 1))

    def close(self) -> None:
        """End the lesson: nothing of it stays armed or held."""
        with self._lock:
            self._leave()
            self.state = "finished"

    def _leave(self) -> None:
        if self._breakpoint is not None:
            steering = self.session.steering
            try:
                steering.remove_breakpoint(self._breakpoint)
            except UserError:
                pass  # the user removed it already
            self._breakpoint = None
            if steering.paused:
                steering.resume()  # the class has looked: let the held request go
        self._wait = None

    # -- watching ----------------------------------------------------------------------------------
    # The lab polls ten times a second while fio may send thousands of requests a second: each
    # poll looks only at the new requests (and a short tail before them, for runs and overlap).
    # Matching a struct= wait again over the whole scope happens only when the map is replaced.
    def poll(self) -> bool:
        """Take in the requests finished since the last poll; True when the checkpoint fires now."""
        with self._lock:
            fresh = self.session.engine.telemetry.recent(self._last_seq)
            if fresh:
                self._records.extend(fresh)
                self._last_seq = max(self._last_seq, fresh[-1].seq)
                self._fresh_at = time.monotonic()
            if self.state not in ("waiting", "paused"):
                return False
            checkpoint = self.step.checkpoint  # type: ignore[union-attr]
            assert checkpoint is not None
            self._take(checkpoint, [r for r in fresh if r.seq >= self._step_first_seq or checkpoint.scope != "step"])
            if checkpoint.pause and self.state == "waiting" and self._breakpoint_hit():
                self.state = "paused"
            if not self._fired(checkpoint):
                return False
            self.state = "reached"
            self.reached.append(self.index)
            self.explanation = self._explain(checkpoint, self._in_scope, self._matched)
            return True

    def _begin_scope(self, checkpoint: Checkpoint) -> None:
        if checkpoint.scope == "lesson":
            self._in_scope: list[RequestRecord] = list(self._records)
        elif checkpoint.scope == "previous":  # what the step before set going, its pause's release included
            since = self._step_starts.get(self.index - 1, self._step_first_seq)
            self._in_scope = [r for r in self._records if r.seq >= since]
        else:
            self._in_scope = []
        self._matched: list[RequestRecord] = []
        self._matched_with = None  # the map the matches were made with
        self._run_seen = False
        self._run_seen_at = 0.0
        self._fresh_at = time.monotonic()
        self._most_in_flight = 0
        self._take(checkpoint, [])

    def _take(self, checkpoint: Checkpoint, fresh: list[RequestRecord]) -> None:
        tail = self._in_scope[-TAIL:]
        self._in_scope.extend(fresh)
        if len(self._in_scope) > RECORDS_KEPT:  # a long step under fio: keep the newest
            del self._in_scope[: len(self._in_scope) - RECORDS_KEPT]
        if self._wait is not None:
            fsmap = self.session.labeller.map
            if fsmap is not self._matched_with:  # a new map may know what the old one did not
                self._matched_with = fsmap
                self._matched = [r for r in self._in_scope if self._wait.matches_record(r, fsmap)]
            else:
                self._matched.extend(r for r in fresh if self._wait.matches_record(r, fsmap))
                if len(self._matched) > RECORDS_KEPT:
                    del self._matched[: len(self._matched) - RECORDS_KEPT]
        window = tail + fresh if fresh else self._in_scope
        if checkpoint.run and not self._run_seen and window:
            self._run_seen = any(run.kind == checkpoint.run for run in find_runs(window, self._max_request()))
            self._run_seen_at = time.monotonic()
        if checkpoint.in_flight and window:
            starts = [r.time for r in window]
            most = max_overlap(starts, [r.time + r.latency for r in window])
            self._most_in_flight = max(self._most_in_flight, most)

    def _fired(self, checkpoint: Checkpoint) -> bool:
        if checkpoint.pause and self.state != "paused":
            return False
        if checkpoint.wait and len(self._matched) < checkpoint.count:
            return False
        if checkpoint.run and not self._run_settled():
            return False
        if checkpoint.in_flight and self._most_in_flight < checkpoint.in_flight:
            return False
        return True

    def _run_settled(self) -> bool:
        if not self._run_seen:
            return False
        now = time.monotonic()
        return now - self._fresh_at >= RUN_SETTLE or now - self._run_seen_at >= RUN_SETTLE_MAX

    def _breakpoint_hit(self) -> bool:
        """Has the step's breakpoint caught a request? Describe it, from its own bytes where it has some."""
        hit = self.session.steering.last_break
        if hit is None or hit.breakpoint != self._breakpoint:
            return False
        held = next(
            (h.req for h in self.session.engine.gate.held() if getattr(h.breakpoint, "id", None) == self._breakpoint),
            None,
        )
        fsmap = self.session.labeller.map
        label = None
        if fsmap is not None and hit.length:
            payload = bytes(held.payload[:4096]) if held is not None and held.payload is not None else None
            label = fsmap.label(hit.offset, hit.length, payload)
        text = str(label) if label is not None and label.kind != "unknown" else ""
        self.held = describe(hit.op, hit.length, hit.offset, text)
        self._held_flags = set(hit.flags)
        return True

    def _explain(self, checkpoint: Checkpoint, scope: list[RequestRecord], matched: list[RequestRecord]) -> str:
        labeller = self.session.labeller
        found = facts(
            scope,
            matched,
            label=labeller.label_of,
            focus=self._focus,
            held=self.held,
            held_fua="FUA" in self._held_flags and self.held.startswith("WRITE"),
            max_request=self._max_request(),
        )
        return checkpoint.explain.format_map(found)

    def _focus(self, record: RequestRecord) -> list[tuple[str, int | None]]:
        """(what, file-system block) of the structures the checkpoint waits for that `record` touched.

        The record's own label where it names such a structure (it was decoded from the
        request's bytes: "jbd2 commit, transaction 57"), else the map's regions of those kinds.
        """
        labeller = self.session.labeller
        fsmap = labeller.map
        if fsmap is None:
            return []
        kinds = self._wait.kinds if self._wait is not None else None
        regions = [
            region
            for region in fsmap.regions_in(record.offset, record.length)
            if region.kind not in ("unknown", "free") and (not kinds or region.kind in kinds)
        ]
        blocks = [_block_of(fsmap, region, record.offset) for region in regions]
        own = labeller.label_of(record)
        if own is not None and own.kind not in ("unknown", "free") and (not kinds or own.kind in kinds):
            return [(own.text, blocks[0] if blocks else None)]
        return [(region.label, block) for region, block in zip(regions, blocks)]

    def _max_request(self) -> int | None:
        kernel = self.session.kernel
        if kernel is None:
            return None
        limit = kernel.queue_limits().get("max_sectors_kb")
        return int(limit) * 1024 if isinstance(limit, int) else None

    def _newest_seq(self) -> int:
        recent = self.session.engine.telemetry.recent()
        return recent[-1].seq if recent else 0

    # -- steering ------------------------------------------------------------------------------------
    def _steer(self, line: str, step: Step) -> None:
        self._steer_result(line, step)

    def _steer_result(self, line: str, step: Step) -> dict:
        target = ControlTarget(self.session.steering, self.session.status)
        try:
            return dispatch(target, parse_text_line(line))
        except UserError as exc:
            raise LessonError(f"step {self.index + 1} ({step.title}): {line!r}: {exc}") from None

    # -- running the commands (--auto) ---------------------------------------------------------------
    def run_commands(self, env: dict[str, str] | None = None) -> list[CommandResult]:
        """Run the step's commands one after another, as the class would type them; stop at a failure."""
        results = []
        index = self.index
        for line in self.command_lines():
            results.append(self.execute(line, env))
            if self.index == index:  # the class may have gone on meanwhile (`x` in the lab)
                self.results = list(results)
            if results[-1].status != 0:
                break
        return results


def run_command(line: str, env: dict[str, str] | None = None) -> CommandResult:
    try:
        done = subprocess.run(
            ["sh", "-c", line],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return CommandResult(line, 124, f"still running after {COMMAND_TIMEOUT:.0f} s: stopped")
    return _result(line, done.returncode, done.stdout + done.stderr)


def remote_executor(run: Callable[[str, dict[str, str] | None], tuple[int, str]]) -> Execute:
    """An Execute for commands that run elsewhere: `run(line, env)` gives (exit status, output)."""

    def execute(line: str, env: dict[str, str] | None = None) -> CommandResult:
        status, output = run(line, env)
        return _result(line, status, output)

    return execute


def _result(line: str, status: int, output: str) -> CommandResult:
    lines = output.strip().splitlines()
    return CommandResult(line, status, "\n".join(lines[-8:]))


def run_auto(
    runner: LessonRunner,
    *,
    hold: float = 3.0,
    stop: threading.Event | None = None,
    skip: threading.Event | None = None,
    on_change: Callable[[], None] = lambda: None,
) -> None:
    """Every step in order: run its commands, wait for its checkpoint, hold it `hold` seconds.

    A checkpoint that does not fire within its timeout, or a command that fails, ends the
    lesson with LessonError naming the step. `stop` ends it early (quitting the lab).
    """
    stop = stop or threading.Event()
    skip = skip or threading.Event()  # `>` in the lab: go on without waiting the hold
    lesson = runner.lesson
    try:
        for index, step in enumerate(lesson.steps):
            runner.goto(index)
            on_change()
            worker = _Commands(runner)
            worker.start()
            checkpoint = step.checkpoint
            if checkpoint is not None:
                deadline = time.monotonic() + checkpoint.timeout
                while not runner.poll() and runner.state != "reached":
                    if stop.wait(0.1):
                        return
                    if time.monotonic() > deadline:
                        raise LessonError(
                            f"step {index + 1} ({step.title}): the checkpoint never fired in {checkpoint.timeout:g} s"
                            f" ({_waiting_for(checkpoint)})" + worker.failure()
                        )
                    if worker.done.is_set() and worker.failed():
                        raise LessonError(f"step {index + 1} ({step.title}): " + worker.failure().strip("; "))
                on_change()
                skip.clear()
                held_until = time.monotonic() + hold
                while time.monotonic() < held_until and not skip.is_set():
                    if stop.wait(0.05):
                        return
            runner._leave()  # release the pause: the commands can finish
            while not worker.done.wait(0.1):
                if stop.is_set():
                    return
            runner.poll()
            if worker.failed():
                raise LessonError(f"step {index + 1} ({step.title}): " + worker.failure().strip("; "))
            on_change()
        runner.goto(len(lesson.steps))
        on_change()
    finally:
        runner.close()
        for line in lesson.cleanup:  # best effort: leave the machine as the lesson found it
            runner.execute(line.format_map(runner.fields))


class _Commands(threading.Thread):
    def __init__(self, runner: LessonRunner) -> None:
        super().__init__(name="buselab-lesson-commands", daemon=True)
        self.runner = runner
        self.done = threading.Event()
        self.results: list[CommandResult] = []

    def run(self) -> None:
        try:
            self.results = self.runner.run_commands()
        finally:
            self.done.set()

    def failed(self) -> bool:
        return any(r.status != 0 for r in self.results)

    def failure(self) -> str:
        bad = next((r for r in self.results if r.status != 0), None)
        if bad is None:
            return ""
        last = bad.output.splitlines()[-1] if bad.output else ""
        return f"; {bad.command!r} failed (exit {bad.status})" + (f": {last}" if last else "")


def _waiting_for(checkpoint: Checkpoint) -> str:
    parts = []
    if checkpoint.wait:
        parts.append(f"{checkpoint.count} x {checkpoint.wait}")
    if checkpoint.run:
        parts.append(f"a {checkpoint.run} run")
    if checkpoint.in_flight:
        parts.append(f"{checkpoint.in_flight} in flight")
    if checkpoint.pause:
        parts.append(f"a pause on {checkpoint.pause}")
    return "waited for " + " and ".join(parts)


def _block_of(fsmap, region, offset: int) -> int | None:
    """The file-system block at `offset` (within `region`), where the map knows the file system."""
    for fs in getattr(fsmap, "filesystems", ()):
        if fs.offset <= region.offset < fs.offset + fs.size and fs.block_size:
            return (max(offset, region.offset) - fs.offset) // fs.block_size
    return region.block
