"""A running buselab seen through its control socket: the session an attached lab reads.

The lab reads a session through a small surface: `session.engine.telemetry`
(snapshot, recent, events, in_flight_now, activity, reason), `session.engine.gate`
(paused, held, releasing), `session.steering` (its state, and the calls the
steering keys make) and a few properties (where, stopped, recording...).
`RemoteSession` offers the same surface over two connections to the control
socket: one carries telemetry frames (`watch`, see buselab/control/watch.py),
read by a thread that keeps the newest state; the other carries the steering
keys' commands, the ones `buselab ctl` sends. `LabModel` and the widgets run
unchanged on it, so an attached lab is the full lab: each viewer has its own
model (selection, stream filters, heatmap mode), and what one viewer steers
reaches every viewer as the server's events, held requests and status.

The viewer keeps a bounded copy (the newest RING records, events, failure
reasons). When the server goes, `stop_requested` is set: the lab's tick ends
the app, and `gone` says why in one line.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import islice
from types import SimpleNamespace
from typing import Any

from ..control.client import ControlClient
from ..engine.gate import HeldRequest
from ..engine.telemetry import (
    Activity,
    ConnectionActivity,
    OpActivity,
    RequestRecord,
    Snapshot,
)
from ..errors import UserError
from ..protocol import constants as c
from ..protocol.transmission import Request
from ..steering.restack import PowerCut
from ..steering.results import (
    BreakHit,
    BreakpointInfo,
    CowCommitResult,
    CowDiscardResult,
    FilterInfo,
    PauseResult,
    PowercutResult,
    PoweronResult,
    Removed,
    ResumeResult,
    StepResult,
    SwitchProgress,
    SwitchResult,
)
from ..storage.backends.cow import CowBackend
from ..storage.filters.cache import CacheFilter

RING = 20000  # records a viewer keeps (the server's ring is as long)
REASONS = 1000  # failure reasons kept
CONNECT_TIMEOUT = 10.0  # seconds for the first frame


class RemoteGone(UserError):
    """The server went away (or never answered the watch)."""


def _unb64(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text else None


class RemoteTelemetry:
    """What the lab reads of Telemetry, from the newest frames."""

    def __init__(self) -> None:
        self.started = time.time()
        self.ring: deque[RequestRecord] = deque(maxlen=RING)
        self._ring_lock = threading.Lock()  # the reader thread appends while the lab's tick reads
        self.events: deque[tuple[float, str]] = deque(maxlen=500)
        self.connections: dict[int, Any] = {}
        self._reasons: OrderedDict[int, str] = OrderedDict()
        self._snapshot: Snapshot | None = None
        self._heat: list[list[int]] = [[], [], []]
        self.in_flight = 0
        self.status: dict[str, Any] = {}

    # -- fed by the reader thread ------------------------------------------------------------------
    def take_snapshot(self, data: dict[str, Any]) -> None:
        heat = data.get("heat")
        if heat is not None:
            self._heat = heat
        self._snapshot = Snapshot(
            taken=time.monotonic(),
            count=data["count"],
            bytes=data["bytes"],
            errors=data["errors"],
            latency_sum=data["latency_sum"],
            latency=data["latency"],
            heat=self._heat,
            last_seq=data["last_seq"],
            connections=data["connections"],
            cell_bytes=data["cell_bytes"],
            size=data["size"],
        )

    def take_records(self, rows: list[list]) -> None:
        records = [RequestRecord(*row[:10], _unb64(row[10])) for row in rows]
        with self._ring_lock:
            self.ring.extend(records)
            for row in rows:
                if len(row) > 11:
                    self._reasons[row[0]] = row[11]
                    if len(self._reasons) > REASONS:
                        self._reasons.popitem(last=False)

    # -- read by the lab ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        assert snap is not None, "RemoteSession reads a first frame before the lab starts"
        return snap

    def recent(self, after_seq: int = 0, limit: int | None = None) -> list[RequestRecord]:
        out = []
        with self._ring_lock:
            tail = list(islice(reversed(self.ring), limit)) if limit is not None else list(reversed(self.ring))
        for record in tail:  # newest first, like Telemetry.recent: the newest `limit`
            if record.seq <= after_seq or (limit is not None and len(out) >= limit):
                break
            out.append(record)
        out.reverse()
        return out

    def reason(self, seq: int) -> str | None:
        with self._ring_lock:
            return self._reasons.get(seq)

    def in_flight_now(self, held: Any = (), releasing: int = 0) -> dict[int, int]:
        return {0: self.in_flight}

    def activity(self, seconds: float | None = None, **_: Any) -> Activity:
        """The server's last-seconds picture, from its status (about once a second)."""
        status = self.status
        ops: dict[int, OpActivity] = {}
        by_name = {name: cmd for cmd, name in c.CMD_NAMES.items()}
        sizes = status.get("sizes", {})
        sequential = status.get("sequential", {})
        for name in {*status.get("latency", {}), *sizes, *sequential}:
            cmd = by_name.get(name)
            if cmd is None:
                continue
            lat = status.get("latency", {}).get(name, {})
            seq = sequential.get(name, {})
            ops[cmd] = OpActivity(
                requests=lat.get("requests", 0),
                p50=lat.get("p50_ms", 0.0) / 1e3,
                p99=lat.get("p99_ms", 0.0) / 1e3,
                sizes={int(k): v for k, v in sizes.get(name, {}).items()},
                sequential=seq.get("sequential", 0),
                random=seq.get("random", 0),
            )
        window = float(status.get("window", 0.0)) or 1.0
        return Activity(
            seconds=window,
            in_flight=self.in_flight,
            max_in_flight=max(self.in_flight, status.get("max_in_flight", 0)),
            connections=[
                ConnectionActivity(f["conn"], f["peer"], f["in_flight"], f["max_in_flight"])
                for f in status.get("in_flight_by_connection", [])
            ],
            ops=ops,
            requests=sum(op.requests for op in ops.values()),
            latency_sum=0.0,
            looked_at=0,
        )


