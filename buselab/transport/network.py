"""NBD over TCP and Unix sockets: listeners and one thread per connection."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading

from ..engine.engine import Engine
from ..errors import UserError
from .connection import Connection, peer_name

log = logging.getLogger("buselab")
DEFAULT_PORT = 10809


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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._threads: list[threading.Thread] = []
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
        sock.listen(64)
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot listen on {path}: {exc.strerror}") from None
        sock.listen(64)
        self._unix_paths.append(path)
        self.addresses.append(f"nbd+unix:///?socket={path}")
        self._start_acceptor(sock)
        return path

    def _start_acceptor(self, sock: socket.socket) -> None:
        self._listeners.append(sock)
        thread = threading.Thread(target=self._accept_loop, args=(sock,), name="buselab-accept", daemon=True)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.serve_socket(sock, peer_name(sock) if sock.family != socket.AF_UNIX else "unix socket")

    def serve_socket(self, sock: socket.socket, peer: str, *, kernel: bool = False) -> Connection:
        """Serve an already-connected socket on its own thread."""
        conn = Connection(sock, self.engine, peer, kernel=kernel)
        with self._lock:
            self._connections.add(conn)
        thread = threading.Thread(target=self._run, args=(conn,), name=f"buselab-conn-{conn.number}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return conn

    def _run(self, conn: Connection) -> None:
        try:
            conn.serve()
        except Exception:  # noqa: BLE001 - one broken connection must not take the server down
            log.exception("connection %d failed", conn.number)
        finally:
            with self._lock:
                self._connections.discard(conn)

    # -- stopping -----------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let connections finish what they are doing, close them."""
        self._stopping = True
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
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # Reading stops at once; the reply to a request in progress still goes out.
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout)
