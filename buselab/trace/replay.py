"""Playing a trace against a backend and comparing what comes back.

Requests run one at a time, in the trace's order, through a real Engine: the
gate (pause, step in the lab), filters and telemetry all apply, so a replay
looks in the lab like any client, and can itself be recorded. Every READ's
data is hashed and compared with the hash in the trace; every request's
result (OK or an NBD errno) is compared too. The first difference is kept in
full (request number, range, expected vs got) and all are counted.

Writes need their payloads: a trace recorded with payload "none" is refused
unless `synthetic_writes` is set, which fills each write with a pattern made
from its offset (so the load is the same) and stops comparing reads (their
data can no longer be the recorded data).

Never writes outside the device: a trace for a bigger device than the backend
is refused before the first request, and every request is checked against
the backend's size (`check_request`, as for a network client) before it runs.

    engine = Engine(open_replay_backend("ram", trace_size))
    summary = Replayer(engine, "run.jsonl.zst", speed=None).run()
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..protocol import constants as c
from ..protocol.transmission import Request, check_request
from ..sizes import human_bytes, parse_size
from ..storage.base import Backend
from ..storage.registry import open_backend
from .format import TraceReader, TraceRecord, hasher, open_trace

BACKEND_SPECS = "ram[:SIZE], file:PATH, null[:SIZE] or plugin:FILE[:CLASS]"


# -- backend specs --------------------------------------------------------------------


def open_replay_backend(spec: str, trace_size: int) -> Backend:
    """A backend from a replay spec; sizes default to the trace's device size.

    ram            a fresh sparse RAM disk as big as the traced device
    ram:SIZE       ... of SIZE (512K, 64M, 1G)
    file:PATH      a file or block device; a missing or empty file is made as big as the trace's device
    null[:SIZE]    reads zeros, forgets writes (load only: reads will differ)
    plugin:FILE[:CLASS]   your own disk class (given the trace's size if it takes `size`)
    """
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("ram", "null"):
        size = parse_size(rest) if rest else trace_size
        return open_backend(kind, size=size)
    if kind in ("file", "lo"):
        if not rest:
            raise UserError(f"backend {spec!r} needs a path: file:PATH")
        size = None
        try:
            if not os.path.exists(rest) or (os.path.isfile(rest) and os.path.getsize(rest) == 0):
                size = trace_size
        except OSError:
            pass
        return open_backend("file", path=rest, size=size)
    if kind == "plugin":
        if not rest:
            raise UserError(f"backend {spec!r} needs a file: plugin:FILE[:CLASS]")
        return open_backend("plugin", path=rest, size=trace_size)
    raise UserError(f"unknown backend {spec!r}: use {BACKEND_SPECS}")


def check_trace(path: str, *, partial: bool = False) -> tuple[Counter, dict | None, bool]:
    """Read a whole trace, raising UserError at its first fault: (records per op, end line, cut short)."""
    counts: Counter = Counter()
    with open_trace(path, partial=partial) as reader:
        for r in reader:
            counts[r.op] += 1
            if r.cmd == c.CMD_WRITE and r.data is None and not r.error and reader.header.payload != "none":
                raise UserError(
                    f"trace {path} is corrupt: line {r.line} is a WRITE without its payload;"
                    " pass --synthetic-writes to replay it with a pattern"
                )
        return counts, reader.trailer, reader.truncated


def device_checksum(backend: Backend, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 of the whole device, read through the backend (hex)."""
    h = hashlib.blake2b(digest_size=16)
    for offset in range(0, backend.size, chunk):
        h.update(backend.read(offset, min(chunk, backend.size - offset)))
    return h.hexdigest()


# -- results ------------------------------------------------------------------------------


def _result_name(error: int) -> str:
    return "OK" if not error else c.ERRNO_NAMES.get(error, f"errno {error}")


@dataclass
class Divergence:
    """The replay got something other than what the trace recorded."""

    index: int  # request number in the trace, from 1
    line: int  # line in the trace file
    seq: int  # the request's seq when it was recorded
    op: str
    offset: int
    length: int
    kind: str  # "data" (a read's bytes) or "result" (OK vs an errno)
    expected: str
    got: str
    hash: str = ""  # the hash expected and got are in, for "data"

    def describe(self) -> str:
        what = "read data differs" if self.kind == "data" else "result differs"
        unit = f"{self.hash} " if self.kind == "data" else ""
        return (
            f"request {self.index} (line {self.line}, seq {self.seq}): {self.op} offset {self.offset}"
            f" length {self.length} (bytes {self.offset}..{self.offset + self.length - 1}):"
            f" {what}: expected {unit}{self.expected}, got {unit}{self.got}"
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ReplaySummary:
    trace: str
    backend: str
    total: int | None  # requests in the trace
    requests: int = 0  # taken from the trace so far
    executed: int = 0  # run on the backend
    refused: int = 0  # refused before the backend (out of range, not supported), as a client would be
    skipped: int = 0  # not replayable (failed when recorded and has no payload)
    reads_compared: int = 0
    reads_matched: int = 0
    divergences: int = 0
    first: Divergence | None = None
    adapted: Counter = field(default_factory=Counter)  # what was changed to fit the backend, and how often
    bytes_read: int = 0
    bytes_written: int = 0
    elapsed: float = 0.0
    recorded_duration: float = 0.0  # from the first to the last request of the trace
    verify_reads: bool = True
    stopped: bool = False  # stop() or stop_on_divergence ended it early
    truncated: bool = False  # the trace had no end line (--partial)
    checksum: str | None = None  # of the whole device after the replay, when asked for
    first_seq: int = 0  # the first record's: above 1, recording began after other requests

    @property
    def ok(self) -> bool:
        return self.divergences == 0

    def lines(self) -> list[str]:
        out = [
            f"replayed {self.requests:,} requests in {self.elapsed:.2f} s"
            f" (recorded over {self.recorded_duration:.2f} s) on {self.backend}:"
            f" {self.executed:,} executed, {self.refused:,} refused, {self.skipped:,} skipped;"
            f" read {human_bytes(self.bytes_read)}, wrote {human_bytes(self.bytes_written)}"
        ]
        if self.verify_reads:
            out.append(
                f"reads compared: {self.reads_compared:,}, matched: {self.reads_matched:,};"
                f" divergences: {self.divergences:,}"
            )
        else:
            out.append(f"reads not compared (synthetic writes); result divergences: {self.divergences:,}")
        if self.adapted:
            out.append("adapted to the backend: " + ", ".join(f"{why} x{n:,}" for why, n in self.adapted.items()))
        if self.truncated:
            out.append("the trace was cut short (no end line): replayed what it holds")
        if self.stopped:
            out.append("stopped before the end of the trace")
        if self.checksum is not None:
            out.append(f"device checksum (blake2b-128): {self.checksum}")
        if self.first is not None:
            out.append("first divergence: " + self.first.describe())
            if self.first_seq > 1 and self.verify_reads:
                # The lab's `r` records from the middle of a run: the disk held data already.
                out.append(
                    f"note: the recording began after {self.first_seq - 1:,} earlier"
                    f" request{'s' if self.first_seq > 2 else ''}; what they wrote"
                    " is not in the trace, so reads of it differ on a fresh disk (record from the start,"
                    " or replay on a copy of the disk as it was)"
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "backend": self.backend,
            "total": self.total,
            "requests": self.requests,
            "executed": self.executed,
            "refused": self.refused,
            "skipped": self.skipped,
            "reads_compared": self.reads_compared,
            "reads_matched": self.reads_matched,
            "divergences": self.divergences,
            "first_divergence": self.first.to_json() if self.first else None,
            "first_seq": self.first_seq,
            "adapted": dict(self.adapted),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "elapsed": self.elapsed,
            "recorded_duration": self.recorded_duration,
            "verify_reads": self.verify_reads,
            "stopped": self.stopped,
            "truncated": self.truncated,
            "checksum": self.checksum,
            "ok": self.ok,
        }


def _synthetic(offset: int, length: int) -> bytes:
    """A write's stand-in payload: each 16 bytes say where they were written."""
    if not length:
        return b""
    block = struct.pack("<QQ", offset, 0x6275_7365_6C61_6221)  # "buselab!"
    return (block * (length // 16 + 1))[:length]


# -- the replayer ---------------------------------------------------------------------------


class Replayer:
    """Replays one trace through `engine`; `run()` blocks, `start()` runs it on a thread.

    The lab can show `summary` (live counters), `done`/`total`, and pause or
    step it through the engine's gate like any other client.
    """

    def __init__(
        self,
        engine: Any,
        path: str,
        *,
        speed: float | None = 1.0,
        synthetic_writes: bool = False,
        partial: bool = False,
        stop_on_divergence: bool = False,
        checksum: bool = False,
        progress: Callable[[ReplaySummary], None] | None = None,
        progress_interval: float = 1.0,
    ) -> None:
        if speed is not None and not speed > 0:
            raise UserError(f"--speed must be more than 0 (it was {speed}); use --as-fast-as-possible for no pacing")
        self.engine = engine
        self.path = path
        self.speed = speed
        self.synthetic_writes = synthetic_writes
        self.stop_on_divergence = stop_on_divergence
        self.checksum = checksum
        self.progress = progress
        self.progress_interval = progress_interval
        self.number = 0  # our connection number in the telemetry (the gate's Replier protocol)
        self.slot = engine.inflight.open("replay")  # executing: a request of ours is in the backend
        self.error: BaseException | None = None  # what ended a start()ed replay, if not the end
        self._stop = threading.Event()
        self._completed = threading.Event()
        self._result: tuple[int, object] = (0, None)
        self._thread: threading.Thread | None = None

        # Everything that can be wrong with the trace is found before the first request.
        # Everything that can be wrong with the trace is found before the first request: one
        # pass reads it all (a corrupt line 90% in must not leave a device 90% replayed).
        counts, _trailer, truncated = check_trace(path, partial=partial)
        self.reader: TraceReader = open_trace(path, partial=partial)
        header = self.reader.header
        self.header = header
        try:
            if header.size > engine.size:
                raise UserError(
                    f"trace {path} is for a {human_bytes(header.size)} device ({header.size:,} bytes) but the"
                    f" backend has {human_bytes(engine.size)} ({engine.size:,} bytes): replay on a backend at"
                    f" least as big, e.g. --backend ram:{header.size}"
                )
            if counts.get("WRITE") and header.payload == "none" and not synthetic_writes:
                raise UserError(
                    f"trace {path} was recorded without write payloads, so its writes cannot be replayed"
                    " faithfully: record with payloads (the default), or pass --synthetic-writes to fill writes"
                    " with a pattern and not compare reads"
                )
            if engine.readonly or engine.backend.readonly:
                raise UserError("the replay backend is read-only: replay needs to write")
        except BaseException:
            self.reader.close()
            raise
        self._hash = hasher(header.hash)
        self.hash_name = header.hash
        self.total = sum(counts.values())
        self.truncated = truncated
        self.summary = ReplaySummary(
            trace=path,
            backend=engine.backend.describe(),
            total=self.total,
            verify_reads=not synthetic_writes,
        )

    # -- the gate's Replier protocol: held requests come back here ----------------------
    def complete(self, req: Request, start: float, error: int, data: object) -> None:
        self._result = (error, data)
        self._completed.set()

    # -- running ----------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.summary.requests

    def start(self) -> None:
        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # noqa: BLE001 - kept for whoever joins
                self.error = exc

        self._thread = threading.Thread(target=target, name="buselab-replay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> ReplaySummary:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.summary

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> ReplaySummary:
        engine = self.engine
        telemetry = engine.telemetry
        summary = self.summary
        self.number = telemetry.connection_opened(f"replay of {os.path.basename(self.path)}")
        began = time.perf_counter()
        try:
            self._loop(began)
            if self.checksum and not summary.stopped:
                summary.checksum = device_checksum(engine.backend)
        except UserError as exc:
            # Its traceback would keep the loop's last read alive: a RAM disk's read is a view of
            # its mapping, and the backend cannot close while one exists. The message says it all.
            raise exc.with_traceback(None) from None
        finally:
            summary.elapsed = time.perf_counter() - began
            summary.truncated = self.reader.truncated
            engine.inflight.close(self.slot)
            telemetry.connection_closed(self.number, "replay finished" if not summary.stopped else "replay stopped")
            self.reader.close()
            if self.progress is not None:
                self.progress(summary)
        return summary

    def _idle(self) -> None:
        self.slot.executing = 0
        if self.engine.inflight.waiters:
            self.engine.inflight.wake()

    def _loop(self, began: float) -> None:
        engine = self.engine
        telemetry = engine.telemetry
        gate = engine.gate
        summary = self.summary
        rec = telemetry.recorder()
        record = telemetry.record
        now = time.perf_counter
        size = engine.size
        tflags = engine.flags
        caps = engine.backend.caps
        speed = self.speed
        verify = not self.synthetic_writes
        first_t: float | None = None
        last_t = 0.0
        base = began  # perf_counter that the trace's first request maps to (moves on when held)
        next_progress = began + self.progress_interval
        for index, r in enumerate(self.reader, 1):
            if self._stop.is_set():
                summary.stopped = True
                break
            if first_t is None:
                first_t = r.t
                summary.first_seq = r.seq
            last_t = max(last_t, r.t)
            summary.recorded_duration = last_t - first_t  # so far: an interrupted replay reports it too
            if speed is not None:
                self._wait_until(base + (r.t - first_t) / speed)
                if self._stop.is_set():
                    summary.stopped = True
                    break
            summary.requests = index
            req = self._request(r, tflags, caps)
            if req is None:
                summary.skipped += 1
                continue
            error = check_request(req, size, tflags, True, 1)
            start = now()
            data: object = None
            if error:
                summary.refused += 1
            else:
                self.slot.executing = 1  # before looking at the gate: see Engine.quiesce
                if gate.paused and gate.hold(req, self, start):
                    self._idle()
                    error, data = self._wait_for_gate()
                    base += now() - start  # time held is not the trace's time
                else:
                    error, data = engine.execute(req)
                    self._idle()
                summary.executed += 1
            end = now()
            cmd = r.cmd
            if cmd == c.CMD_READ and not error:
                summary.bytes_read += r.length
            elif cmd == c.CMD_WRITE and not error:
                summary.bytes_written += r.length
            record(
                rec,
                cmd,
                req.flags,
                r.offset,
                r.length,
                start,
                end,
                error,
                self.number,
                r.handle,
                data if cmd == c.CMD_READ and not error else req.payload,
            )
            self._compare(index, r, error, data, verify)
            data = None  # see run(): no view of the backend's memory outlives its request
            if self.stop_on_divergence and summary.divergences:
                summary.stopped = True
                break
            if self.progress is not None and end >= next_progress:
                self.progress(summary)
                next_progress = end + self.progress_interval

    def _request(self, r: TraceRecord, tflags: int, caps: Any) -> Request | None:
        """The request to send for a record, adapted to what the backend offers."""
        cmd = r.cmd
        flags = r.flags
        adapted = self.summary.adapted
        payload = None
        if cmd == c.CMD_WRITE:
            payload = r.data
            if payload is None:
                if self.synthetic_writes:
                    payload = _synthetic(r.offset, r.length)
                elif r.error:
                    return None  # failed when recorded and nothing to write: leave it out
                else:
                    raise UserError(
                        f"trace {self.path} is corrupt: line {r.line} is a WRITE without its payload;"
                        " pass --synthetic-writes to replay it with a pattern"
                    )
        # Flags and commands that change durability or speed, not data: drop what the backend lacks.
        if flags & c.CMD_FLAG_FUA and not tflags & c.TF_SEND_FUA:
            flags &= ~c.CMD_FLAG_FUA
            adapted["FUA dropped"] += 1
        if flags & c.CMD_FLAG_FAST_ZERO and not tflags & c.TF_SEND_FAST_ZERO:
            flags &= ~c.CMD_FLAG_FAST_ZERO
            adapted["FAST_ZERO dropped"] += 1
        if flags & c.CMD_FLAG_DF and cmd == c.CMD_READ:
            flags &= ~c.CMD_FLAG_DF  # we take the data whole anyway
        needed = {
            c.CMD_FLUSH: c.TF_SEND_FLUSH,
            c.CMD_CACHE: c.TF_SEND_CACHE,
            c.CMD_TRIM: c.TF_SEND_TRIM,
        }.get(cmd)
        if needed and not tflags & needed and not r.error:
            # TRIM is advisory in NBD; if skipping it changes what later reads see, they will say so.
            adapted[f"{r.op} skipped (backend has none)"] += 1
            return None
        return Request(flags, cmd, r.handle, r.offset, r.length, payload)

    def _compare(self, index: int, r: TraceRecord, error: int, data: object, verify: bool) -> None:
        summary = self.summary
        if error != r.error:
            self._diverged(
                Divergence(
                    index, r.line, r.seq, r.op, r.offset, r.length, "result", _result_name(r.error), _result_name(error)
                )
            )
            return
        if r.cmd != c.CMD_READ or error or not verify or r.hash is None or data is None:
            return
        summary.reads_compared += 1
        got = self._hash(data)  # type: ignore[arg-type]
        if got == r.hash:
            summary.reads_matched += 1
        else:
            self._diverged(
                Divergence(index, r.line, r.seq, r.op, r.offset, r.length, "data", r.hash, got, self.hash_name)
            )

    def _diverged(self, divergence: Divergence) -> None:
        summary = self.summary
        summary.divergences += 1
        if summary.first is None:
            summary.first = divergence
            self.engine.telemetry.event("replay diverged: " + divergence.describe())

    def _wait_until(self, due: float) -> None:
        while True:
            delay = due - time.perf_counter()
            if delay <= 0 or self._stop.is_set():
                return
            if delay > 0.1:
                self._stop.wait(0.1)
            else:
                time.sleep(delay)

    def _wait_for_gate(self) -> tuple[int, object]:
        """A held request: wait until the gate's worker runs it (or we are stopped)."""
        # Engine.close resumes the gate, so this ends even if the lab quits while paused.
        self._completed.wait()
        self._completed.clear()
        result, self._result = self._result, (0, None)
        return result


def replay(path: str, backend_spec: str, **options: Any) -> ReplaySummary:
    """Replay a trace on a fresh engine over `backend_spec` (see open_replay_backend)."""
    from ..engine import Engine

    with open_trace(path, partial=options.get("partial", False)) as reader:
        trace_size = reader.header.size
    engine = Engine(open_replay_backend(backend_spec, trace_size))
    try:
        return Replayer(engine, path, **options).run()
    finally:
        engine.close()
