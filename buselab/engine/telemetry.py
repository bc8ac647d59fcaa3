"""Cheap, lock-free aggregation of every request, read by the UI as snapshots.

The serve loop must never wait for a reader, so each serving thread writes to
its own `Recorder` (plain ints and lists that only that thread touches) and a
reader sums them when it takes a `Snapshot`. The ring of recent requests is a
`deque(maxlen=...)`, whose appends are atomic under the GIL. A reader may see a
recorder mid-update; a count off by one in a 10 Hz display is fine, a lock on
every request is not.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

from ..protocol import constants as c

N_CMDS = 9  # the 8 NBD commands, and one slot for commands we do not know
OTHER_CMD = 8
LATENCY_BUCKETS = 40  # bucket i holds latencies in [2**(i-1), 2**i) microseconds
HEAT_READ, HEAT_WRITE, HEAT_TRIM = 0, 1, 2
_HEAT_KIND = {c.CMD_READ: HEAT_READ, c.CMD_WRITE: HEAT_WRITE, c.CMD_WRITE_ZEROES: HEAT_WRITE, c.CMD_TRIM: HEAT_TRIM}
PREVIEW_BYTES = 1024
REASONS_KEPT = 4096  # why recent requests failed, by seq (the oldest are forgotten)
_LAST_BUCKET = LATENCY_BUCKETS - 1


class RequestRecord(NamedTuple):
    """One finished request, as the stream and the inspector show it."""

    seq: int
    time: float  # wall clock of arrival, seconds since the epoch
    cmd: int
    flags: int
    offset: int
    length: int
    latency: float  # seconds from arrival to completion (held time included)
    error: int  # NBD errno, 0 on success
    conn: int  # connection number
    handle: int
    preview: bytes | None  # first KiB of the data read or written

    @property
    def op(self) -> str:
        return c.CMD_NAMES.get(self.cmd, f"CMD{self.cmd}")


_make_record = RequestRecord._make


def latency_bucket(seconds: float) -> int:
    return min(int(seconds * 1e6).bit_length(), LATENCY_BUCKETS - 1)


def bucket_upper_seconds(index: int) -> float:
    return (1 << index) / 1e6


def percentile(hist: list[int], q: float) -> float:
    """Upper edge (seconds) of the histogram bucket holding quantile q."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return bucket_upper_seconds(i)
    return bucket_upper_seconds(len(hist) - 1)


class Recorder:
    """Counters owned by one serving thread."""

    __slots__ = ("count", "bytes", "errors", "latency", "heat", "latency_sum", "thread")

    def __init__(self, cells: int) -> None:
        self.thread = threading.current_thread()
        self.count = [0] * N_CMDS
        self.bytes = [0] * N_CMDS
        self.errors = [0] * N_CMDS
        self.latency_sum = [0.0] * N_CMDS
        self.latency = [[0] * LATENCY_BUCKETS for _ in range(N_CMDS)]
        self.heat = [[0] * cells for _ in range(3)]


@dataclass
class Snapshot:
    """Totals since the start; a UI diffs two snapshots to get rates."""

    taken: float  # time.monotonic()
    count: list[int]
    bytes: list[int]
    errors: list[int]
    latency_sum: list[float]
    latency: list[list[int]]  # per cmd histogram
    heat: list[list[int]]  # [read, write, trim] touches per cell
    last_seq: int
    connections: int
    cell_bytes: int
    size: int

    @property
    def total_requests(self) -> int:
        return sum(self.count)


@dataclass
class ConnectionInfo:
    number: int
    peer: str
    since: float = field(default_factory=time.time)


# A tap gets the record as a plain tuple in RequestRecord's field order, and
# the payload (valid only during the call).
Tap = Callable[[tuple, "bytes | bytearray | memoryview | None"], None]