class RemoteGate:
    def __init__(self) -> None:
        self.paused = False
        self.releasing = 0
        self._held: list[HeldRequest] = []

    def take_held(self, rows: list[list]) -> None:
        now = time.monotonic()
        held = []
        for cmd, flags, offset, length, handle, conn, waited, bp, payload in rows:
            req = Request(flags, cmd, handle, offset, length, _unb64(payload))
            breakpoint = SimpleNamespace(id=bp) if bp is not None else None
            held.append(
                HeldRequest(req, SimpleNamespace(number=conn), 0.0, held_since=now - waited, breakpoint=breakpoint)
            )
        self._held = held

    def held(self) -> list[HeldRequest]:
        return list(self._held)

    def oldest_wait(self) -> float:
        held = self._held
        return time.monotonic() - min(h.held_since for h in held) if held else 0.0


@dataclass
class RemoteLayer:
    """A filter of the server's stack, as its status lists it (no Filter object in a viewer)."""

    id: int
    name: str
    spec: str
    enabled: bool
    filter: object = None


class RemoteCache(CacheFilter):
    """A cache filter of the server's stack, for the filters panel's power cut: whether the
    power is off and how much a cut would lose, from the newest status (about once a second).
    Nothing here serves: it has no overlay, and __init__ does not make one."""

    def __init__(self, stats: dict[str, Any]) -> None:  # no CacheFilter.__init__: nothing to serve
        self._stats = stats

    @property
    def powered_off(self) -> bool:  # type: ignore[override]
        return self._stats.get("power") == "off"

    def dirty_bytes(self) -> int:
        return int(self._stats.get("dirty_bytes", 0))


class RemoteCow(CowBackend):
    """The server's cow backend, for the filters panel's commit and discard questions."""

    def __init__(self, session: RemoteSession) -> None:  # no CowBackend.__init__: nothing to serve
        self._session = session

    def describe(self) -> str:
        return str(self._session.status.get("backend", "cow"))

    def changed_bytes(self) -> int:
        return int(self._session.status.get("cow_changed_bytes") or 0)


class RemoteBase:
    def __init__(self, session: RemoteSession) -> None:
        self._session = session

    def describe(self) -> str:
        return str(self._session.status.get("backend", "?"))

    @property
    def kind(self) -> str:
        return str(self._session.status.get("kind", "?"))

    @property
    def readonly(self) -> bool:
        return False


class RemoteRestacker:
    def __init__(self) -> None:
        self.last_cut: PowerCut | None = None
        self.powered_off = False


