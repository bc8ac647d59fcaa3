"""Cheap, lock-free aggregation of every request, read by the UI as snapshots.

The serve loop must never wait for a reader, so each serving thread writes to
its own `Recorder` (plain ints and lists that only that thread touches) and a
reader sums them when it takes a `Snapshot`. The ring of recent requests is a
`deque(maxlen=...)`, whose appends are atomic under the GIL. A reader may see a
recorder mid-update; a count off by one in a 10 Hz display is fine, a lock on
every request is not.

A request's latency is the time it spent in buselab: from when its connection
read it off the socket (one clock reading per receive: the requests read
together share it, so one that waited behind the others in buselab's buffer
shows that wait) to when its reply was ready. What a client waited before that
-- in its own queue, or in the socket while buselab worked on earlier requests
-- no server can see; Little's law (requests in flight / throughput) tells it.
Latency histograms are log-linear (16 buckets per power of two, like HDR
histograms), so a percentile read from them is within 2.2% of the true value.

`activity()` works out, off the serve path, what the last seconds looked like:
requests in flight (now, from each connection's receive buffer and the gate's
held requests; at most, from the recent records' arrival and completion
times), latency percentiles per op, request sizes and the share of sequential
requests.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate, islice, repeat
from operator import add, itemgetter, sub
from typing import NamedTuple

from ..protocol import constants as c

N_CMDS = 9  # the 8 NBD commands, and one slot for commands we do not know
OTHER_CMD = 8
# Latency histograms: bucket i holds [2**((i - _LATENCY_ZERO) / 16), 2**((i + 1 - _LATENCY_ZERO) / 16))
# seconds, from about a nanosecond up (bucket 0) to 2**16 s (18 hours); longer counts in the last.
# A bucket is 4.4% wide, and its geometric middle within 2.2% of anything in it.
LATENCY_PER_OCTAVE = 16
_LATENCY_ZERO = 30 * LATENCY_PER_OCTAVE  # the bucket that starts at 1 s
LATENCY_BUCKETS = 46 * LATENCY_PER_OCTAVE
HEAT_READ, HEAT_WRITE, HEAT_TRIM = 0, 1, 2
_HEAT_KIND = {c.CMD_READ: HEAT_READ, c.CMD_WRITE: HEAT_WRITE, c.CMD_WRITE_ZEROES: HEAT_WRITE, c.CMD_TRIM: HEAT_TRIM}
PREVIEW_BYTES = 1024
REASONS_KEPT = 4096  # why recent requests failed, by seq (the oldest are forgotten)
_LAST_BUCKET = LATENCY_BUCKETS - 1
_SCALE = float(LATENCY_PER_OCTAVE)
_ZERO = float(_LATENCY_ZERO)
_log2 = math.log2
DATA_CMDS = frozenset((c.CMD_READ, c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_CACHE))
ACTIVITY_SECONDS = 10.0  # what `activity()` covers unless told otherwise
LOOK_AT_MOST = 4096  # records one look at the ring takes in (the newest), to bound its cost
SEQUENTIAL_ENDS = 8  # a request is sequential if it starts where one of this many before it ended
CARRY = 1024  # records a look keeps for the next one's in-flight counting
HISTORY_EVERY = 0.5  # seconds between the snapshots kept for activity()'s latency percentiles


class RequestRecord(NamedTuple):
    """One finished request, as the stream and the inspector show it."""

    seq: int
    time: float  # wall clock of arrival (when its connection read it), seconds since the epoch
    cmd: int
    flags: int
    offset: int
    length: int
    latency: float  # seconds from arrival to its reply: time in buselab (held time included)
    error: int  # NBD errno, 0 on success
    conn: int  # connection number
    handle: int
    preview: bytes | None  # first KiB of the data read or written

    @property
    def op(self) -> str:
        return c.CMD_NAMES.get(self.cmd, f"CMD{self.cmd}")


_make_record = RequestRecord._make


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a latency (what `Telemetry.record` computes inline)."""
    if seconds <= 0:
        return 0
    return max(0, min(int(_log2(seconds) * _SCALE + _ZERO), _LAST_BUCKET))


