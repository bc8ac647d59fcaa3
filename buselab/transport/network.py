"""NBD over TCP and Unix sockets: listeners and one thread per connection."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time

from ..engine.engine import Engine
from ..errors import UserError
from ..listening import accept_loop, bind_unix
from ..protocol import constants as c
from .connection import Connection, peer_name

log = logging.getLogger("buselab")
DEFAULT_PORT = 10809
DEFAULT_UNIX_MODE = 0o600  # whoever can connect can write the disk
DEFAULT_HANDSHAKE_LIMIT = 10.0  # seconds, as qemu-nbd's --handshake-limit
# Connection threads run only the serve loop (and a plugin's code): they need far less
# than the default 8 MiB of stack, and a thousand idle clients should not map 8 GiB.
_CONNECTION_STACK = 2 << 20
_stack_size_lock = threading.Lock()


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT', 'PORT' or '[::1]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise UserError(f"bad --listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:10809") from None
    if not 0 <= number <= 65535:
        raise UserError(f"bad --listen {text!r}: port {number} is out of range")
    return host, number


class NetworkServer:
    """Accepts NBD clients on any number of TCP and Unix listeners."""

    def __init__(
        self,
        engine: Engine,
        *,
        unix_mode: int = DEFAULT_UNIX_MODE,
        handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT,
    ) -> None:
        self.engine = engine
        self.unix_mode = unix_mode
        self.handshake_limit = handshake_limit
        self.stop_timeout = 5.0  # seconds stop() waits for all connections together
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._threads: set[threading.Thread] = set()  # running ones only: each removes itself
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.addresses: list[str] = []

    # -- listening ----------------------------------------------------------------
    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use: pick another with --listen {host}:PORT") from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits instead of being refused
        bound = sock.getsockname()[:2]
        self.addresses.append(f"nbd://{host if family == socket.AF_INET else '[' + host + ']'}:{bound[1]}")
        self._start_acceptor(sock)
        return bound[0], bound[1]

    def listen_unix(self, path: str) -> str:
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise UserError(f"{path} exists and is not a socket: choose another --unix path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket left by a process that died
            else:
                raise UserError(f"{path} is in use by a running server: choose another --unix path")
            finally:
                probe.close()
        try:
            sock = bind_unix(path, self.unix_mode)
        except OSError as exc:
            raise UserError(f"cannot listen on {path}: {exc.strerror}") from None
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits instead of being refused
        self._unix_paths.append(path)
        self.addresses.append(f"nbd+unix:///?socket={path}")
        self._start_acceptor(sock)
        return path

    def listen_inherited(self, sock: socket.socket) -> str:
        """Serve on a socket someone else bound and made listen (socket activation).

        Its path, if it is a Unix socket, is not ours to unlink: whoever made it removes it.
        """
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            path = path.decode(errors="replace") if isinstance(path, bytes) else path
            address = f"nbd+unix:///?socket={path}" if path else "an inherited unnamed Unix socket"
        else:
            host, port = sock.getsockname()[:2]
            address = f"nbd://{'[' + host + ']' if ':' in host else host}:{port}"
        self.addresses.append(address)
        self._start_acceptor(sock)
        return address

    def _start_acceptor(self, sock: socket.socket) -> None:
        self._listeners.append(sock)
        what = f"NBD listener {self.addresses[-1]}"
        thread = threading.Thread(
            target=accept_loop,
            args=(sock, self._accepted, lambda: self._stopping, what),
            name="buselab-accept",
            daemon=True,
        )
        thread.start()

    def _accepted(self, sock: socket.socket) -> None:
        # Accepting stays cheap (a thread start) so a burst of clients drains the backlog
        # fast; everything else about the client is set up on its own thread.
        self._start(self._serve_accepted, sock)

    def _serve_accepted(self, sock: socket.socket) -> None:
        try:
            if sock.family == socket.AF_UNIX:
                peer = "unix socket"
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = peer_name(sock)
            conn = Connection(sock, self.engine, peer, handshake_limit=self.handshake_limit)
        except Exception:  # noqa: BLE001 - e.g. out of memory: this client is refused, the server goes on
            log.exception("could not set up a connection")
            sock.close()
            return
        if self._track(conn):
            self._run(conn)

    def serve_socket(self, sock: socket.socket, peer: str, *, kernel: bool = False) -> Connection:
        """Serve an already-connected socket on its own thread."""
        conn = Connection(sock, self.engine, peer, kernel=kernel)
        if self._track(conn):
            self._start(self._run, conn)
        return conn

    def _start(self, target, arg) -> None:
        def run() -> None:
            try:
                target(arg)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        with _stack_size_lock:
            old = threading.stack_size(_CONNECTION_STACK)
            try:
                thread = threading.Thread(target=run, name="buselab-conn", daemon=True)
                with self._lock:
                    self._threads.add(thread)
                thread.start()
            finally:
                threading.stack_size(old)

    def _track(self, conn: Connection) -> bool:
        """Count the connection as open; False (and closed) if the server is already stopping."""
        with self._lock:
            if not self._stopping:
                self._connections.add(conn)
                return True
        conn.abandon("server stopping")
        return False

    def _run(self, conn: Connection) -> None:
        threading.current_thread().name = f"buselab-conn-{conn.number}"
        try:
            conn.serve()
        except Exception:  # noqa: BLE001 - one broken connection must not take the server down
            log.exception("connection %d failed", conn.number)
        finally:
            with self._lock:
                self._connections.discard(conn)

    # -- stopping -----------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, answer what clients still send with ESHUTDOWN, close; `timeout` in all.

        A client that does not read its replies would keep its thread in sendmsg for ever:
        once the time is up its socket is shut both ways, which ends the send at once.
        """
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        # Requests still arriving are answered without running: the spec's soft disconnect.
        self.engine.gate.refuse(c.ESHUTDOWN)
        for sock in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        for conn in connections:
            try:
                # Reading stops once what the client already sent is read (and answered
                # ESHUTDOWN); the reply to a request in progress still goes out.
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if not self._join(deadline):
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._join(time.monotonic() + 1.0)

    def _join(self, deadline: float) -> bool:
        """Wait for the connection threads until `deadline`; True if all have ended."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)
