"""What the lab knows, refreshed once per tick from telemetry.

`LabModel.poll()` is the lab's only contact with the serve path: one
`Telemetry.snapshot()` and one `Telemetry.recent(after_seq, limit)` per tick,
whatever the request rate. From those it derives everything the widgets draw:
new rows for the stream (with a `Gap` when there were more than a tick can
show), decayed per-cell activity for the heatmap, offset-by-time columns, and
one graph sample a second. Requests in flight are counted every tick
(`Telemetry.in_flight_now`: the connections' receive buffers and the gate,
off the serve path); every sample also takes `Telemetry.activity()`, the last
seconds' most in flight, sizes and sequential share. No Textual here, so it
is tested on its own.

It also picks up, once per tick and only when they changed, the engine's
events (pause, breakpoint hits, filters, backend switches: rows in the stream)
and the steering's last breakpoint hit (which the lab announces).

Widgets read the session only through this model: the properties at the end
say what is served where, the steering's state, the recording and the replay.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from ..engine.telemetry import Activity, RequestRecord, Snapshot, events_after, histogram_between, percentile
from ..protocol import constants as c
from ..steering.results import BreakHit

if TYPE_CHECKING:
    from ..engine.gate import HeldRequest
    from ..fsmap import FsMap
    from ..session import Session
    from ..steering.breakpoints import Breakpoint
    from ..steering.restack import PowerCut
    from ..steering.results import SwitchProgress
    from ..storage.stack import Layer
    from ..trace.recorder import TraceRecorder

TIME_ROWS = 128  # offset buckets kept per time column (the widget shows fewer)
QUEUE_REREAD = 2.0  # seconds between reads of a kernel device's queue limits (read_ahead_kb can change)


@dataclass(frozen=True)
class Gap:
    """Requests that happened but are not rows: the stream shows '+N more'."""

    count: int
    first_seq: int
    last_seq: int
    time: float  # wall time of the first row after the gap


class Sample(NamedTuple):
    """One point of the graphs: rates over one sample interval."""

    t: float  # model clock at the end of the interval
    read_bps: float
    write_bps: float
    read_iops: float
    write_iops: float
    other_iops: float  # flush, trim, write zeroes, cache, block status
    p50: float  # seconds, over every op completed in the interval: time in buselab
    p99: float
    requests: int  # completed in the interval
    in_flight: int = 0  # read and not answered at the end of the interval (held ones included)
    max_in_flight: int = 0  # the most at once during it
    mean_in_flight: float = 0.0  # on average (Little's L: latency-seconds per second)


@dataclass
class Tick:
    """What changed in one poll."""

    records: list[RequestRecord] = field(default_factory=list)
    gap: Gap | None = None
    heat_changed: bool = False
    sampled: bool = False
    snapshot_taken: bool = False
    requests_changed: bool = False  # LabModel.requests moved (between snapshots too)
    held: list[HeldRequest] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (wall time, message), oldest first
    new_break: BreakHit | None = None  # the steering's last breakpoint hit, when it is new


def _zeros(n: int) -> list[float]:
    return [0.0] * n


class TimeColumn:
    """One closed column of the offset-by-time view: [read, write, trim] per
    offset bucket, packed in an array (a dict of lists per column would grow
    the lab by megabytes over a long run at full load)."""

    __slots__ = ("counts",)

    def __init__(self, open_column: dict[int, list[int]], rows: int) -> None:
        self.counts: array | None = None
        if open_column:
            counts = array("I", bytes(4 * 3 * rows))
            for bucket, (r, w, t) in open_column.items():
                base = bucket * 3
                counts[base] = min(r, 0xFFFFFFFF)
                counts[base + 1] = min(w, 0xFFFFFFFF)
                counts[base + 2] = min(t, 0xFFFFFFFF)
            self.counts = counts

    def __bool__(self) -> bool:
        return self.counts is not None

    def items(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        counts = self.counts
        if counts is None:
            return
        for bucket in range(len(counts) // 3):
            base = bucket * 3
            r, w, t = counts[base], counts[base + 1], counts[base + 2]
            if r or w or t:
                yield bucket, (r, w, t)


class LabModel:
    def __init__(
        self,
        session: Session,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rows_per_tick: int = 250,
        sample_every: float = 1.0,
        history: int = 900,
        half_life: float = 1.5,
        time_column: float = 1.0,
        time_columns: int = 300,
        busy_rows: int = 200,
        busy_snapshot_every: float = 0.5,
    ) -> None:
        self.session = session
        self.telemetry = session.engine.telemetry
        self.gate = session.engine.gate
        self.clock = clock
        self._queue_limits: dict[str, int | str] | None = None
        self._queue_read_at = 0.0
        self.wall = wall
        self.rows_per_tick = rows_per_tick
        self.sample_every = sample_every
        self.half_life = half_life
        self.time_column = time_column
        self.time_columns = time_columns
        self.started = clock()
        self.busy_rows = busy_rows
        self.busy_snapshot_every = busy_snapshot_every
        self.last_seq = 0
        self.requests = 0  # requests served: the snapshot's total, or the newest row's seq when later
        self.ticks = 0
        self.rows_seen = 0
        self.rows_skipped = 0
        self.snapshot: Snapshot = self.telemetry.snapshot()
        self._sample_base = self.snapshot
        self._sample_base_t = self.started
        self.samples: deque[Sample] = deque(maxlen=history)
        self.held: list[HeldRequest] = []
        self.steering = session.steering
        self.busy: str | None = None  # what the lab is doing to the stack (a switch, a filter), for the header
        self._last_event: tuple[float, str] | None = None
        self._last_break: BreakHit | None = None
        self._last_snapshot = self.started
        self._reset_heat(self.snapshot)
        self.requests = self.snapshot.total_requests
        # Requests in flight: now (every tick, from the connections' buffers and the gate), and
        # the last seconds' activity (every sample: the most in flight, latency per op, sizes
        # and the sequential share).
        self.in_flight = 0
        self.window: Activity | None = None

    # -- heat ------------------------------------------------------------------
    def _reset_heat(self, snap: Snapshot) -> None:
        cells = len(snap.heat[0])
        self.cells = cells
        self.cell_bytes = snap.cell_bytes
        self.size = snap.size
        self.heat_prev = [list(row) for row in snap.heat]
        # Decayed recent touches per telemetry cell: [read, write, trim].
        self.activity = [_zeros(cells) for _ in range(3)]
        self.activity_peak = 0.0
        self.bucket_cells = max(1, -(-cells // TIME_ROWS))
        self.time_rows = -(-cells // self.bucket_cells)
        # Offset-by-time: one sparse column per interval {bucket: [r, w, t]}.
        self.columns: deque[TimeColumn] = deque(maxlen=self.time_columns)
        self.column_open: dict[int, list[int]] = {}
        self.column_started = self.clock()
        self.heat_version = 0

    def _update_heat(self, snap: Snapshot, dt: float) -> bool:
        if len(snap.heat[0]) != self.cells or snap.cell_bytes != self.cell_bytes:
            self._reset_heat(snap)
        decay = 0.5 ** (dt / self.half_life) if self.half_life > 0 else 0.0
        changed = False
        column = self.column_open
        per = self.bucket_cells
        for kind in range(3):
            now = snap.heat[kind]
            prev = self.heat_prev[kind]
            act = self.activity[kind]
            if now != prev:
                delta = [a - b for a, b in zip(now, prev)]
                self.activity[kind] = [x * decay + d for x, d in zip(act, delta)]
                self.heat_prev[kind] = now
                for i, d in enumerate(delta):
                    if d:
                        slot = column.get(i // per)
                        if slot is None:
                            slot = column[i // per] = [0, 0, 0]
                        slot[kind] += d
                changed = True
            elif self.activity_peak > 0:
                self.activity[kind] = [x * decay for x in act]
        if changed:
            self.activity_peak = max(max(row) for row in self.activity)
        elif self.activity_peak > 0:
            self.activity_peak *= decay
            if self.activity_peak < 0.02:  # faded out: stop decaying zeros every tick
                self.activity = [_zeros(self.cells) for _ in range(3)]
                self.activity_peak = 0.0
            changed = True
        now_t = self.clock()
        while now_t - self.column_started >= self.time_column:
            self.columns.append(TimeColumn(self.column_open, self.time_rows))
            self.column_open = column = {}
            self.column_started += self.time_column
            changed = True
        if changed:
            self.heat_version += 1
        return changed

    # -- graphs ---------------------------------------------------------------
    def _take_sample(self, snap: Snapshot, now: float) -> Sample:
        base = self._sample_base
        dt = max(now - self._sample_base_t, 1e-6)
        count = [a - b for a, b in zip(snap.count, base.count)]
        nbytes = [a - b for a, b in zip(snap.bytes, base.bytes)]
        window = histogram_between(snap.latency, base.latency, [cmd for cmd in range(len(count)) if count[cmd]])
        reads = count[c.CMD_READ]
        writes = count[c.CMD_WRITE]
        total = sum(count)
        # The last seconds (the header's "max", sizes and patterns), then this interval alone.
        telemetry = self.telemetry
        gate = self.gate
        held = [h.replier.number for h in gate.held()] if gate.paused or self.held else []
        # The records' own clock (perf_counter based: the wall clock may be stepped), unless a
        # test runs the model on a clock of its own.
        wall = None if self.wall is time.time else self.wall()
        releasing = gate.releasing
        self.window = telemetry.activity(now=wall, snap=snap, held=held, releasing=releasing)
        interval = telemetry.activity(dt, now=wall, snap=snap, held=held, releasing=releasing)
        return Sample(
            t=now,
            read_bps=nbytes[c.CMD_READ] / dt,
            write_bps=nbytes[c.CMD_WRITE] / dt,
            read_iops=reads / dt,
            write_iops=writes / dt,
            other_iops=(total - reads - writes) / dt,
            p50=percentile(window, 0.5),
            p99=percentile(window, 0.99),
            requests=total,
            in_flight=interval.in_flight,
            max_in_flight=interval.max_in_flight,
            mean_in_flight=max(0.0, sum(snap.latency_sum) - sum(base.latency_sum)) / dt,
        )

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight at once over the last seconds (now included)."""
        window = self.window
        return max(self.in_flight, window.max_in_flight if window is not None else 0)

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    # -- the tick ---------------------------------------------------------------
    def poll(self) -> Tick:
        """Read telemetry once and work out what changed since the last poll.

        The stream's new records are read every tick. The snapshot (counters,
        histograms and the heat matrix, summed over every serving thread) costs
        more, so under load it is taken only every `busy_snapshot_every` seconds.
        In between, `requests` follows the newest record's seq (telemetry numbers
        every request it records, from 1), so the header's total keeps up with the
        stream at no cost; `Tick.requests_changed` says when it moved.
        """
        now = self.clock()
        self.ticks += 1
        tick = Tick()
        records = self.new_records()
        if records:
            first = records[0].seq
            skipped = first - self.last_seq - 1
            if skipped > 0:
                # More arrived than a tick shows (or they came before the lab opened).
                tick.gap = Gap(skipped, self.last_seq + 1, first - 1, records[0].time)
                if self.last_seq:
                    self.rows_skipped += skipped
            self.last_seq = max(self.last_seq, records[-1].seq, first)
            self.rows_seen += len(records)
            tick.records = records
        busy = len(records) >= self.busy_rows
        sample_due = now - self._sample_base_t >= self.sample_every
        if not busy or sample_due or now - self._last_snapshot >= self.busy_snapshot_every:
            snap = self.telemetry.snapshot()
            self.snapshot = snap
            tick.snapshot_taken = True
            tick.heat_changed = self._update_heat(snap, max(now - self._last_snapshot, 0.0))
            self._last_snapshot = now
            if sample_due:
                self.samples.append(self._take_sample(snap, now))
                self._sample_base = snap
                self._sample_base_t = now
                tick.sampled = True
        requests = max(self.snapshot.total_requests, self.last_seq)
        if requests != self.requests:
            self.requests = requests
            tick.requests_changed = True
        gate = self.gate
        if gate.paused or self.held:
            self.held = gate.held()
        tick.held = self.held
        if tick.sampled:
            self.in_flight = self.samples[-1].in_flight
        else:
            held = [h.replier.number for h in self.held]
            self.in_flight = sum(self.telemetry.in_flight_now(held, gate.releasing).values())
        events = self.telemetry.events
        if events and events[-1] is not self._last_event:
            tick.events = self._new_events(list(events))  # list(deque) is one C call: no torn copy
        last_break = self.steering.last_break
        if last_break is not self._last_break:
            self._last_break = last_break
            tick.new_break = last_break
        if self._power_cut_seen():
            tick.heat_changed = True  # its lost cells are drawn
        fsmap = self.session.labeller.map
        if fsmap is not self._map_seen:
            # The labeller replaced the disk's map (it does so a while after the writes that
            # changed it, when their heat may have faded): the structure view is drawn again.
            self._map_seen = fsmap
            self.heat_version += 1
            tick.heat_changed = True
        return tick

    def _new_events(self, events: list[tuple[float, str]]) -> list[tuple[float, str]]:
        new = events_after(events, self._last_event)
        self._last_event = events[-1]
        return new

    def new_records(self) -> list[RequestRecord]:
        """Records after `last_seq`, at most `rows_per_tick` of them, oldest first."""
        return self.telemetry.recent(self.last_seq, self.rows_per_tick)

    # -- questions widgets ask ---------------------------------------------------
    def cell_counts(self, first_cell: int, last_cell: int) -> tuple[list[int], list[float]]:
        """[read, write, trim] touches of telemetry cells first..last, and the decayed recent ones.

        Telemetry counts a request once per cell it touches, so over a range of
        cells the busiest one is the honest count: one write across the range
        is one write, not one per cell.
        """
        totals = [max(self.heat_prev[k][first_cell : last_cell + 1], default=0) for k in range(3)]
        recent = [sum(self.activity[k][first_cell : last_cell + 1]) for k in range(3)]
        return totals, recent

    _map_seen: object = None

    @property
    def fsmap(self) -> FsMap | None:
        """The disk's map as the labeller last built it (replaced whole, never changed), or None."""
        return self.session.labeller.map

    @property
    def queue_limits(self) -> dict[str, int | str] | None:
        """A kernel device's queue limits (sysfs), read again every few seconds; None when not attached."""
        kernel = getattr(self.session, "kernel", None)
        if kernel is None:
            return None
        now = self.clock()
        if self._queue_limits is None or now - self._queue_read_at >= QUEUE_REREAD:
            self._queue_read_at = now
            try:
                self._queue_limits = kernel.queue_limits()
            except Exception:  # noqa: BLE001 - sysfs gone (detaching): the runs fall back to guessing
                self._queue_limits = {}
        return self._queue_limits

    @property
    def disk_known(self) -> bool:
        """Does the disk's map know what the disk holds (a partition table, a file system)?"""
        fsmap = self.session.labeller.map
        return fsmap is not None and bool(fsmap.filesystems or fsmap.table)

    def what(self, record: RequestRecord) -> str:
        """The structure a request touched, from the disk's map ("" where the map knows nothing)."""
        if not record.seq:  # a held request: not recorded yet, so looked up now
            fsmap = self.session.labeller.map
            label = fsmap.label(record.offset, record.length, record.preview) if fsmap is not None else None
        else:
            label = self.session.labeller.label_of(record)
        if label is None or label.kind == "unknown":
            return ""
        return str(label)

    def failure_reason(self, record: RequestRecord) -> str:
        """Why a failed request failed, as the backend said it ("" if it succeeded, or nobody said)."""
        if not record.error or not record.seq:
            return ""
        return self.telemetry.reason(record.seq) or ""

    def uptime(self) -> float:
        return self.wall() - self.telemetry.started

    # -- power cuts: the requests and cells whose writes a cut threw away -----------------------
    lost_requests: frozenset[int] = frozenset()
    """Numbers of the requests power cuts threw away (the stream says 'lost'), over every cut."""
    _cut_seen: object = None
    _lost_cells: dict[int, int] | None = None  # telemetry cell -> its writes + trims at the cut
    _lost_geometry: tuple[int, int] = (0, 0)  # (cells, cell_bytes) the lost cells count in

    def _power_cut_seen(self) -> bool:
        """Pick up a power cut the steering made since the last tick; True if there was one."""
        cut: PowerCut | None = self.steering.restacker.last_cut
        if cut is self._cut_seen:
            return False
        self._cut_seen = cut
        if cut is None:
            return False
        self.lost_requests = self.lost_requests | cut.requests
        # A cell stays lost until something is written (or trimmed) there again: remember
        # how many writes it had, the lost ones included (the snapshot settles them).
        snap = self.telemetry.snapshot()
        geometry = (len(snap.heat[0]), snap.cell_bytes)
        cells = self._lost_cells if self._lost_cells and self._lost_geometry == geometry else {}
        writes, trims, cell = snap.heat[1], snap.heat[2], snap.cell_bytes
        for offset, length in cut.ranges:
            for i in range(offset // cell, min((offset + max(length, 1) - 1) // cell, geometry[0] - 1) + 1):
                cells[i] = writes[i] + trims[i]
        self._lost_cells = cells
        self._lost_geometry = geometry
        self.heat_version += 1
        return True

    def lost_cell_flags(self, group: int, shown: int) -> list[bool] | None:
        """Per display cell (`group` telemetry cells each): does it hold data a power cut lost?
        None when no cell does. A cell written or trimmed again since is no longer lost."""
        cells = self._lost_cells
        if not cells:
            return None
        if self._lost_geometry != (self.cells, self.cell_bytes):
            self._lost_cells = None  # the disk was switched: its cells mean other bytes now
            return None
        writes, trims = self.heat_prev[1], self.heat_prev[2]
        for i in [i for i, count in cells.items() if writes[i] + trims[i] > count]:
            del cells[i]
        flags = [False] * shown
        for i in cells:
            if i // group < shown:
                flags[i // group] = True
        return flags if cells else None

    def is_lost(self, record: RequestRecord) -> bool:
        """Whether a power cut threw this request's write away."""
        return record.seq in self.lost_requests

    @property
    def powered_off(self) -> bool:
        """A power cut and no poweron since: every request fails with EIO."""
        return self.steering.restacker.powered_off

    # -- what is served, and how it is steered (the header reads these) ---------------------------
    @property
    def stopped(self) -> bool:
        return self.session.stopped

    @property
    def backend_description(self) -> str:
        return self.session.engine.backend.describe()

    @property
    def disk_size(self) -> int:
        return self.session.engine.size

    @property
    def readonly(self) -> bool:
        engine = self.session.engine
        return engine.readonly or engine.backend.readonly

    @property
    def where(self) -> str:
        return self.session.where

    @property
    def transport(self) -> str:
        return self.session.transport

    @property
    def workload(self):
        """The demo's workload (rounds, phase, errors), or None."""
        return self.session.demo_workload

    @property
    def replayer(self):
        """A replay running through the engine (done, total, summary), or None."""
        return self.session.replayer

    @property
    def recording(self) -> TraceRecorder | None:
        return self.session.recording

    @property
    def control(self) -> tuple[str | None, str | None] | None:
        """(path, why there is none) of the control socket; None without one."""
        control = self.session.control
        return None if control is None else (control.path, control.error)

    @property
    def paused(self) -> bool:
        return self.steering.paused

    def oldest_wait(self) -> float:
        return self.steering.oldest_wait()

    @property
    def breakpoints(self) -> list[Breakpoint]:
        return list(self.steering.breakpoints)

    @property
    def layers(self) -> list[Layer]:
        """The filter stack, bottom first."""
        return self.steering.layers

    @property
    def switching(self) -> SwitchProgress | None:
        return self.steering.switching


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above value (axis tops)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        top = m * 10**exp
        if top >= value * 0.999:
            return float(top)
    return float(10 ** (exp + 1))  # pragma: no cover