def bucket_bounds(index: int) -> tuple[float, float]:
    """The latencies (seconds) bucket `index` holds: [low, high)."""
    return 2.0 ** ((index - _LATENCY_ZERO) / _SCALE), 2.0 ** ((index + 1 - _LATENCY_ZERO) / _SCALE)


def bucket_seconds(index: int) -> float:
    """The value a bucket stands for: its geometric middle, within 2.2% of all it holds."""
    return 2.0 ** ((index + 0.5 - _LATENCY_ZERO) / _SCALE)


def percentile(hist: list[int], q: float) -> float:
    """Quantile q (0..1) of a latency histogram, in seconds: nearest rank, then the middle of
    its bucket (within 2.2% of the request's own latency); 0.0 for an empty histogram."""
    cumulative = list(accumulate(hist))
    total = cumulative[-1] if cumulative else 0
    if not total:
        return 0.0
    rank = max(1, math.ceil(q * total - 1e-9))
    return bucket_seconds(bisect_left(cumulative, rank))


def histogram_between(after: list[list[int]], before: list[list[int]], cmds: Iterable[int] | None = None) -> list[int]:
    """One latency histogram of what happened between two snapshots, over `cmds` (all by default)."""
    window = [0] * LATENCY_BUCKETS
    for cmd in range(len(after)) if cmds is None else cmds:
        a, b = after[cmd], before[cmd]
        if a != b:
            window = list(map(add, window, map(sub, a, b)))
    return window


def events_after(events: list[tuple[float, str]], last: tuple[float, str] | None) -> list[tuple[float, str]]:
    """The events that came after `last` (the newest one a reader saw; None: all of them).

    Events are compared by identity: two events with the same time and text are still two.
    If `last` left the bounded list already, all of it is new to the reader.
    """
    if last is not None:
        for i in range(len(events) - 1, -1, -1):
            if events[i] is last:
                return events[i + 1 :]
    return events


def max_overlap(starts: list[float], ends: list[float], at: Iterable[float] | None = None) -> int:
    """The most intervals [start, end) that overlap at one instant (requests in flight at once),
    looking at the instants `at` (every start by default).

    In flight rises only when a request arrives, so the most is at some arrival: there it is
    the arrivals so far minus the completions so far. Requests read together share their
    arrival time, so there are few distinct instants; the counting runs in C (bisect, map).
    """
    if not starts:
        return 0
    instants = sorted(set(starts if at is None else at))
    arrived = map(bisect_right, repeat(sorted(starts)), instants)
    finished = map(bisect_right, repeat(sorted(ends)), instants)
    return max(map(sub, arrived, finished), default=0)


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
    # Requests the connection has read and not answered (called off the serve path; see watch()).
    waiting: Callable[[], int] | None = field(default=None, repr=False)


@dataclass
class OpActivity:
    """One op over the last seconds."""

    requests: int  # completed in the window (every one: from the counters)
    p50: float  # seconds, from the latency histograms (within 2.2%)
    p99: float
    sizes: dict[int, int]  # size bucket (power of two at or above the length) -> requests looked at
    sequential: int  # requests looked at that started where one before them ended (same connection and op)
    random: int  # ... and those that did not (a connection's first request of an op counts as neither)

    @property
    def sequential_share(self) -> float | None:
        classified = self.sequential + self.random
        return self.sequential / classified if classified else None


@dataclass
class ConnectionActivity:
    conn: int
    peer: str
    in_flight: int  # now: read and not answered, held by the gate included
    max_in_flight: int  # the most at once over the window


@dataclass
class Activity:
    """What the last `seconds` looked like (see Telemetry.activity)."""

    seconds: float  # how long the window is (shorter just after the start)
    in_flight: int  # requests read and not answered now, every connection, held ones included
    max_in_flight: int  # the most at once over the window
    connections: list[ConnectionActivity]
    ops: dict[int, OpActivity]  # by command number
    requests: int  # completed in the window
    latency_sum: float  # seconds, of the requests completed in the window
    looked_at: int  # requests whose size and pattern were looked at (at most LOOK_AT_MOST per look)

    @property
    def throughput(self) -> float:
        """Requests per second over the window."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_in_flight(self) -> float:
        """Little's L: requests in buselab on average (latency-seconds per second)."""
        return self.latency_sum / self.seconds if self.seconds > 0 else 0.0

    def client_wait(self, outstanding: int) -> float:
        """Little's law: what a client keeping `outstanding` requests outstanding waits per request
        at this throughput (seconds; 0.0 when nothing completed)."""
        rate = self.throughput
        return outstanding / rate if rate > 0 else 0.0


