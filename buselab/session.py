"""One running buselab: the composition root, where every part is made and wired.

A Session builds the stack (a backend and the --filter layers), the engine over
it, the steering that changes it, the network listeners, the kernel attach,
the trace recorder and the control server, and stops them all in one order.
Nothing below the front ends imports it: each part is handed what it needs
(the control server a Steering and a status function, the recorder an engine).

The CLI builds a Session from arguments, starts it, then hands it to either
the headless stats printer or the lab (TUI). Both stop it the same way, which
is what makes every exit path answer in-flight requests, flush and detach.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from urllib.parse import quote

from .control.server import ControlServer
from .engine import Engine
from .engine.labels import Labeller
from .errors import UserError
from .steering import Steering
from .steering.results import Status
from .storage import registry
from .storage.base import Backend
from .storage.stack import Stack
from .trace.recorder import RecordingInfo, TraceRecorder
from .transport.network import DEFAULT_HANDSHAKE_LIMIT, DEFAULT_UNIX_MODE, NetworkServer

log = logging.getLogger("buselab")


def export_uri(address: str, export_name: str) -> str:
    """An NBD URI with the export name in it, percent-encoded (nbd://h:p/NAME, nbd+unix:///NAME?socket=S).

    Clients asking for "" get the export too, but a URI naming it is the one
    to copy into qemu or nbdinfo.
    """
    name = quote(export_name, safe="")
    if address.startswith("nbd+unix:///?socket="):
        socket_path = address[len("nbd+unix:///?socket=") :]
        return f"nbd+unix:///{name}?socket={quote(socket_path, safe='/')}"
    if address.startswith(("nbd://", "nbds://")) and name:
        return f"{address}/{name}"
    return address


@dataclass
class ServeOptions:
    listen: list[tuple[str, int]] = field(default_factory=list)
    unix: list[str] = field(default_factory=list)
    export_name: str = ""
    readonly: bool = False
    device: str | None = None  # /dev/nbdN: the kernel attach
    filters: list[str] = field(default_factory=list)  # --filter specs, bottom first
    control: str | None = None  # control socket path (buselab ctl)
    record: str | None = None  # trace file (--record)
    record_payload: str = "writes"  # what a trace keeps of the data: none, writes, all
    connections: int = 1  # kernel: sockets (hardware queues) for the device
    use_ioctl: bool = False  # kernel: BUSE's ioctl path even where netlink exists
    timeout: int = 0  # kernel: request timeout in seconds, 0 = never (pauses are safe)
    unix_mode: int = DEFAULT_UNIX_MODE  # permissions of the --unix sockets
    handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT  # seconds a network client has to finish the handshake
    # Sockets already listening, handed down by systemd or libnbd (see buselab/activation.py).
    sockets: list[socket.socket] = field(default_factory=list)


class Session:
    def __init__(self, backend: Backend, options: ServeOptions) -> None:
        self.options = options
        self.stack = Stack(backend)
        self.engine = Engine(self.stack, export_name=options.export_name, readonly=options.readonly)
        self.steering = Steering(self.engine)
        self.labeller = Labeller(self.engine)  # what each request touches; started with the session
        self.steering.breakpoints.current_map = lambda: self.labeller.map  # struct= breakpoints look requests up
        self.network = NetworkServer(self.engine, unix_mode=options.unix_mode, handshake_limit=options.handshake_limit)
        self.kernel = None  # a kernel attachment, when serving /dev/nbdN
        self.control: ControlServer | None = None  # the control socket server, when there is one
        self.recorder: TraceRecorder | None = None  # the trace recorder, once one started (see start_recording)
        self.demo_workload = None  # set by `buselab demo`: the lab shows its progress
        self.replayer = None  # set by `buselab replay`: stopped before the engine closes
        self.notice: str | None = None  # news for whoever watches (the lab shows it): --run's command ended
        self._stopped = threading.Event()
        # Set by SIGINT/SIGTERM (see signals.py); headless and the lab watch it.
        self.stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._private_dir: str | None = None

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    @property
    def where(self) -> str:
        """Device or NBD URIs (with the export name), for headers and the stats line."""
        places = []
        if self.kernel is not None:
            places.append(self.kernel.device)
        places.extend(export_uri(address, self.engine.export_name) for address in self.network.addresses)
        return ", ".join(places) or "nowhere"

    @property
    def transport(self) -> str:
        kinds = []
        if self.kernel is not None:
            kinds.append("kernel")
        inherited = {sock.family for sock in self.options.sockets}
        if self.options.listen or inherited - {socket.AF_UNIX}:
            kinds.append("tcp")
        if self.options.unix or socket.AF_UNIX in inherited:
            kinds.append("unix")
        return "+".join(kinds) or "none"

    def private_socket(self) -> str:
        """A Unix socket path only this process knows about (for demos and tests)."""
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="buselab-")
        return os.path.join(self._private_dir, "nbd.sock")

    def status(self) -> Status:
        """Everything `buselab ctl status` says: steering's picture and where this is served."""
        control = self.control
        return Status.of(
            self.steering.status(),
            where=self.where,
            control=control.path if control is not None else None,
            control_error=control.error if control is not None else None,
            structures=self.labeller.structures_json(),
            queue_limits=self.kernel.queue_limits() if self.kernel is not None else None,
        )

    @property
    def recording(self) -> TraceRecorder | None:
        """The recorder while it records."""
        recorder = self.recorder
        return recorder if recorder is not None and recorder.running else None

    def start_recording(self, path: str, payload: str | None = None) -> TraceRecorder:
        """Record every request from now on into `path` (stop_recording, or stop, ends it)."""
        if self.recording is not None:
            raise UserError(f"already recording to {self.recorder.path}: stop that first")  # type: ignore[union-attr]
        self.recorder = TraceRecorder.start(
            self.engine, path, payload=payload or self.options.record_payload, labeller=self.labeller
        )
        return self.recorder

    def stop_recording(self) -> RecordingInfo | None:
        """End the recording (the trace is complete when this returns); None if none was running."""
        recorder = self.recording
        return recorder.stop() if recorder is not None else None

    def start(self) -> None:
        try:
            # Every spec is checked before any is stacked, so a bad one changes nothing.
            for spec_filter in [registry.parse_filter_spec(spec, self.engine.size) for spec in self.options.filters]:
                self.stack.add(spec_filter)  # not serving yet: nothing to quiesce
            self.labeller.start()  # first: its map labels the recording's first requests sooner
            if self.options.record:
                self.start_recording(self.options.record)
            for host, port in self.options.listen:
                self.network.listen_tcp(host, port)
            for path in self.options.unix:
                self.network.listen_unix(path)
            for sock in self.options.sockets:
                self.network.listen_inherited(sock)
            if self.options.device:
                from .transport.kernel import KernelOptions, attach  # only works as root

                kernel_options = KernelOptions(
                    connections=self.options.connections, use_ioctl=self.options.use_ioctl, timeout=self.options.timeout
                )
                self.kernel = attach(self.options.device, self.engine, self.network, kernel_options)
            if self.options.control:
                self.control = ControlServer(
                    self.steering,
                    self.options.control,
                    status=self.status,
                    event=self.engine.telemetry.event,
                    stop=self.stop_requested.set,
                )
                self.control.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Answer in-flight requests, detach, flush and close. Idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self.replayer is not None:
            self.replayer.stop()
        # A paused gate would keep a replay, the demo's client or a kernel
        # flush waiting forever: answer everything held before joining them.
        self.engine.gate.release_all()
        # ... and let the gate's worker send those answers before the
        # connections close under it (stopping the network does that).
        self.engine.gate.wait_released()
        if self.replayer is not None:
            self.replayer.join()
        if self.control is not None:
            self.control.stop()
        if self.kernel is not None:
            self.kernel.detach()
        self.network.stop()
        self.labeller.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.engine.close()
        if self._private_dir is not None:
            try:
                for name in os.listdir(self._private_dir):
                    os.unlink(os.path.join(self._private_dir, name))
                os.rmdir(self._private_dir)
            except OSError:
                pass

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()