class RemoteSteering:
    """Steering's state from the frames; its calls are commands on the control socket."""

    def __init__(self, session: RemoteSession) -> None:
        self._session = session
        self.gate = session.engine.gate
        self.restacker = RemoteRestacker()
        self._base = RemoteBase(session)
        self._cow = RemoteCow(session)
        self.last_stepped: HeldRequest | None = None
        self._last_break: BreakHit | None = None
        self._last_break_json: Any = None

    def _call(self, cmd: str, **args: Any) -> Any:
        return self._session.call(cmd, **args)

    # -- state ----------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self.gate.paused

    def oldest_wait(self) -> float:
        return self.gate.oldest_wait()

    @property
    def breakpoints(self) -> list[BreakpointInfo]:
        return [BreakpointInfo(**bp) for bp in self._session.status.get("breakpoints", [])]

    @property
    def layers(self) -> list[RemoteLayer]:
        return [
            RemoteLayer(
                f["id"], f["name"], f["spec"], f["enabled"], RemoteCache(f["stats"]) if f["name"] == "cache" else None
            )
            for f in self._session.status.get("filters", [])
        ]

    @property
    def base(self) -> RemoteBase | RemoteCow:
        return self._cow if self._session.status.get("kind") == "cow" else self._base

    @property
    def switching(self) -> SwitchProgress | None:
        data = self._session.status.get("switching")
        return SwitchProgress(**data) if data else None

    @property
    def last_break(self) -> BreakHit | None:
        data = self._session.status.get("last_break")
        if data != self._last_break_json:  # a new object only for a new hit: the lab announces each once
            self._last_break_json = data
            self._last_break = BreakHit(**data) if data else None
        return self._last_break

    def switch_would_overwrite(self, kind: str, path: str | None) -> None:
        return None  # the server refuses such a switch with its one line (overwrite=false)

    # -- calls ----------------------------------------------------------------------------
    def pause(self) -> PauseResult:
        result = PauseResult(**self._call("pause"))
        self.gate.paused = True  # the next frame says so too; the header need not wait for it
        return result

    def resume(self) -> ResumeResult:
        result = ResumeResult(**self._call("resume"))
        self.gate.paused = False
        return result

    def step(self, action: str = "release", errno: str | None = None, delay_ms: float | None = None) -> StepResult:
        held = {h.req.handle: h for h in self.gate.held()}
        args: dict[str, Any] = {}
        if action == "fail":
            args["fail"] = errno or "EIO"
        elif action == "delay":
            args["delay"] = delay_ms
        result = StepResult(**self._call("step", **args))
        item = held.get(result.handle)
        cmd = next((k for k, v in c.CMD_NAMES.items() if v == result.op), 0)
        req = Request(0, cmd, result.handle, result.offset, result.length, item.req.payload if item else None)
        self.last_stepped = HeldRequest(
            req, SimpleNamespace(number=result.conn), 0.0, held_since=time.monotonic() - result.waited
        )
        return result

    def list_breakpoints(self) -> list[BreakpointInfo]:
        return [BreakpointInfo(**bp) for bp in self._call("break.list")]

    def add_breakpoint(self, spec: str) -> BreakpointInfo:
        return BreakpointInfo(**self._call("break.add", spec=spec))

    def remove_breakpoint(self, ref: int | str) -> Removed:
        return Removed(**self._call("break.rm", ref=ref))

    def set_breakpoint_enabled(self, ref: int | str, enabled: bool) -> BreakpointInfo:
        return BreakpointInfo(**self._call("break.enable" if enabled else "break.disable", ref=ref))

    def toggle_breakpoint(self, ref: int | str) -> BreakpointInfo:
        return BreakpointInfo(**self._call("break.toggle", ref=ref))

    def list_filters(self) -> list[FilterInfo]:
        return [FilterInfo(**f) for f in self._call("filter.list")]

    def add_filter(self, spec: str, position: int | str | None = None) -> FilterInfo:
        return FilterInfo(**self._call("filter.add", spec=spec, position=position))

    def remove_filter(self, ref: int | str) -> FilterInfo:
        return FilterInfo(**self._call("filter.rm", ref=ref))

    def remove_all_filters(self) -> Removed:
        return Removed(**self._call("filter.rm", ref="all"))

    def set_filter_enabled(self, ref: int | str, enabled: bool) -> FilterInfo:
        return FilterInfo(**self._call("filter.enable" if enabled else "filter.disable", ref=ref))

    def toggle_filter(self, ref: int | str) -> FilterInfo:
        return FilterInfo(**self._call("filter.toggle", ref=ref))

    def switch_backend(
        self, kind: str, path: str | None = None, *, size: Any = None, copy: bool = True, overwrite: bool = False
    ) -> SwitchResult:
        data = dict(self._call("switch", kind=kind, path=path, size=size, copy=copy, overwrite=overwrite))
        return SwitchResult(from_=data.pop("from"), **data)

    def powercut(self) -> PowercutResult:
        return PowercutResult(**self._call("powercut"))

    def poweron(self) -> PoweronResult:
        return PoweronResult(**self._call("poweron"))

    def cow_commit(self) -> CowCommitResult:
        return CowCommitResult(**self._call("cow.commit"))

    def cow_discard(self) -> CowDiscardResult:
        return CowDiscardResult(**self._call("cow.discard"))