@dataclass
class _Look:
    """What one look at the ring found: the requests recorded since the look before."""

    taken: float  # in record time (perf_counter + clock_offset)
    max_in_flight: int
    by_conn: dict[int, int]  # the most in flight per connection
    sizes: dict[int, dict[int, int]]  # cmd -> size bucket -> requests
    sequential: dict[int, list[int]]  # cmd -> [sequential, random]
    looked_at: int


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
        # activity(): looks at the ring (records after _looked_seq), snapshots for latency windows.
        self._activity_lock = threading.Lock()
        self._looks: deque[_Look] = deque(maxlen=1024)
        self._looked_seq = 0
        self._ends: dict[int, list[int]] = {}  # conn * 16 + cmd -> where its last requests ended
        # The newest CARRY records looked at: (arrivals, completions, connections).
        self._carry: tuple[list[float], list[float], list[int]] = ([], [], [])
        self._history: deque[Snapshot] = deque(maxlen=64)  # snapshots at least HISTORY_EVERY apart
        self.resize(size, cells)
        self._history.append(self._empty_snapshot())

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
                if rec.count[i]:
                    retired.latency[i] = list(map(add, retired.latency[i], rec.latency[i]))
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
        try:
            # latency_bucket() inline: cheaper than the old power-of-two buckets' min(bit_length()).
            rec.latency[slot][int(_log2(latency) * _SCALE + _ZERO)] += 1
        except (ValueError, IndexError):  # zero or negative (the clocks of a test), or held for 18 hours
            rec.latency[slot][latency_bucket(latency)] += 1
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

    def watch(self, number: int, waiting: Callable[[], int]) -> None:
        """How to count connection `number`'s requests read and not answered (not those the gate
        holds): `activity()` calls it off the serve path, from any thread."""
        info = self.connections.get(number)
        if info is not None:
            info.waiting = waiting

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
                    latency[i] = list(map(add, latency[i], rec.latency[i]))
            if len(rec.heat[0]) == self.cells:
                for k in range(3):
                    heat[k] = list(map(add, heat[k], rec.heat[k]))
        snap = Snapshot(
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
        history = self._history
        if not history or snap.taken - history[-1].taken >= HISTORY_EVERY:
            history.append(snap)
        return snap

    def _empty_snapshot(self) -> Snapshot:
        return Snapshot(
            taken=time.monotonic(),
            count=[0] * N_CMDS,
            bytes=[0] * N_CMDS,
            errors=[0] * N_CMDS,
            latency_sum=[0.0] * N_CMDS,
            latency=[[0] * LATENCY_BUCKETS for _ in range(N_CMDS)],
            heat=[[], [], []],
            last_seq=0,
            connections=0,
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

    # -- the last seconds: in flight, latency, sizes, patterns ---------------------------------
    def clock(self) -> float:
        """Now, in the time of the records (perf_counter plus clock_offset: about the wall clock)."""
        return time.perf_counter() + self.clock_offset

    def in_flight_now(self, held: Iterable[int] = (), releasing: int = 0) -> dict[int, int]:
        """Requests read and not answered, by connection number, now.

        `held` is the connection number of each request the gate holds, `releasing` how many it
        has released and not answered yet (counted under connection 0). A connection's count is
        what its receive buffer holds and the request in its hands (Connection.requests_waiting).
        """
        counts: dict[int, int] = {}
        for info in list(self.connections.values()):
            waiting = info.waiting
            n = 0
            if waiting is not None:
                try:
                    n = waiting()
                except Exception:  # noqa: BLE001 - a display number; never break the reader
                    n = 0
            counts[info.number] = n
        for conn in held:
            counts[conn] = counts.get(conn, 0) + 1
        if releasing:
            counts[0] = counts.get(0, 0) + releasing
        return counts

    def _look(self, now: float, horizon: float, live: dict[int, int]) -> None:
        """Take in the records completed since the last look (the newest LOOK_AT_MOST of them,
        none older than `horizon` seconds) as one _Look. Called with _activity_lock held.

        In flight at the arrival of each new record counts the records of earlier looks that
        were still running then (the newest CARRY of them are kept for that): 32 requests read
        together and answered over two looks were 32 in flight at once, not 9 and 23.
        """
        ring = self.ring
        after = self._looked_seq
        tail: list[tuple] = []
        if ring and ring[-1][0] > after:
            try:
                # One C-level call: no serving thread appends in the middle of it.
                tail = list(islice(reversed(ring), LOOK_AT_MOST))
            except RuntimeError:  # mutated anyway (a finalizer ran during the copy)
                tail = list(ring)[-LOOK_AT_MOST:][::-1]
            for i, record in enumerate(tail):
                if record[0] <= after:
                    del tail[i:]
                    break
            tail.reverse()
        oldest = now - horizon
        if tail:
            self._looked_seq = max(after, tail[-1][0])
            if tail[0][0] > after + 1:
                # Requests went by unseen (more than a look takes in): a connection's next one
                # cannot be compared with the one before it.
                self._ends.clear()
            if tail[0][1] + tail[0][6] < oldest:
                tail = [r for r in tail if r[1] + r[6] >= oldest]
        total = sum(live.values())
        by_conn = dict(live)
        sizes: dict[int, dict[int, int]] = {}
        sequential: dict[int, list[int]] = {}
        if tail:
            carry = self._carry
            starts = list(map(itemgetter(1), tail))
            ends = list(map(add, starts, map(itemgetter(6), tail)))
            conns = list(map(itemgetter(8), tail))
            all_starts, all_ends, all_conns = carry[0] + starts, carry[1] + ends, carry[2] + conns
            swept = max_overlap(all_starts, all_ends, starts)
            total = max(total, swept)
            # Per connection: one pass per connection, in C (list comprehensions over zips).
            present = set(all_conns)
            if len(present) == 1:
                (conn,) = present
                by_conn[conn] = max(swept, by_conn.get(conn, 0))
                present = set()
            for conn in present & set(conns):
                mine = [i for i, n in enumerate(all_conns) if n == conn]
                conn_starts = [all_starts[i] for i in mine]
                conn_ends = [all_ends[i] for i in mine]
                new_starts = [start for start, n in zip(starts, conns) if n == conn]
                most = max_overlap(conn_starts, conn_ends, new_starts)
                if most > by_conn.get(conn, 0):
                    by_conn[conn] = most
            cmds = list(map(itemgetter(2), tail))
            offsets = list(map(itemgetter(4), tail))
            lengths = list(map(itemgetter(5), tail))
            errors = list(map(itemgetter(7), tail))
            # Sizes: count (op, length) pairs in C, then bucket the few distinct ones.
            for (cmd, length, error), n in Counter(zip(cmds, lengths, errors)).items():
                if error or cmd not in DATA_CMDS:
                    continue
                hist = sizes.get(cmd)
                if hist is None:
                    hist = sizes[cmd] = {}
                bucket = 0 if length <= 0 else 1 << (length - 1).bit_length()
                hist[bucket] = hist.get(bucket, 0) + n
            # Sequential: in order, per connection and op (key conn * 16 + cmd).
            last_ends = self._ends
            for cmd, offset, length, error, conn in zip(cmds, offsets, lengths, errors, conns):
                if error or cmd not in DATA_CMDS:
                    continue
                key = conn * 16 + cmd
                previous = last_ends.get(key)
                if previous is None:
                    last_ends[key] = [offset + length]
                    continue
                counts = sequential.get(cmd)
                if counts is None:
                    counts = sequential[cmd] = [0, 0]
                if offset == previous[-1] or offset in previous:
                    counts[0] += 1
                else:
                    counts[1] += 1
                previous.append(offset + length)
                if len(previous) > SEQUENTIAL_ENDS:
                    del previous[0]
            keep = slice(-CARRY, None)
            self._carry = (all_starts[keep], all_ends[keep], all_conns[keep])
            if len(last_ends) > 256:  # connections come and go: forget the closed ones'
                open_conns = self.connections
                for key in [k for k in last_ends if k // 16 not in open_conns]:
                    del last_ends[key]
        looks = self._looks
        looks.append(_Look(now, total, by_conn, sizes, sequential, len(tail)))
        while looks and looks[0].taken < now - 60.0:
            looks.popleft()

    def activity(
        self,
        seconds: float = ACTIVITY_SECONDS,
        *,
        now: float | None = None,
        snap: Snapshot | None = None,
        held: Iterable[int] = (),
        releasing: int = 0,
    ) -> Activity:
        """The last `seconds`: in flight now and at most, per connection too; latency p50 and p99,
        request sizes and the sequential share, per op.

        Off the serve path, bounded work: the records completed since the last call (the newest
        LOOK_AT_MOST of them) are looked at once, whoever asks (the lab every second, `buselab ctl
        status`, headless). In flight at most is the most requests whose arrival and completion
        times overlap, among the records each look took in, and the counts seen at each look;
        latency percentiles come from the snapshots' histograms (every request; the window starts
        at the newest snapshot kept at least `seconds` ago, or at the start). `held` and
        `releasing` are the gate's (see in_flight_now); `now` is in record time (see clock()).
        """
        if now is None:
            now = self.clock()
        if snap is None:
            snap = self.snapshot()
        live = self.in_flight_now(held, releasing)
        with self._activity_lock:
            self._look(now, max(seconds, ACTIVITY_SECONDS), live)
            looks = [look for look in self._looks if look.taken > now - seconds]
        # Latency: counters since the newest kept snapshot at least `seconds` old.
        base = None
        for old in reversed(self._history):
            if snap.taken - old.taken >= seconds - HISTORY_EVERY / 2:
                base = old
                break
        if base is None:
            base = self._history[0]
        span = max(snap.taken - base.taken, 1e-9)
        ops: dict[int, OpActivity] = {}
        for cmd in range(N_CMDS):
            n = snap.count[cmd] - base.count[cmd]
            if n <= 0:
                continue
            hist = histogram_between(snap.latency, base.latency, (cmd,))
            ops[cmd] = OpActivity(n, percentile(hist, 0.5), percentile(hist, 0.99), {}, 0, 0)
        most = sum(live.values())
        by_conn: dict[int, int] = {}
        looked_at = 0
        for look in looks:
            most = max(most, look.max_in_flight)
            looked_at += look.looked_at
            for conn, n in look.by_conn.items():
                if n > by_conn.get(conn, 0):
                    by_conn[conn] = n
            for cmd, hist in look.sizes.items():
                op = ops.get(cmd)
                if op is None:
                    op = ops[cmd] = OpActivity(0, 0.0, 0.0, {}, 0, 0)
                for bucket, n in hist.items():
                    op.sizes[bucket] = op.sizes.get(bucket, 0) + n
            for cmd, (seq, rnd) in look.sequential.items():
                op = ops.get(cmd)
                if op is None:
                    op = ops[cmd] = OpActivity(0, 0.0, 0.0, {}, 0, 0)
                op.sequential += seq
                op.random += rnd
        for op in ops.values():
            op.sizes = dict(sorted(op.sizes.items()))
        connections = [
            ConnectionActivity(
                info.number,
                info.peer,
                live.get(info.number, 0),
                max(by_conn.get(info.number, 0), live.get(info.number, 0)),
            )
            for info in sorted(list(self.connections.values()), key=lambda i: i.number)
        ]
        return Activity(
            seconds=span,
            in_flight=sum(live.values()),
            max_in_flight=most,
            connections=connections,
            ops=dict(sorted(ops.items())),
            requests=snap.total_requests - base.total_requests,
            latency_sum=max(0.0, sum(snap.latency_sum) - sum(base.latency_sum)),
            looked_at=looked_at,
        )
