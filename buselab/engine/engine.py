"""The engine turns requests into completions.

It runs requests on a `Stack` (filters over a backend: it reads the stack's
top, and steering changes the stack), owns the gate that pauses and steps
I/O, the in-flight slots that say what is inside a backend, and the telemetry
every request is recorded into. Transports (kernel socketpair, TCP, Unix
sockets) call `export_info` during the handshake and `execute` for every
request; they never touch a backend directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..protocol import constants as c
from ..protocol.handshake import ExportInfo
from ..protocol.transmission import Request, clip_extents
from ..storage.base import Backend, BackendError, BackendFault, DataLost, PoweredOff, where, wire_errno
from ..storage.stack import Stack
from .gate import Gate
from .inflight import InFlight
from .telemetry import Telemetry

log = logging.getLogger("buselab")

WORKERS = 16  # requests of a parallel backend running at once, over all connections

_ERRORS_LOGGED = 10  # backend bugs logged before going quiet
_ERROR_EVENT_EVERY = 10.0  # seconds between telemetry events with the count after that


def transmission_flags(backend: Backend, readonly: bool) -> int:
    """Advertise exactly what the backend can do (BUSE never sent SEND_FLUSH)."""
    caps = backend.caps
    flags = c.TF_HAS_FLAGS | c.TF_SEND_DF
    if readonly or backend.readonly:
        flags |= c.TF_READ_ONLY
    if caps.flush:
        flags |= c.TF_SEND_FLUSH
    if caps.fua:
        flags |= c.TF_SEND_FUA
    if caps.rotational:
        flags |= c.TF_ROTATIONAL
    if not flags & c.TF_READ_ONLY:
        if caps.trim:
            flags |= c.TF_SEND_TRIM
        if caps.zero:
            flags |= c.TF_SEND_WRITE_ZEROES
            if caps.fast_zero:
                flags |= c.TF_SEND_FAST_ZERO
    if caps.cache:
        flags |= c.TF_SEND_CACHE
    if caps.multi_conn:
        flags |= c.TF_CAN_MULTI_CONN
    return flags


class Engine:
    def __init__(
        self,
        storage: Stack | Backend,
        *,
        export_name: str = "",
        readonly: bool = False,
        description: str = "",
    ) -> None:
        self.stack = storage if isinstance(storage, Stack) else Stack(storage)
        self.export_name = export_name
        self.readonly = readonly
        self.description = description or f"buselab {self.stack.describe()}"
        self.telemetry = Telemetry(self.stack.size)
        self.telemetry.settle = self.settle
        # Every serving thread takes a slot: quiesce and settle wait on them.
        self.inflight = InFlight()
        self.gate = Gate(self.execute, self.inflight)
        self.backend_errors = 0  # exceptions from backend bugs (not BackendError/OSError), logged or not
        # Broken contracts (a plugin's read returned a str), per kind: the first of each is logged.
        self.faults: dict[str, int] = {}
        self._faults_reported = 0.0
        self._errors_lock = threading.Lock()
        self._errors_reported = 0.0
        self._closed = False
        self._close_lock = threading.Lock()
        self._workers: ThreadPoolExecutor | None = None  # see workers()

    @property
    def backend(self) -> Backend:
        """What requests meet first: the stack's top (a filter, or the base backend)."""
        return self.stack.top

    # -- handshake -------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def flags(self) -> int:
        return transmission_flags(self.backend, self.readonly)

    def export_info(self) -> ExportInfo:
        base = self.stack.base
        return ExportInfo(
            name=self.export_name,
            size=self.size,
            flags=self.flags,
            description=self.description,
            min_block=base.min_block,
            preferred_block=max(base.preferred_block, base.min_block),
        )

    def lookup(self, name: str) -> ExportInfo | None:
        """The export for a name; "" always means the default (our only) export."""
        if name in ("", self.export_name):
            return self.export_info()
        return None

    # -- requests -------------------------------------------------------------
    def workers(self) -> ThreadPoolExecutor:
        """The threads that run the requests of a parallel backend (made on first use)."""
        pool = self._workers
        if pool is None:
            with self._close_lock:
                if self._workers is None:
                    self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="buselab-worker")
                pool = self._workers
        return pool

    def execute(self, req: Request) -> tuple[int, object]:
        """Run one already-validated request on the backend: (errno, data)."""
        backend = self.stack.top
        cmd = req.cmd
        try:
            if cmd == c.CMD_READ:
                return 0, backend.read(req.offset, req.length)
            if cmd == c.CMD_WRITE:
                backend.write(req.offset, req.payload, req.flags & c.CMD_FLAG_FUA != 0)
            elif cmd == c.CMD_FLUSH:
                backend.flush()
            elif cmd == c.CMD_TRIM:
                backend.trim(req.offset, req.length, req.flags & c.CMD_FLAG_FUA != 0)
            elif cmd == c.CMD_WRITE_ZEROES:
                backend.write_zeroes(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & c.CMD_FLAG_NO_HOLE,
                    fast=bool(req.flags & c.CMD_FLAG_FAST_ZERO),
                    fua=bool(req.flags & c.CMD_FLAG_FUA),
                )
            elif cmd == c.CMD_CACHE:
                backend.cache(req.offset, req.length)
            elif cmd == c.CMD_BLOCK_STATUS:
                extents = backend.extents(req.offset, req.length) if backend.caps.extents else [(req.length, 0)]
                return 0, clip_extents(extents, req.length, bool(req.flags & c.CMD_FLAG_REQ_ONE))
            return 0, None
        except BackendFault as exc:
            return self._fault(req, exc), None
        except BackendError as exc:  # a failure the backend meant to report: the lab shows why
            self.telemetry.failed(req.handle, req.offset, cmd, str(exc))
            return exc.errno, None
        except OSError as exc:
            self.telemetry.failed(req.handle, req.offset, cmd, self._describe(exc))
            return wire_errno(exc), None
        except Exception as exc:  # noqa: BLE001 - a failing backend must not kill the server
            return self._backend_bug(req, exc), None

    def _fault(self, req: Request, exc: BackendFault) -> int:
        """A backend broke the contract: log each kind once, count them all. Returns the errno to send."""
        reason = str(exc)
        self.telemetry.failed(req.handle, req.offset, req.cmd, reason)
        with self._errors_lock:
            count = self.faults[exc.kind] = self.faults.get(exc.kind, 0) + 1
        if count == 1:
            line = f"{reason}: the client gets {c.ERRNO_NAMES.get(exc.errno, exc.errno)} (only the first is logged)"
            log.warning("%s", line)
            self.telemetry.event(line)
            self._faults_reported = time.monotonic()  # the count comes in an event, later
        else:
            now = time.monotonic()
            if now - self._faults_reported >= _ERROR_EVENT_EVERY:
                self._faults_reported = now
                self.telemetry.event(f"{exc.kind}: {count:,} times so far (not logged)")
        return exc.errno

    def _backend_bug(self, req: Request, exc: Exception) -> int:
        """A bug in a backend or plugin: say where, but not a thousand times. Returns the errno to send."""
        with self._errors_lock:
            self.backend_errors += 1
            count = self.backend_errors
        what = self._describe(exc)
        self.telemetry.failed(req.handle, req.offset, req.cmd, what)
        if count > _ERRORS_LOGGED:
            now = time.monotonic()
            if now - self._errors_reported >= _ERROR_EVENT_EVERY:
                self._errors_reported = now
                self.telemetry.event(f"{count:,} backend errors so far (not logged), last: {type(exc).__name__}: {exc}")
            return wire_errno(exc)
        # With -v the whole traceback, for the ones that are logged at all.
        log.warning(
            "%s %d+%d failed in the backend: %s",
            req.name,
            req.offset,
            req.length,
            what,
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )
        self.telemetry.event(f"backend error on {req.name} at {req.offset}: {what}")
        if count == _ERRORS_LOGGED:
            self._errors_reported = time.monotonic()
            note = (
                f"further backend errors are not logged ({count} so far); the lab's stream shows every failed"
                f" request and an event every {_ERROR_EVENT_EVERY:.0f} s gives the count"
            )
            log.warning("%s", note)
            self.telemetry.event(note)
        return wire_errno(exc)

    def settle(self, timeout: float = 1.0) -> None:
        """Wait until every request whose reply was sent has been counted and recorded.

        A connection sends a lone request's reply before its bookkeeping, so a client can
        hold the answer a few microseconds before telemetry and taps have seen the request.
        Readers that must agree with what clients saw (snapshots, the stream, stopping a
        recording) wait here; it is one pass over the slots when nothing is pending. After
        `timeout` (a serving thread stuck in a tap) readers go on with what there is.
        """
        self.inflight.wait_until_recorded(timeout)

    @contextlib.contextmanager
    def quiesce(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold new requests and wait for those in the backend to finish.

        Inside the block no request touches the backend, so the stack can be
        replaced; on exit the gate returns to how it was and held requests go on.
        """
        gate = self.gate
        was_paused = gate.halted
        gate.pause()
        our_pause = gate.pauses
        # A serving thread raises its slot's `executing` before it looks at the gate, so
        # once no slot is executing (the gate's worker included) every later request is held.
        if not self.inflight.wait_until_idle(timeout):
            if not was_paused:
                gate.resume()
            raise TimeoutError("requests did not finish in time")
        try:
            yield
        finally:
            # Resume only if nobody (the user, a breakpoint) paused meanwhile.
            if not was_paused and gate.pauses == our_pause:
                gate.resume()

    def close(self) -> None:
        """Release held requests, flush and close the backend (idempotent).

        Never raises: a flush or close that fails is one line in the log
        (a cache that could not write back says how much was lost).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.gate.close()
        if self._workers is not None:
            self._workers.shutdown(wait=True)  # their replies sent (or their clients gone) before the flush
        flush_error: Exception | None = None
        try:
            self.backend.flush()
        except Exception as exc:  # noqa: BLE001 - e.g. an error filter: still close (a cache writes back)
            flush_error = exc
        try:
            self.backend.close()
        except DataLost as exc:
            # Says what was lost and why; the failed flush was the same write-back failing first.
            log.warning("%s", exc)
            self.telemetry.event(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shutting down: report, do not crash
            log.warning("closing the backend at shutdown failed: %s", self._describe(exc))
        if isinstance(flush_error, PoweredOff):
            # Not a failure: the cut already threw away what was not flushed, as a crash does.
            log.info("stopped with the power off: nothing flushed (the power cut lost what was not)")
        elif flush_error is not None:
            log.warning("flush at shutdown failed: %s", self._describe(flush_error))

    def _describe(self, exc: BaseException) -> str:
        at = where(exc, getattr(self.backend, "source_file", None))
        return f"{type(exc).__name__}: {exc}" + (f" ({at})" if at else "")
