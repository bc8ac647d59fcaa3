"""`watch` on the control socket: telemetry for an attached lab (`buselab attach`).

A viewer sends one line, `{"cmd": "watch", "hz": 12, "rows": 250}`, and from then
on that connection carries frames, one JSON object per line, at the lab's tick
rate -- never one message per request. A frame holds what the in-process lab's
`LabModel.poll()` reads in one tick: the newest records (at most `rows`, so
more than that in a tick are a gap the stream shows), a snapshot when one was
taken (its heat matrix only when it changed), the held requests, new engine
events, and about once a second (sooner when steering changed) the session's
status. Steering goes over another connection as ordinary commands.

Back-pressure: the socket is written without blocking, and a frame is built
only once the previous one has left in full. A viewer that reads slowly (or
is stopped) therefore costs the server at most one frame plus the kernel's
send buffer; the ticks it missed are counted (`dropped`, in the next frame)
and the requests they would have carried show as a gap in its stream. The
serving threads never see a viewer: this thread only reads telemetry, as the
in-process lab does.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from ..engine.telemetry import events_after
from ..steering.results import to_json
from .protocol import ControlTarget

log = logging.getLogger("buselab")

DEFAULT_HZ = 12.0
MAX_HZ = 30.0
DEFAULT_ROWS = 250
MAX_ROWS = 2000
SEND_BUFFER = 256 * 1024  # bytes the kernel may hold for a viewer that does not read
STATUS_EVERY = 1.0  # seconds between full statuses when nothing steering-related changed
BUSY_ROWS = 200  # records in one frame: the server is busy, snapshots only every BUSY_SNAPSHOT_EVERY
BUSY_SNAPSHOT_EVERY = 0.5
PREVIEWS_WHEN_BUSY = 32  # rows of a busy frame that carry their payload's first KiB (the newest)


def _queued(sock: socket.socket) -> int | None:
    """Bytes written to the socket that its reader has not taken yet (Linux), or None."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return None


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data else None


def encode_record(record: tuple, reason: str | None, *, preview: bool = True) -> list:
    """A RequestRecord as a JSON list: its fields in order, the preview in base64 (or None), and
    why it failed."""
    row = list(record[:10])
    row.append(_b64(record[10]) if preview else None)
    if reason:
        row.append(reason)
    return row


