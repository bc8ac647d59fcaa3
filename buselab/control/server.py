"""The control socket server: a Unix socket that speaks `protocol.py`.

One thread accepts; each client gets a thread that reads request lines and
writes reply lines, so a long `wait` or `step wait=` of one script never
blocks another. Commands go through the session's `Steering`, exactly what the
lab's keys call; `status` asks the session, which knows where it serves.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Callable

from ..errors import UserError
from ..listening import accept_loop, bind_unix
from ..steering import Steering
from ..steering.results import Result
from . import control_dir, default_control_path, ensure_private_dir, prune_stale_sockets, socket_is_live
from .protocol import MAX_LINE, STOPPING, ControlTarget, encode_reply, handle_line, watch_request
from .watch import Watch

__all__ = ["ControlServer", "default_control_path"]

log = logging.getLogger("buselab")


class ControlServer:
    def __init__(
        self,
        steering: Steering,
        path: str | None = None,
        *,
        status: Callable[[], Result] | None = None,
        event: Callable[[str], None] = lambda message: None,
        stop: Callable[[], None] | None = None,
    ) -> None:
        self.path: str | None = path or default_control_path()  # None when it could not be made
        self.error: str | None = None  # why not
        self.target = ControlTarget(steering, status or steering.status, stop, self.viewers)
        self._watches: set[Watch] = set()
        self._event = event  # a line for the lab's stream
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen. With an explicit path a failure is the user's to fix (UserError); the
        default socket is a convenience, so failing to make it only costs a warning."""
        try:
            self._start()
        except UserError as exc:
            if self.path != default_control_path():
                raise
            self.error = str(exc)
            log.warning("no control socket: %s", exc)
            self._event(f"no control socket: {exc}")
            self.path = None

    def _start(self) -> None:
        path = self.path
        assert path is not None
        directory = os.path.dirname(os.path.abspath(path))
        if directory == control_dir():
            ensure_private_dir(directory)
            prune_stale_sockets(directory)
        elif not os.path.isdir(directory):
            raise UserError(f"cannot make the control socket {path}: {directory} does not exist")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UserError(f"{path} exists and is not a socket: choose another --control path")
            if socket_is_live(path):
                raise UserError(f"{path} is in use by a running buselab: choose another --control path")
            os.unlink(path)  # stale, left by a process that died
        try:
            sock = bind_unix(path, 0o600)  # born 0600: it can destroy data
        except OSError as exc:
            raise UserError(f"cannot listen on the control socket {path}: {exc.strerror}") from None
        sock.listen(16)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept_loop, name="buselab-control", daemon=True)
        self._thread.start()
        self._event(f"control socket on {path}")

    def _accept_loop(self) -> None:
        assert self._listener is not None
        accept_loop(self._listener, self._accepted, lambda: self._stopping, f"control socket {self.path}")

    def _accepted(self, client: socket.socket) -> None:
        with self._lock:
            if self._stopping:
                client.close()
                return
            self._clients.add(client)
        threading.Thread(target=self._serve, args=(client,), name="buselab-control-client", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            reader = client.makefile("rb")
            first = True  # only a connection's first command may turn it into a watch
            while True:
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    client.sendall(encode_reply({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
                    return
                if not line.strip():
                    continue
                watch = watch_request(line) if first else None
                first = False
                if watch is not None:
                    self._watch(client, watch)
                    return
                try:
                    reply = handle_line(self.target, line)
                except Exception as exc:  # noqa: BLE001 - a bug must cost one reply, not the socket
                    log.exception("control command failed")
                    reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
                client.sendall(encode_reply(reply))
                if reply.get("ok") and reply.get("result") == STOPPING and self.target.stop is not None:
                    self.target.stop()  # answered first: the session's stop closes this connection
        except OSError:
            pass  # the script went away
        finally:
            with self._lock:
                self._clients.discard(client)
            try:
                client.close()
            except OSError:
                pass

    def _watch(self, client: socket.socket, args: dict) -> None:
        """This connection becomes a viewer's stream of frames (see watch.py) until either side goes."""
        try:
            watch = Watch(client, self.target, stopping=lambda: self._stopping, **_watch_args(args))
        except (TypeError, ValueError) as exc:
            client.sendall(encode_reply({"ok": False, "error": f"bad arguments for watch: {exc}"}))
            return
        client.sendall(encode_reply({"ok": True, "result": {"watching": True, "hz": 1 / watch.period}}))
        with self._lock:
            self._watches.add(watch)
        try:
            watch.run()
        finally:
            with self._lock:
                self._watches.discard(watch)

    def viewers(self) -> list[dict]:
        """`viewers`: each attached lab's stream, oldest first (what it costs the server)."""
        with self._lock:
            watches = sorted(self._watches, key=lambda w: w.since)
        return [w.info() for w in watches]

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            clients = list(self._clients)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            try:
                os.unlink(self.path)  # type: ignore[arg-type]
            except OSError:
                pass
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _watch_args(args: dict) -> dict:
    unknown = set(args) - {"hz", "rows"}
    if unknown:
        raise ValueError(f"watch does not take {', '.join(sorted(unknown))}")
    return {key: float(value) if key == "hz" else int(value) for key, value in args.items()}