class RemoteEngine:
    def __init__(self, session: RemoteSession) -> None:
        self._session = session
        self.telemetry = RemoteTelemetry()
        self.gate = RemoteGate()
        self.backend = RemoteBase(session)

    @property
    def size(self) -> int:
        return int(self._session.status.get("size", 0))

    @property
    def readonly(self) -> bool:
        return False


class RemoteLabeller:
    """The disk's map stays in the server: a viewer labels nothing (yet)."""

    map = None

    def label_of(self, record: RequestRecord) -> None:
        return None


class RemoteSession:
    """The session an attached lab reads: see the module's docstring."""

    transport = "viewer"
    demo_workload = None
    replayer = None
    recording = None

    def __init__(self, path: str, *, hz: float = 12.0, rows: int = 250) -> None:
        self.path = path
        self.stop_requested = threading.Event()  # the server went away: the lab's tick ends the app
        self.gone: str | None = None  # why, in one line
        self.frames = 0
        self.dropped = 0  # frames the server skipped because this viewer was slow
        self.engine = RemoteEngine(self)
        self.steering = RemoteSteering(self)
        self.labeller = RemoteLabeller()
        self._commands = ControlClient(path, timeout=60.0)
        self._commands_lock = threading.Lock()
        self._closing = False
        self._watch = ControlClient(path, timeout=CONNECT_TIMEOUT)
        try:
            self._watch.call("watch", hz=hz, rows=rows)
            self._reader = self._watch._reader
            first = self._reader.readline()
            if not first:
                raise RemoteGone(f"the buselab at {path} closed the connection before its first frame")
            self.apply(json.loads(first))
        except BaseException:
            self._watch.close()
            self._commands.close()
            raise
        self._watch.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read_frames, name="buselab-attach", daemon=True)
        self._thread.start()

    # -- frames --------------------------------------------------------------------------------
    def _read_frames(self) -> None:
        why = "closed the connection"
        try:
            for line in self._reader:
                self.apply(json.loads(line))
        except (OSError, ValueError) as exc:
            why = f"broke the connection ({exc})"
        if not self._closing:
            self.gone = f"the buselab at {self.path} went away ({why}): it stopped, or was stopped"
            self.stop_requested.set()

    def apply(self, frame: dict[str, Any]) -> None:
        """One frame into the state the lab reads (the reader thread; each assignment is whole)."""
        telemetry = self.engine.telemetry
        gate = self.engine.gate
        self.frames += 1
        self.dropped = frame.get("dropped", 0)
        if "started" in frame:
            telemetry.started = frame["started"]
        if "status" in frame:
            telemetry.status = frame["status"]
        if "records" in frame:
            telemetry.take_records(frame["records"])
        if "snapshot" in frame:
            telemetry.take_snapshot(frame["snapshot"])
        gate.take_held(frame.get("held", []))
        gate.paused = frame.get("paused", False)
        gate.releasing = frame.get("releasing", 0)
        telemetry.in_flight = frame.get("in_flight", 0)
        for t, message in frame.get("events", []):
            telemetry.events.append((t, message))
        restacker = self.steering.restacker
        restacker.powered_off = frame.get("powered_off", False)
        cut = frame.get("cut")
        if cut is not None:
            restacker.last_cut = PowerCut(
                cut["time"],
                frozenset(cut["requests"]),
                [tuple(r) for r in cut["ranges"]],  # type: ignore[misc]
            )

    # -- commands ---------------------------------------------------------------------------------
    def call(self, cmd: str, **args: Any) -> Any:
        """One command; a slow one (a switch copying the disk) must not hold up the next key,
        so when the shared connection is busy the command gets a connection of its own."""
        if self._commands_lock.acquire(blocking=False):
            try:
                return self._commands.call(cmd, **args)
            finally:
                self._commands_lock.release()
        with ControlClient(self.path, timeout=600.0) as client:
            return client.call(cmd, **args)

    def stop_server(self) -> None:
        """Ask the server to stop (the lab's confirmed S)."""
        self.call("stop")

    def close(self) -> None:
        self._closing = True
        for client in (self._watch, self._commands):
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    # -- what the header reads ------------------------------------------------------------------------
    @property
    def status(self) -> dict[str, Any]:
        return self.engine.telemetry.status

    @property
    def stopped(self) -> bool:
        return self.gone is not None

    @property
    def where(self) -> str:
        return f"{self.status.get('where', '?')} · attached to {self.path}"

    @property
    def control(self) -> SimpleNamespace:
        return SimpleNamespace(path=self.status.get("control") or self.path, error=None)

    def start_recording(self, path: str, payload: str | None = None) -> Any:
        raise UserError("an attached lab cannot record: start the server with --record FILE")

    def stop_recording(self) -> Any:
        raise UserError("an attached lab cannot record: start the server with --record FILE")