class Watch:
    """One viewer's stream of frames; `run()` returns when the viewer or the server goes."""

    def __init__(
        self,
        sock: socket.socket,
        target: ControlTarget,
        *,
        hz: float = DEFAULT_HZ,
        rows: int = DEFAULT_ROWS,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.sock = sock
        self.target = target
        self.period = 1.0 / min(max(float(hz), 0.5), MAX_HZ)
        self.rows = min(max(int(rows), 1), MAX_ROWS)
        self.stopping = stopping
        steering = target.steering
        self.steering = steering
        self.telemetry = steering.engine.telemetry
        self.gate = steering.engine.gate
        self.since = time.time()
        self.frames = 0
        self.dropped = 0  # ticks whose frame was not built: the viewer had not read the last one
        self.pending = b""  # the unsent tail of the last frame (never more than one frame)
        self.after_seq = 0
        self._heat: list[list[int]] | None = None
        self._snap_key: object = None
        self._last_event: tuple[float, str] | None = None
        self._last_snapshot = 0.0
        self._last_status = 0.0
        self._steer_key: object = None
        self._cut: object = None
        self._held_shown = False

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        sock = self.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        sock.setblocking(False)
        next_tick = time.monotonic()
        try:
            while not self.stopping():
                now = time.monotonic()
                wait = max(0.0, next_tick - now)
                readable, writable, _ = select.select([sock], [sock] if self.pending else [], [], wait)
                if readable and not self._viewer_still_there():
                    return
                if writable and self.pending:
                    self._send()
                now = time.monotonic()
                if now < next_tick:
                    continue
                next_tick += self.period
                if next_tick < now:
                    next_tick = now + self.period  # far behind: no burst of catch-up frames
                if self.pending:
                    self.dropped += 1  # the viewer has not taken the last frame: skip this one
                    continue
                self.pending = self.frame()
                self._send()
        except OSError:
            return  # the viewer went away mid-frame
        except Exception:  # noqa: BLE001 - a bug costs this viewer its stream, never the server
            log.exception("a viewer's telemetry frame failed; its stream ends")

    def info(self) -> dict[str, Any]:
        """What this viewer costs the server: frames built, ticks skipped, bytes held for it."""
        return {
            "since": round(self.since, 3),
            "hz": round(1 / self.period, 3),
            "frames": self.frames,
            "dropped": self.dropped,
            "pending_bytes": len(self.pending),  # at most one frame
            "queued_bytes": _queued(self.sock),  # in the kernel's send buffer (at most SEND_BUFFER x 2)
        }

    def _viewer_still_there(self) -> bool:
        """A viewer sends nothing after `watch`: readable means it closed (or sent noise, ignored)."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return True
        return bool(data)

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[sent:]

    # -- one frame -------------------------------------------------------------------------------
    def frame(self) -> bytes:
        """What one tick of the lab reads, as one JSON line."""
        telemetry = self.telemetry
        gate = self.gate
        steering = self.steering
        now = time.monotonic()
        self.frames += 1
        out: dict[str, Any] = {"frame": self.frames, "dropped": self.dropped, "time": time.time()}
        if self.frames == 1:
            out["started"] = telemetry.started
        records = telemetry.recent(self.after_seq, self.rows)
        busy = len(records) >= BUSY_ROWS
        if records:
            self.after_seq = max(self.after_seq, records[-1].seq)
            # Under load only the newest rows carry their payload's first KiB (the inspector
            # follows the newest): base64 of every row was most of a frame's bytes and of the
            # work on both ends.
            bare = len(records) - PREVIEWS_WHEN_BUSY if busy else 0
            out["records"] = [
                encode_record(r, telemetry.reason(r.seq) if r.error else None, preview=i >= bare)
                for i, r in enumerate(records)
            ]
        if not busy or now - self._last_snapshot >= BUSY_SNAPSHOT_EVERY:
            self._last_snapshot = now
            snap = telemetry.snapshot()
            counted = (snap.count, snap.errors, snap.connections, snap.size, snap.cell_bytes)
            if counted != self._snap_key or snap.heat != self._heat:  # idle: not 13 KiB of the same histograms
                self._snap_key = counted
                out["snapshot"] = self._snapshot(snap)
        held = gate.held() if gate.paused or self._held_shown else []
        self._held_shown = bool(held) or gate.paused
        out["paused"] = steering.paused
        out["held"] = [self._held(h) for h in held]
        out["releasing"] = gate.releasing
        out["in_flight"] = sum(telemetry.in_flight_now([h.replier.number for h in held], gate.releasing).values())
        events = list(telemetry.events)  # one C call: no torn copy
        if events and events[-1] is not self._last_event:
            out["events"] = self._new_events(events)
        restacker = steering.restacker
        out["powered_off"] = restacker.powered_off
        cut = restacker.last_cut
        if cut is not self._cut:
            self._cut = cut
            if cut is not None:
                out["cut"] = {"time": cut.time, "requests": sorted(cut.requests), "ranges": cut.ranges}
        key = (
            steering.paused,
            len(held),
            tuple((bp.id, bp.enabled) for bp in steering.breakpoints),
            tuple((layer.id, layer.enabled) for layer in steering.layers),
            id(steering.switching),
            id(steering.last_break),
            id(steering.last_step),
        )
        if key != self._steer_key or now - self._last_status >= STATUS_EVERY:
            self._steer_key = key
            self._last_status = now
            out["status"] = to_json(self.target.status())
        return json.dumps(out, separators=(",", ":")).encode() + b"\n"

    def _snapshot(self, snap: Any) -> dict[str, Any]:
        out = {
            "count": snap.count,
            "bytes": snap.bytes,
            "errors": snap.errors,
            "latency_sum": snap.latency_sum,
            "latency": snap.latency,
            "last_seq": snap.last_seq,
            "connections": snap.connections,
            "cell_bytes": snap.cell_bytes,
            "size": snap.size,
        }
        if snap.heat != self._heat:
            self._heat = snap.heat
            out["heat"] = snap.heat
        return out

    def _held(self, item: Any) -> list:
        req = item.req
        payload = req.payload
        return [
            req.cmd,
            req.flags,
            req.offset,
            req.length,
            req.handle,
            getattr(item.replier, "number", 0),
            time.monotonic() - item.held_since,
            getattr(item.breakpoint, "id", None),
            _b64(bytes(payload[:1024])) if payload is not None else None,
        ]

    def _new_events(self, events: list[tuple[float, str]]) -> list[tuple[float, str]]:
        new = events_after(events, self._last_event)
        self._last_event = events[-1]
        return new