class Telemetry:
    def __init__(self, size: int, *, cells: int = 4096, ring: int = 20000) -> None:
        self.started = time.time()
        # Added to perf_counter() arrival times to make wall-clock times; tests
        # that need fixed timestamps may set it.
        self.clock_offset = time.time() - time.perf_counter()
        self.ring: deque[RequestRecord] = deque(maxlen=ring)
        self._seq = itertools.count(1)
        # A request's number, for a caller that replies before it records the request (not
        # while a trace is recorded, see Connection): taken before the reply leaves, so a
        # request a client sends once it has that reply always gets a bigger number, and the
        # lab's stream shows a write before the read of what it wrote.
        self.next_seq = self._seq.__next__
        self._last_seq = 0
        self._local = threading.local()
        self._recorders: list[Recorder] = []
        self._lock = threading.Lock()  # only for registering recorders/connections
        self.connections: dict[int, ConnectionInfo] = {}
        self._conn_numbers = itertools.count(1)
        self.events: deque[tuple[float, str]] = deque(maxlen=500)
        self.taps: list[Tap] = []  # called on the serving thread: keep them cheap
        # Why recent requests failed (seq -> one line), for the lab's inspector. Filled
        # from `failed` by `record`, on the failure path only; see reason().
        self._reasons: dict[int, str] = {}
        self._reasons_lock = threading.Lock()
        # Waits until replies already sent are counted here too (the engine sets it: a lone
        # request's reply goes out before its record is made; see Connection._transmission).
        self.settle: Callable[[], None] = lambda: None
        self.resize(size, cells)

    def resize(self, size: int, cells: int | None = None) -> None:
        """(Re)shape the heatmap for a device of `size` bytes."""
        cells = cells or getattr(self, "cells", 4096)
        cell = max(4096, -(-size // cells))
        cell = -(-cell // 4096) * 4096  # whole 4 KiB blocks per cell
        self.size = size
        self.cell_bytes = cell
        self.cells = -(-size // cell)
        with self._lock:
            for rec in self._recorders:
                rec.heat = [[0] * self.cells for _ in range(3)]
            self._retired = Recorder(self.cells)

    # -- the serve path ----------------------------------------------------
    def _retire_finished(self) -> None:
        """Fold the counters of threads that ended into one, so snapshots stay cheap."""
        retired = self._retired
        keep = []
        for rec in self._recorders:
            if rec.thread.is_alive():
                keep.append(rec)
                continue
            for i in range(N_CMDS):
                retired.count[i] += rec.count[i]
                retired.bytes[i] += rec.bytes[i]
                retired.errors[i] += rec.errors[i]
                retired.latency_sum[i] += rec.latency_sum[i]
                retired.latency[i] = [a + b for a, b in zip(retired.latency[i], rec.latency[i])]
            if len(rec.heat[0]) == len(retired.heat[0]):
                for k in range(3):
                    retired.heat[k] = [a + b for a, b in zip(retired.heat[k], rec.heat[k])]
        self._recorders = keep

    def recorder(self) -> Recorder:
        rec = getattr(self._local, "rec", None)
        if rec is None or len(rec.heat[0]) != self.cells:
            rec = Recorder(self.cells)
            self._local.rec = rec
            with self._lock:
                self._recorders.append(rec)
        return rec

    def now(self) -> float:
        return time.perf_counter()

    def record(
        self,
        rec: Recorder,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        start: float,
        end: float,
        error: int,
        conn: int,
        handle: int,
        payload: bytes | bytearray | memoryview | None,
        seq: int = 0,
    ) -> tuple:
        """Count one finished request; `seq` if the caller took it (next_seq) before replying."""
        latency = end - start
        if not seq:
            seq = next(self._seq)
        slot = cmd if cmd < OTHER_CMD else OTHER_CMD
        # A plain tuple: cheapest to build on the serving thread, and the
        # garbage collector stops tracking tuples of atoms (it keeps tracking
        # namedtuples), so a full ring costs collections nothing. Readers get
        # RequestRecords from recent().
        record = (
            seq,
            start + self.clock_offset,
            cmd,
            flags,
            offset,
            length,
            latency,
            error,
            conn,
            handle,
            bytes(payload[:PREVIEW_BYTES]) if payload is not None else None,
        )
        self.ring.append(record)
        if seq > self._last_seq:
            self._last_seq = seq
        rec.count[slot] += 1
        rec.latency_sum[slot] += latency
        rec.latency[slot][min(int(latency * 1e6).bit_length(), _LAST_BUCKET)] += 1
        if error:
            rec.errors[slot] += 1
            failure = getattr(self._local, "failure", None)
            if failure is not None:
                self._local.failure = None
                if failure[0] == handle and failure[1] == offset and failure[2] == cmd:
                    self._keep_reason(seq, failure[3])
        else:
            rec.bytes[slot] += length
            kind = _HEAT_KIND.get(cmd)
            if kind is not None and length:
                row = rec.heat[kind]
                cell = self.cell_bytes
                first = offset // cell
                last = (offset + length - 1) // cell
                if first == last:
                    row[first] += 1
                else:
                    for i in range(first, min(last, len(row) - 1) + 1):
                        row[i] += 1
        if self.taps:
            for tap in self.taps:
                tap(record, payload)
        return record

    def failed(self, handle: int, offset: int, cmd: int, reason: str) -> None:
        """Why the request this thread is serving failed: `record` keeps it under the request's seq.

        Called by the engine when a backend fails a request, on the thread that
        will record it (a connection's, or the gate's for a released request);
        a request that does not match (refused before the backend) drops it.
        """
        self._local.failure = (handle, offset, cmd, reason)

    def _keep_reason(self, seq: int, reason: str) -> None:
        with self._reasons_lock:
            reasons = self._reasons
            reasons[seq] = reason
            if len(reasons) > REASONS_KEPT:
                del reasons[next(iter(reasons))]

    def reason(self, seq: int) -> str | None:
        """Why request `seq` failed, as the backend said it; None if unknown or forgotten."""
        return self._reasons.get(seq)

    # -- connections and events -------------------------------------------
    def connection_opened(self, peer: str) -> int:
        number = next(self._conn_numbers)
        self.connections[number] = ConnectionInfo(number, peer)
        self.event(f"connection {number} from {peer}")
        return number

    def connection_closed(self, number: int, reason: str = "") -> None:
        info = self.connections.pop(number, None)
        if info is not None:
            self.event(f"connection {number} closed" + (f": {reason}" if reason else ""))

    def event(self, message: str) -> None:
        self.events.append((time.time(), message))

    # -- readers -------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        self.settle()
        with self._lock:
            self._retire_finished()
            recorders = [*self._recorders, self._retired]
        count = [0] * N_CMDS
        nbytes = [0] * N_CMDS
        errors = [0] * N_CMDS
        latency_sum = [0.0] * N_CMDS
        latency = [[0] * LATENCY_BUCKETS for _ in range(N_CMDS)]
        heat = [[0] * self.cells for _ in range(3)]
        for rec in recorders:
            for i in range(N_CMDS):
                count[i] += rec.count[i]
                nbytes[i] += rec.bytes[i]
                errors[i] += rec.errors[i]
                latency_sum[i] += rec.latency_sum[i]
                if rec.count[i]:
                    latency[i] = [a + b for a, b in zip(latency[i], rec.latency[i])]
            if len(rec.heat[0]) == self.cells:
                for k in range(3):
                    heat[k] = [a + b for a, b in zip(heat[k], rec.heat[k])]
        return Snapshot(
            taken=time.monotonic(),
            count=count,
            bytes=nbytes,
            errors=errors,
            latency_sum=latency_sum,
            latency=latency,
            heat=heat,
            last_seq=self._last_seq,
            connections=len(self.connections),
            cell_bytes=self.cell_bytes,
            size=self.size,
        )

    def recent(self, after_seq: int = 0, limit: int | None = None) -> list[RequestRecord]:
        """Records with seq > after_seq still in the ring, oldest first, at most `limit`.

        Only the tail of the ring is touched, so a reader polling at 10-20 Hz
        pays for what is new, not for the whole ring.
        """
        self.settle()
        ring = self.ring
        if not ring or ring[-1][0] <= after_seq:
            return []
        count = len(ring) if limit is None else limit
        try:
            # One C-level call: no serving thread appends in the middle of it.
            tail = list(islice(reversed(ring), count))
        except RuntimeError:  # mutated anyway (a finalizer ran during the copy)
            tail = list(ring)[-count:][::-1]
        # The ring is in completion order, nearly seq order: stop at the first
        # record already seen.
        for i, record in enumerate(tail):
            if record[0] <= after_seq:
                del tail[i:]
                break
        tail.reverse()
        return [_make_record(record) for record in tail]
