"""Recording every request of a running engine to a trace file.

The telemetry calls our tap on the serving thread after each reply. The tap
only copies the payload (the connection reuses its buffer, and a RAM disk's
read data is a view of memory the next write may change) and appends to a
deque; hashing, base64, formatting, compression and the file all happen on the
recorder's own thread. hashlib and the compressors release the GIL on large
buffers, so most of that work runs beside the serving threads, not in front.

If the writer falls behind by more than `backlog_limit` bytes of payload, the
tap waits for it: a trace that silently loses requests is worse than a slower
disk while recording. If writing fails (disk full), recording stops, the error
is kept in `error` and shown as a telemetry event; serving goes on.

    recorder = TraceRecorder.start(engine, "run.jsonl.zst")   # `r` in the lab
    ...
    info = recorder.stop()                                     # idempotent
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..engine.telemetry import RequestRecord
from ..errors import UserError
from ..protocol import constants as c
from .format import PAYLOAD_MODES, TraceHeader, TraceWriter, encode_record, encode_trailer

log = logging.getLogger("buselab")

_READ, _WRITE = c.CMD_READ, c.CMD_WRITE
_OP_NAMES = [c.CMD_NAMES.get(i, f"CMD{i}") for i in range(8)]
_BATCH = 4096


@dataclass
class RecordingInfo:
    """What a finished (or running) recording amounts to."""

    path: str
    records: int
    payload_bytes: int
    duration: float
    error: str | None

    def describe(self) -> str:
        from ..sizes import human_bytes

        text = f"{self.records:,} requests in {self.duration:.1f} s to {self.path}"
        if self.payload_bytes:
            text += f" ({human_bytes(self.payload_bytes)} of payload)"
        if self.error:
            text += f"; recording failed: {self.error}"
        return text


class TraceRecorder:
    def __init__(
        self,
        engine: Any,
        path: str,
        *,
        payload: str = "writes",
        flush_interval: float = 1.0,
        backlog_limit: int = 256 << 20,
        level: int | None = None,
    ) -> None:
        if payload not in PAYLOAD_MODES:
            raise UserError(f"unknown payload mode {payload!r}: choose one of {', '.join(PAYLOAD_MODES)}")
        self.engine = engine
        self.path = path
        self.payload = payload
        self.flush_interval = flush_interval
        self.backlog_limit = backlog_limit
        self.error: str | None = None
        self.records = 0  # written to the file so far
        self.payload_bytes = 0
        self.ops = [0] * 8  # records written per command
        self._queue: deque[tuple[RequestRecord, bytes | None]] = deque()
        self._backlog = 0  # payload bytes queued, not yet written (approximate: see _tap)
        self._drained = threading.Event()
        self._stopping = threading.Event()
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._keep_reads = payload == "all"
        self._keep_writes = payload in ("writes", "all")
        self.header = TraceHeader.for_engine(engine, payload)
        self._writer = TraceWriter(path, level=level)
        try:
            self._writer.write_header(self.header)
            self._writer.flush()
        except OSError as exc:
            self._writer.close()
            raise UserError(f"cannot write trace {path}: {exc.strerror or exc}") from exc
        self._started = time.monotonic()
        self._tap_fn = self._tap
        self._thread = threading.Thread(target=self._run, name="buselab-trace", daemon=True)

    @classmethod
    def start(cls, engine: Any, path: str, *, payload: str = "writes", **options: Any) -> TraceRecorder:
        """Open `path` and record every request `engine` serves from now on."""
        recorder = cls(engine, path, payload=payload, **options)
        recorder._thread.start()
        engine.telemetry.taps.append(recorder._tap_fn)
        engine.telemetry.event(f"recording to {path}")
        return recorder

    # -- the serving threads --------------------------------------------------------
    def _tap(self, record: RequestRecord, payload: bytes | bytearray | memoryview | None) -> None:
        if payload is None:
            self._queue.append((record, None))
            return
        data = bytes(payload)
        self._queue.append((record, data))
        # Not a lock-protected counter: `+=` on an attribute has no switch point
        # inside it on CPython, and the limit is a soft one anyway.
        self._backlog += len(data)
        if self._backlog > self.backlog_limit:
            self._wait_for_writer()

    def _wait_for_writer(self) -> None:
        while self._backlog > self.backlog_limit // 2 and self._thread.is_alive():
            self._drained.wait(0.05)

    # -- the recorder's thread ----------------------------------------------------------
    def _run(self) -> None:
        queue = self._queue
        writer = self._writer
        start = self.header.start
        keep_reads, keep_writes = self._keep_reads, self._keep_writes
        blake2b = hashlib.blake2b
        next_flush = time.monotonic() + self.flush_interval
        try:
            while True:
                if not queue:
                    if self._stopping.is_set() and not queue:
                        break
                    self._drained.set()
                    now = time.monotonic()
                    if now >= next_flush:
                        writer.flush()
                        next_flush = now + self.flush_interval
                    self._stopping.wait(0.005)
                    continue
                self._drained.clear()
                batch = []
                popleft = queue.popleft
                for _ in range(min(len(queue), _BATCH)):
                    batch.append(popleft())
                # Threads may append slightly out of seq order; keep the file in order.
                batch.sort(key=lambda item: item[0].seq)
                lines = []
                freed = 0
                ops = self.ops
                for rec, data in batch:
                    cmd = rec.cmd
                    if cmd < 8:
                        ops[cmd] += 1
                    digest = None
                    keep = None
                    if data is not None:
                        freed += len(data)
                        digest = blake2b(data, digest_size=16).hexdigest()
                        if (keep_writes and cmd == _WRITE) or (keep_reads and cmd == _READ):
                            keep = data
                    lines.append(
                        encode_record(
                            rec.seq,
                            rec.time - start,
                            _OP_NAMES[cmd] if cmd < 8 else f"CMD{cmd}",
                            rec.flags,
                            rec.offset,
                            rec.length,
                            rec.latency,
                            rec.error,
                            rec.conn,
                            rec.handle,
                            digest,
                            keep,
                        )
                    )
                    if keep is not None:
                        self.payload_bytes += len(keep)
                writer.write("".join(lines))
                self.records += len(batch)
                self._backlog -= freed
                if time.monotonic() >= next_flush:
                    writer.flush()
                    next_flush = time.monotonic() + self.flush_interval
            counts = {_OP_NAMES[i]: n for i, n in enumerate(self.ops) if n}
            writer.write(encode_trailer(self.records, time.monotonic() - self._started, ops=counts))
            writer.close()
        except Exception as exc:  # noqa: BLE001 - a failed recording must not take the server down
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc.strerror or exc)
            self._detach()
            queue.clear()
            self._backlog = 0
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            log.warning("recording to %s failed: %s", self.path, self.error)
            self.engine.telemetry.event(f"recording to {self.path} failed: {self.error}")
        finally:
            self._drained.set()

    # -- control ----------------------------------------------------------------------
    def _detach(self) -> None:
        telemetry = self.engine.telemetry
        # Rebind rather than remove in place: a serving thread may be iterating the list.
        telemetry.taps = [tap for tap in telemetry.taps if tap is not self._tap_fn]

    @property
    def running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Requests seen but not yet written."""
        return len(self._queue)

    def info(self) -> RecordingInfo:
        return RecordingInfo(self.path, self.records, self.payload_bytes, time.monotonic() - self._started, self.error)

    def stop(self, timeout: float = 60.0) -> RecordingInfo:
        """Stop taking requests, write what is queued and the end line, close the file.

        Never raises: Session.stop relies on it to finish shutting down.
        """
        with self._stop_lock:
            if not self._stopped:
                self._stopped = True
                self._detach()
                self._stopping.set()
                if self._thread.ident is not None:
                    self._thread.join(timeout)
                    if self._thread.is_alive():
                        self.error = self.error or f"the recorder did not finish writing in {timeout:.0f} s"
                        log.warning("recording to %s: %s", self.path, self.error)
                else:  # never started: just end the file
                    try:
                        self._writer.write(encode_trailer(0, 0.0, ops={}))
                        self._writer.close()
                    except OSError as exc:
                        self.error = str(exc.strerror or exc)
                if self.error is None:
                    self.engine.telemetry.event(f"recording stopped: {self.records:,} requests in {self.path}")
        return self.info()
