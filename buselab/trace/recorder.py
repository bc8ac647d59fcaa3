"""Recording every request of a running engine to a trace file.

The telemetry calls our tap on the serving thread after each reply. The tap
hashes a read with crc32 there (0.4 us for 4 KiB with zlib-ng) or copies the
payload, once, into memory shared with the writer (buselab/trace/ring.py:
the connection reuses its buffer, and a RAM disk's read data is a view of
memory the next write may change), and appends the request, packed into a
fixed-size binary record (buselab/trace/wire.py), to a deque. A feeder
thread takes what has queued every few milliseconds and sends it, joined
into one frame, to a writer *process* (buselab/trace/writer.py)
that hashes, formats, compresses and writes. In a thread those few
microseconds per request would be taken from the serving threads, which need
the GIL: measured, that cost 30-60% of the IOPS at 4 jobs x iodepth 8; in a
process it costs what the CPU can spare.

With the session's Labeller (`labeller=`), each record also carries what it
touched ("struct", "label"): the feeder thread sends the writer the disk's map
each time the Labeller replaces it, and the writer labels (labelling.py).

If the writer falls behind by more than `backlog_limit` bytes of payload (the
size of the shared ring), the tap waits: a trace that silently loses
requests is worse than a slower disk while recording. If writing fails (disk
full), recording stops, the error is kept in `error` and shown as a
telemetry event; serving goes on.

    recorder = TraceRecorder.start(engine, "run.jsonl.zst")   # `r` in the lab
    ...
    info = recorder.stop()                                     # idempotent, never raises
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import repeat, starmap
from typing import Any

from ..errors import UserError
from ..protocol import constants as c
from .codecs import crc32
from .format import HASH_NAME, HASHES, PAYLOAD_MODES, TraceHeader, compression_of
from .labelling import map_frame
from .ring import PayloadRing
from .wire import CRC, IN_RING, INLINE, NO_DATA, RECORD, frame

log = logging.getLogger("buselab")

_F_SETPIPE_SZ = 1031  # Linux; a bigger pipe means fewer wake-ups of the writer
_PIPE_SIZE = 1 << 20
_BATCH = 2048  # requests queued before the serving thread that queued the last one sends them
_SWEEP_INTERVAL = 0.1  # seconds between the feeder's looks for a trickle of requests below _BATCH
_MAX_BATCH = 8192  # requests in one frame at most
_MAX_QUEUED = 1 << 20  # requests waiting for the writer before serving waits too


@dataclass
class RecordingInfo:
    """What a finished (or running) recording amounts to."""

    path: str
    records: int
    payload_bytes: int
    duration: float
    error: str | None
    complete: bool  # the trace has its end line

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
        hash: str = HASH_NAME,  # noqa: A002 - the header field's name
        level: int | None = None,
        flush_interval: float = 1.0,
        backlog_limit: int = 16 << 20,
        labeller: Any = None,
    ) -> None:
        if payload not in PAYLOAD_MODES:
            raise UserError(f"unknown payload mode {payload!r}: choose one of {', '.join(PAYLOAD_MODES)}")
        if hash not in HASHES:
            raise UserError(f"unknown hash {hash!r}: choose one of {', '.join(HASHES)}")
        if compression_of(path) == "zst":
            from .format import _zstandard

            _zstandard()  # a missing package is the user's one-line error now, not the writer's later
        self.engine = engine
        self.path = path
        self.payload = payload
        self.backlog_limit = backlog_limit
        self.error: str | None = None
        self.sent = 0  # records handed to the writer process
        self.maps_sent = 0  # maps handed to it (labels: see _send_map)
        self.records = 0  # records in the file (known when the writer is done)
        self.payload_bytes = 0
        self.complete = False
        self._queue: deque[bytes] = deque()  # records packed by the tap (wire.py)
        self._backlog = 0  # payload bytes queued outside the ring, not yet sent (approximate: see _tap)
        # Payloads of up to half the ring go through it; bigger ones (rare: NBD allows 32 MiB
        # requests) and all of them where there is no memfd, through the pipe.
        self._ring = PayloadRing.create(backlog_limit)
        self._progress = threading.Event()  # a batch went to the writer
        self._send_lock = threading.Lock()  # one sender at a time: frames go out whole and in order
        self._closed = False  # the end frame is sent (or the writer is gone): send nothing more
        self._send_failure: OSError | None = None
        self._stopping = threading.Event()
        self._stopped = False
        self._stop_lock = threading.Lock()
        header = TraceHeader.for_engine(engine, payload)
        header.hash = hash
        header.labels = labeller is not None
        self._labeller = labeller  # anything with a `.map` (engine.labels.Labeller): records get labels
        self._map_sent: object = None  # the map the writer labels with (None: no labels)
        self.header = header
        self._started = time.monotonic()
        self._ended: float | None = None
        setup = {
            "header": dataclasses.asdict(header),
            "path": path,
            "level": level,
            "flush_interval": flush_interval,
        }
        if self._ring is not None:
            setup["ring_fd"] = self._ring.fd
            setup["ring_size"] = self._ring.size
        try:
            self._proc = self._spawn(path, setup, () if self._ring is None else (self._ring.fd,))
        except BaseException:
            if self._ring is not None:
                self._ring.close()
            raise
        self._thread = threading.Thread(target=self._feed, name="buselab-trace", daemon=True)
        self._tap_fn = self._make_tap()

    @staticmethod
    def _spawn(path: str, setup: dict[str, Any], fds: tuple[int, ...]) -> subprocess.Popen:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write trace {path}: {exc.strerror or exc}") from exc
        # The writer must import this very buselab, wherever it was imported from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # The writer joins each batch's lines into one buffer of up to some MiB. glibc serves
        # that from fresh mmap()ed memory and unmaps it after, so every batch page-faulted its
        # way through new memory: measured, 15% of the writer's CPU with 4 KiB writes. Keep
        # such buffers on the heap, and the heap's freed memory for the next batch.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 << 20))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "buselab.trace.writer", str(fd)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(fd, *fds),
                start_new_session=True,  # Ctrl-C is for the server; it tells the writer when to end
                bufsize=0,
            )
        except OSError as exc:
            raise UserError(f"cannot start the trace writer: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        try:
            fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more wake-ups
        _send(proc, marshal.dumps(setup))
        return proc

    @classmethod
    def start(cls, engine: Any, path: str, **options: Any) -> TraceRecorder:
        """Open `path` and record every request `engine` serves from now on.

        Options: payload="writes" (default; "none" or "all"), hash="crc32"
        (or "blake2b-128"), level (compression), flush_interval (seconds),
        labeller (the session's Labeller: each record gets its label).
        """
        recorder = cls(engine, path, **options)
        recorder._send_map()  # before the first record, where the map is there already
        recorder._thread.start()
        engine.telemetry.taps.append(recorder._tap_fn)
        engine.telemetry.event(f"recording to {path}")
        return recorder

    # -- the serving threads --------------------------------------------------------
    def _make_tap(self) -> Any:
        """The tap, as a closure: every attribute lookup saved here is saved per request."""
        append = self._queue.append
        pack = RECORD.pack
        keep = frozenset(
            ([c.CMD_WRITE] if self.payload in ("writes", "all") else [])
            + ([c.CMD_READ] if self.payload == "all" else [])
        )
        # A crc32 of 4 KiB costs less than shipping the 4 KiB to the writer; a BLAKE2b would
        # release and retake the GIL, so the writer does that one.
        hash_here = self.header.hash == "crc32"
        limit = self.backlog_limit
        queued = self._queue.__len__
        send_queued = self._send_queued
        recorder = self
        ring = self._ring
        ring_lock = ring.lock if ring is not None else None
        ring_size = ring.size if ring is not None else 0
        ring_data = ring.data if ring is not None else None
        ring_max = ring_size // 2 if ring is not None else -1
        freed_now = ring.freed if ring is not None else None
        sleep = time.sleep
        head = 0  # ring bytes ever reserved
        freed = 0  # what the writer had freed when we last looked: we look only when short of room
        unsent = 0  # where the ring's payloads not yet sent (as far as the tap knows) begin

        def tap(record: tuple, payload: bytes | bytearray | memoryview | None) -> None:
            seq, t, cmd, flags, offset, length, latency, error, conn, handle, _ = record
            if payload is None:
                append(pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, NO_DATA, 0, 0))
            elif hash_here and cmd not in keep:
                try:
                    append(
                        pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, CRC, crc32(payload), 0)
                    )
                except TypeError:  # not bytes-like: record the request without its data
                    append(pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, NO_DATA, 0, 0))
            else:
                queue_payload(record, payload)
            if queued() >= _BATCH and not send_queued() and queued() > _MAX_QUEUED:
                # Another thread is sending, blocked on a full pipe: the writer is starved of
                # CPU. Wait for it rather than grow without end.
                recorder._wait_for_writer()

        def queue_payload(record: tuple, payload: bytes | bytearray | memoryview) -> None:
            """Queue a request with its data: through the ring, or in the item when too big for it."""
            nonlocal head, freed, unsent
            seq, t, cmd, flags, offset, length, latency, error, conn, handle, _ = record
            try:
                n = len(payload)
            except TypeError:
                n = -1
            if 0 <= n <= ring_max:
                # Reserve, copy and queue in one step, so the writer frees the ring in queue order.
                with ring_lock:
                    start = head
                    pos = start % ring_size
                    if pos + n > ring_size:  # would wrap: start again at the beginning
                        start += ring_size - pos
                        pos = 0
                    end = start + n
                    while end - freed > ring_size:  # full as far as we knew: look again
                        if recorder._closed:  # recording has ended, or the writer is gone
                            append(
                                pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, NO_DATA, 0, 0)
                            )
                            return
                        freed = freed_now()
                        if end - freed > ring_size:
                            # What is queued must reach the writer, and what it holds back be
                            # written (writer.Encoder.HOLD), for the ring to be freed.
                            send_queued(release=True)
                            sleep(0.0005)
                    try:
                        ring_data[pos : pos + n] = payload
                    except (TypeError, ValueError):  # not a flat byte buffer (or recording ended)
                        pass
                    else:
                        head = end
                        append(
                            pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, IN_RING, start, n)
                        )
                        # Big payloads fill the ring before _BATCH requests queue up: send when a
                        # quarter of it waits, so the writer frees it long before it is full.
                        if end - unsent < ring_size // 4:
                            return
                        unsent = end
                if not send_queued() and queued() > _MAX_QUEUED:
                    recorder._wait_for_writer()
                return
            try:
                append(pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, INLINE, 0, n) + payload)
            except (TypeError, struct.error):  # not bytes-like (n is -1)
                append(pack(seq, t, cmd, flags, offset, length, latency, error, conn, handle, NO_DATA, 0, 0))
                return
            # Not a lock-protected counter: a soft limit, which an update lost now and then does not break.
            recorder._backlog += n
            if recorder._backlog > limit:
                recorder._wait_for_writer()

        return tap

    def _wait_for_writer(self) -> None:
        """Send, or wait for another thread's sending, until the backlog is down to half."""
        while (self._backlog > self.backlog_limit // 2 or len(self._queue) > _MAX_QUEUED // 2) and not self._closed:
            if not self._send_queued():
                self._progress.wait(0.01)
                self._progress.clear()

    # -- sending to the writer process --------------------------------------------------
    def _send_queued(self, wait: bool = False, everything: bool = False, release: bool = False) -> bool:
        """Send a batch of what has queued to the writer; False if another thread was at it.

        `release` adds a frame without records: the writer then writes what it holds back.

        The serving thread whose request fills a batch sends it: it holds the GIL already. A
        feeder thread that woke up every few milliseconds to send cost 4-6% of the IOPS at 4
        jobs x iodepth 8 just by waking (it must take the GIL from a serving thread, which then
        waits until the feeder has been scheduled); it now only sweeps up a slow trickle.
        """
        if not self._send_lock.acquire(wait):
            return False
        try:
            queue = self._queue
            popleft = queue.popleft
            while not self._closed:
                n = min(len(queue), _MAX_BATCH)
                if not n:
                    break
                batch = list(starmap(popleft, repeat((), n)))  # a loop in C
                body, inline = frame(batch)
                _send(self._proc, body)  # blocks (without the GIL) while the writer is behind
                self.sent += n
                if inline:  # only payloads outside the ring count
                    self._backlog -= inline
                self._progress.set()
                if not everything:
                    break
            if not queue:
                self._backlog = 0  # nothing queued, nothing behind: mends an update a tap's `+=` lost
            if release and not self._closed:
                _send(self._proc, frame([])[0])
        except OSError as exc:  # the writer is gone: the feeder says why and stops recording
            self._closed = True
            self._send_failure = exc
            self._stopping.set()
        finally:
            self._send_lock.release()
        return True

    def _send_map(self) -> None:
        """Give the writer the Labeller's map when it is a new one (a map is replaced, never changed).

        Records queued before it are sent first, so they are labelled with the map they were
        served under (about: the Labeller rebuilds a little after the writes that changed it).
        """
        labeller = self._labeller
        if labeller is None:
            return
        fsmap = labeller.map
        if fsmap is self._map_sent:
            return
        body = map_frame(fsmap)  # pickled here, on the feeder thread: once per new map
        self._send_queued(wait=True, everything=True)
        with self._send_lock:
            if self._closed:
                return
            try:
                _send(self._proc, body)
            except OSError as exc:
                self._closed = True
                self._send_failure = exc
                self._stopping.set()
                return
        self._map_sent = fsmap
        self.maps_sent += 1

    def _feed(self) -> None:
        """The feeder thread: sweeps up what a slow trickle leaves queued, and new maps; ends the stream."""
        try:
            while not self._stopping.wait(_SWEEP_INTERVAL):
                self._send_map()
                if self._queue:
                    self._send_queued()
            if self._send_failure is None:
                self._send_queued(wait=True, everything=True)
            with self._send_lock:
                if not self._closed:
                    self._closed = True
                    _send(self._proc, b"")  # the end
        except OSError as exc:
            self._send_failure = exc
        finally:
            if self._send_failure is not None:
                exc = self._send_failure
                self.error = self._writer_error() or f"the trace writer stopped: {exc.strerror or exc}"
                self._detach()
                self._queue.clear()
                self._backlog = 0
                log.warning("recording to %s failed: %s", self.path, self.error)
                self.engine.telemetry.event(f"recording to {self.path} failed: {self.error}")
            self._closed = True
            self._progress.set()
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def _writer_error(self) -> str | None:
        """The writer's own `error: ...` line, once it has exited."""
        try:
            self._proc.wait(10)
            out = self._proc.stdout.read().decode(errors="replace").strip()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
        for line in out.splitlines():
            if line.startswith("error: "):
                return line[len("error: ") :]
        return None

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
        """Requests seen but not yet handed to the writer."""
        return len(self._queue)

    def info(self) -> RecordingInfo:
        records = self.records if self._stopped else self.sent
        duration = (self._ended or time.monotonic()) - self._started
        return RecordingInfo(self.path, records, self.payload_bytes, duration, self.error, self.complete)

    def stop(self, timeout: float = 120.0) -> RecordingInfo:
        """Stop taking requests, write what is queued and the end line, close the file.

        Never raises: Session.stop relies on it to finish shutting down.
        """
        with self._stop_lock:
            if self._stopped:
                return self.info()
            self.engine.settle()  # every request a client has its answer to is in the trace
            self._detach()
            self._ended = time.monotonic()
            self._stopping.set()
            if self._thread.ident is not None:
                self._thread.join(timeout)
            else:
                self._closed = True
                try:
                    _send(self._proc, b"")
                    self._proc.stdin.close()
                except OSError:
                    pass
            self._stopped = True
            already_failed = self.error is not None  # and said so
            self._finish(timeout)
            if self._ring is not None:
                self._ring.close()
            if self.error is None:
                self.engine.telemetry.event(f"recording stopped: {self.records:,} requests in {self.path}")
            elif not already_failed:
                log.warning("recording to %s failed: %s", self.path, self.error)
                self.engine.telemetry.event(f"recording to {self.path} failed: {self.error}")
        return self.info()

    def _finish(self, timeout: float) -> None:
        proc = self._proc
        try:
            proc.wait(timeout)  # its status line is short: it cannot block on a full pipe
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.error = self.error or f"the trace writer did not finish in {timeout:.0f} s"
            return
        try:
            out = proc.stdout.read() or b""
            proc.stdout.close()
        except (OSError, ValueError):
            out = b""
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("error: "):
                self.error = self.error or line[len("error: ") :]
            elif line.startswith("{"):
                try:
                    status = json.loads(line)
                except ValueError:
                    continue
                self.records = int(status.get("records", 0))
                self.payload_bytes = int(status.get("payload_bytes", 0))
                self.complete = bool(status.get("ended"))
        if proc.returncode and self.error is None:
            self.error = f"the trace writer exited with status {proc.returncode}"


def _send(proc: subprocess.Popen, body: bytes) -> None:
    """One frame to the writer: length, then the marshalled value (b"" is the end)."""
    fd = proc.stdin.fileno()
    data = len(body).to_bytes(4, "little") + body if len(body) < 65536 else None
    if data is not None:
        _write_all(fd, data)
    else:
        _write_all(fd, len(body).to_bytes(4, "little"))
        _write_all(fd, body)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
