"""buselab's own NBD client: fixed newstyle, NBD_OPT_GO, simple and structured replies.

Two ways to talk to a server over one connection:

- `NBDClient`: synchronous, one request at a time, simple replies. The demo
  workload and the tests use it to send exactly the bytes they mean to.
- `Pipeline`: many requests in flight from many threads, replies matched by
  cookie (handle) and read by the waiting threads themselves; structured
  replies (READ in chunks and holes, BLOCK_STATUS for base:allocation) when
  the server agrees to them. The proxy backend (`buselab nbd URI`) is built on it.

`parse_nbd_uri` reads the URIs libnbd and nbdkit use (`nbd://host:port/name`,
`nbd+unix:///name?socket=PATH`). TLS (`nbds://`) and extended headers are not
spoken. Real clients (qemu, nbdcopy, nbdfuse, the kernel) are tested separately.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError
from .protocol import constants as c
from .protocol.transmission import encode_request

DEFAULT_PORT = 10809


class NBDError(Exception):
    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"{what} failed: {c.ERRNO_NAMES.get(errno, errno)}")
        self.errno = errno


class HandshakeError(ConnectionError):
    """The server would not give us the export: the message is one line saying why."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        # MSG_WAITALL: one system call (and one GIL round trip) for a whole payload, not one
        # per socket-buffer's worth (a 1 MiB read from a Unix socket came in 5 or more pieces).
        got = sock.recv_into(view[pos:], 0, socket.MSG_WAITALL)
        if not got:
            raise ConnectionError("the server closed the connection")
        pos += got


# --- where a server is ------------------------------------------------------------------------


@dataclass(frozen=True)
class NbdUri:
    """An NBD server's address and export, parsed from a URI (see `parse_nbd_uri`)."""

    text: str  # as the user wrote it, for messages
    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None

    def __str__(self) -> str:
        return self.text

    def connect(self, timeout: float | None = None) -> socket.socket:
        """A connected socket to the server (TCP with NODELAY and keepalive, or Unix)."""
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host or "localhost", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
        return sock


def _keepalive(sock: socket.socket) -> None:
    """A server host that vanishes without a reset is noticed in about 30 s, not never."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4), ("TCP_USER_TIMEOUT", 30000)):
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass


def parse_nbd_uri(text: str) -> NbdUri:
    """`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH` -> NbdUri; UserError in one line.

    As in the NBD URI specification (libnbd's `nbd_connect_uri`): the export is
    the path without its leading '/', percent-decoded; the port defaults to 10809.
    """
    text = str(text).strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise UserError(f"bad NBD URI {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock"):
        raise UserError(f"{text}: TLS (nbds://) is not supported; use nbd:// or nbd+unix:// (a TLS proxy in front)")
    if scheme == "nbd+vsock":
        raise UserError(f"{text}: vsock is not supported; use nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH")
    if scheme not in ("nbd", "nbd+unix"):
        raise UserError(
            f"bad NBD URI {text!r}: use nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH (as nbdinfo takes)"
        )
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme == "nbd+unix":
        paths = query.get("socket") or []
        if len(paths) != 1 or not paths[0]:
            raise UserError(
                f"bad NBD URI {text!r}: nbd+unix:// needs one ?socket=PATH, like nbd+unix:///?socket=/tmp/s"
            )
        if parts.netloc:
            raise UserError(f"bad NBD URI {text!r}: nbd+unix:// takes no host (write nbd+unix:///NAME?socket=PATH)")
        return NbdUri(text, export, socket_path=paths[0])
    if "socket" in query:
        raise UserError(f"bad NBD URI {text!r}: ?socket= goes with nbd+unix://, not nbd://")
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"bad NBD URI {text!r}: the port must be a number from 1 to 65535") from None
    host = parts.hostname or "localhost"
    return NbdUri(text, export, host=host, port=port or DEFAULT_PORT)


# --- the handshake -------------------------------------------------------------------------------


@dataclass
class Export:
    """What the handshake learned about the export."""

    size: int
    flags: int  # transmission flags (c.TF_*)
    structured: bool = False  # structured replies agreed
    contexts: dict[str, int] = field(default_factory=dict)  # meta context name -> id
    min_block: int = 1
    preferred_block: int = c.PREFERRED_BLOCK_SIZE
    max_block: int = c.MAX_PAYLOAD  # the spec's safe maximum when the server says nothing


_REFUSALS = {
    c.REP_ERR_UNKNOWN: "it has no export of that name",
    c.REP_ERR_TLS_REQD: "it requires TLS, which buselab does not speak",
    c.REP_ERR_POLICY: "it refused by policy",
    c.REP_ERR_SHUTDOWN: "it is shutting down",
    c.REP_ERR_BLOCK_SIZE_REQD: "it requires block size negotiation",
}


def _option(sock: socket.socket, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option and collect its replies up to the final one (ACK or an error)."""
    sock.sendall(c.OPTION_HEADER.pack(c.IHAVEOPT, option, len(data)) + data)
    replies = []
    while True:
        magic, _opt, rtype, length = c.OPTION_REPLY.unpack(_recv_exact(sock, 20))
        if magic != c.OPTION_REPLY_MAGIC:
            raise HandshakeError("the server sent a malformed option reply")
        if length > 16 << 20:
            raise HandshakeError(f"the server sent an option reply of {length} bytes")
        replies.append((rtype, _recv_exact(sock, length)))
        if rtype == c.REP_ACK or rtype & c.REP_FLAG_ERROR:
            return replies


def handshake(
    sock: socket.socket,
    export_name: str = "",
    *,
    structured: bool = False,
    contexts: tuple[str, ...] = (),
    block_size: bool = False,
) -> Export:
    """Fixed-newstyle negotiation up to NBD_OPT_GO; HandshakeError (one line) if refused.

    `structured` asks for structured replies and then for the meta `contexts`
    (base:allocation); a server that declines gets simple replies. `block_size`
    asks for the server's block size constraints.
    """
    magic, opt, hflags = struct.unpack(">QQH", _recv_exact(sock, 18))
    if magic != c.NBDMAGIC:
        raise HandshakeError("not an NBD server")
    if opt != c.IHAVEOPT or not hflags & c.FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("not a fixed-newstyle NBD server (an oldstyle server is not supported)")
    sock.sendall(struct.pack(">I", c.CLIENT_FLAG_FIXED_NEWSTYLE | (hflags & c.FLAG_NO_ZEROES)))
    name = export_name.encode()
    agreed: dict[str, int] = {}
    if structured:
        structured = _option(sock, c.OPT_STRUCTURED_REPLY)[-1][0] == c.REP_ACK
    if structured and contexts:
        queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in contexts)
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries
        for rtype, payload in _option(sock, c.OPT_SET_META_CONTEXT, data):
            if rtype == c.REP_META_CONTEXT and len(payload) >= 4:
                agreed[payload[4:].decode(errors="replace")] = struct.unpack_from(">I", payload)[0]
    infos = [c.INFO_BLOCK_SIZE] if block_size else []
    data = struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    export: Export | None = None
    blocks: tuple[int, int, int] | None = None
    for rtype, payload in _option(sock, c.OPT_GO, data):
        if rtype & c.REP_FLAG_ERROR:
            shown = repr(export_name) if export_name else "'' (the default)"
            why = _REFUSALS.get(rtype, f"error {rtype & ~c.REP_FLAG_ERROR}")
            message = payload.decode(errors="replace").strip()
            raise HandshakeError(f"the server refused export {shown}: {why}" + (f" ({message})" if message else ""))
        if rtype == c.REP_INFO and len(payload) >= 2:
            info = struct.unpack_from(">H", payload)[0]
            if info == c.INFO_EXPORT and len(payload) == 12:
                _, size, flags = struct.unpack(">HQH", payload)
                export = Export(size, flags)
            elif info == c.INFO_BLOCK_SIZE and len(payload) == 14:
                blocks = struct.unpack_from(">III", payload, 2)
    if export is None:
        raise HandshakeError("the server sent no export information")
    export.structured = structured
    export.contexts = agreed
    if blocks is not None:
        export.min_block, export.preferred_block = blocks[0] or 1, blocks[1] or c.PREFERRED_BLOCK_SIZE
        export.max_block = min(blocks[2] or c.MAX_PAYLOAD, c.MAX_PAYLOAD)
    return export


# --- one request at a time ----------------------------------------------------------------------


class NBDClient:
    def __init__(self, sock: socket.socket, export_name: str = "") -> None:
        self.sock = sock
        self._handles = itertools.count(1)
        export = handshake(sock, export_name)
        self.size, self.flags = export.size, export.flags

    @classmethod
    def connect_unix(cls, path: str, export_name: str = "") -> NBDClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, export_name)

    @classmethod
    def connect_tcp(cls, host: str, port: int, export_name: str = "") -> NBDClient:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, export_name)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes | None = None) -> int:
        handle = next(self._handles)
        header = encode_request(cmd, handle, offset, length, flags)
        if payload is None:
            self.sock.sendall(header)
        else:
            self.sock.sendall(header + payload if len(payload) < 65536 else header)
            if len(payload) >= 65536:
                self.sock.sendall(payload)
        return handle

    def _reply(self, handle: int, what: str) -> None:
        magic, error, got = c.SIMPLE_REPLY.unpack(_recv_exact(self.sock, 16))
        if magic != c.SIMPLE_REPLY_MAGIC or got != handle:
            raise ConnectionError(f"unexpected reply to {what}")
        if error:
            raise NBDError(error, what)

    def read(self, offset: int, length: int) -> bytes:
        handle = self._request(c.CMD_READ, offset, length)
        self._reply(handle, f"READ {offset}+{length}")
        return _recv_exact(self.sock, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        handle = self._request(c.CMD_WRITE, offset, len(data), c.CMD_FLAG_FUA if fua else 0, data)
        self._reply(handle, f"WRITE {offset}+{len(data)}")

    def flush(self) -> None:
        self._reply(self._request(c.CMD_FLUSH, 0, 0), "FLUSH")

    def trim(self, offset: int, length: int) -> None:
        self._reply(self._request(c.CMD_TRIM, offset, length), f"TRIM {offset}+{length}")

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        flags = c.CMD_FLAG_NO_HOLE if no_hole else 0
        self._reply(self._request(c.CMD_WRITE_ZEROES, offset, length, flags), f"WRITE_ZEROES {offset}+{length}")

    def close(self) -> None:
        try:
            self._request(c.CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- many requests in flight -------------------------------------------------------------------


class ConnectionLost(ConnectionError):
    """The connection is gone (or was never usable): every request on it fails with this reason."""


class Reply:
    """One request in flight, filled in by whichever thread reads its reply off the socket."""

    __slots__ = ("cmd", "offset", "length", "finished", "wake", "errno", "data", "extents", "lost")

    def __init__(self, cmd: int, offset: int, length: int) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.finished = False
        # Set when the reply is in (finished) or when it is this request's turn to read replies.
        self.wake = threading.Event()
        self.errno = 0
        # Reads land here straight from the socket; bytearray(n) starts zeroed, so holes need no work.
        self.data: bytearray | None = bytearray(length) if cmd == c.CMD_READ else None
        self.extents: list[tuple[int, int]] = []
        self.lost: str | None = None


class Pipeline:
    """One connection carrying requests from many threads at once.

    Senders take turns on the socket, one frame at a time. Replies come in any
    order and are matched by cookie. There is no reader thread: a waiting
    request reads replies itself (leader/follower) - its own and any others that
    come first, which it hands to their threads - and when its own is in, it
    passes the reading on to another waiting request. With one request in
    flight, the reply goes from the socket to the thread that wants it with no
    thread switch, which is what keeps a proxied 1 MiB read cheap.

    A small watcher thread sleeps in poll() for a hang-up only, so a server that
    goes away is noticed at once, not at the next request. When the connection
    breaks, every request in flight and every later one fails with
    `ConnectionLost` and the reason, and `on_lost` is told once.
    """

    def __init__(
        self,
        sock: socket.socket,
        export: Export,
        name: str = "nbd upstream",
        on_lost: Callable[[Pipeline, str], None] | None = None,
    ) -> None:
        self.sock = sock
        self.export = export
        self.on_lost = on_lost  # called once, from the thread that noticed, when the connection breaks
        self._context = export.contexts.get(c.BASE_ALLOCATION)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()  # held by the one thread reading replies
        self._lock = threading.Lock()
        self._pending: dict[int, Reply] = {}
        self._cookies = itertools.count(1)
        self._head = bytearray(20)
        self.lost: str | None = None
        self._watcher = threading.Thread(target=self._watch, name=f"{name} watch", daemon=True)
        self._watcher.start()

    @classmethod
    def open(
        cls, uri: NbdUri, *, timeout: float = 10.0, on_lost: Callable[[Pipeline, str], None] | None = None
    ) -> Pipeline:
        """Connect and negotiate (structured replies, base:allocation, block sizes) within `timeout`."""
        sock = uri.connect(timeout)
        try:
            export = handshake(sock, uri.export, structured=True, contexts=(c.BASE_ALLOCATION,), block_size=True)
            sock.settimeout(None)  # from now on a slow server is waited for; a dead one breaks the socket
        except BaseException:
            sock.close()
            raise
        return cls(sock, export, name=str(uri), on_lost=on_lost)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def block_status(self) -> bool:
        """Can this connection ask for base:allocation extents?"""
        return self._context is not None

    def call(self, cmd: int, offset: int, length: int, flags: int = 0, payload: object = None) -> Reply:
        """Send one request and wait for its reply. ConnectionLost if the connection is (or goes) away."""
        reply = Reply(cmd, offset, length)
        with self._lock:
            if self.lost is not None:
                raise ConnectionLost(self.lost)
            cookie = next(self._cookies)
            self._pending[cookie] = reply  # before sending: another thread may read the reply first
        header = encode_request(cmd, cookie, offset, length, flags)
        try:
            with self._send_lock:
                if payload is None:
                    self.sock.sendall(header)
                elif length < 65536:
                    self.sock.sendall(header + bytes(payload))  # type: ignore[call-overload]
                else:
                    self.sock.sendall(header)
                    self.sock.sendall(payload)  # type: ignore[call-overload]
        except OSError as exc:
            self._break(f"sending failed: {exc.strerror or exc}")
        self._await(reply)
        if reply.lost is not None:
            raise ConnectionLost(reply.lost)
        return reply

    def _await(self, reply: Reply) -> None:
        while not reply.finished:
            if self._recv_lock.acquire(blocking=False):
                broken = None
                try:
                    while not reply.finished:
                        self._read_one()
                except Exception as exc:  # noqa: BLE001 - whatever broke, the connection is done
                    broken = exc
                finally:
                    self._recv_lock.release()
                if broken is not None:
                    self._break(_reason(broken))  # outside the lock: on_lost may close this pipeline
                    return
                self._pass_on()
            else:
                reply.wake.wait()
                reply.wake.clear()

    def _pass_on(self) -> None:
        """The reader is leaving: wake a request still waiting, to read next (after the release)."""
        with self._lock:
            waiting = next((r for r in self._pending.values() if not r.finished), None)
        if waiting is not None:
            waiting.wake.set()

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close; requests still waiting fail."""
        with self._lock:
            lost = self.lost
        if lost is None:
            try:
                with self._send_lock:
                    self.sock.sendall(encode_request(c.CMD_DISC, 0, 0, 0))
            except OSError:
                pass
        self._break("closed", notify=False)
        with self._recv_lock:  # a reader still in recv() got EOF from the shutdown; wait for it to leave
            pass
        if threading.current_thread() is not self._watcher:
            self._watcher.join(timeout=5)
        self.sock.close()

    def _break(self, reason: str, *, notify: bool = True) -> None:
        with self._lock:
            first = self.lost is None
            if first:
                self.lost = reason
            pending, self._pending = self._pending, {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader in recv() and the watcher
        except OSError:
            pass
        for reply in pending.values():
            reply.lost = self.lost
            reply.finished = True
            reply.wake.set()
        if first and notify and self.on_lost is not None:
            self.on_lost(self, reason)

    def _watch(self) -> None:
        """Sleep until the server hangs up (not on data: readers take that), then break the connection."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)  # POLLHUP and POLLERR come anyway
        try:
            while not poller.poll():
                pass
        except OSError:
            pass
        self._break("the server closed the connection")

    def _take(self, cookie: int) -> Reply:
        with self._lock:
            reply = self._pending.get(cookie)
        if reply is None:
            raise ConnectionError(f"the server answered a request never sent (cookie {cookie})")
        return reply

    def _finish(self, cookie: int) -> None:
        with self._lock:
            reply = self._pending.pop(cookie, None)
        if reply is not None:
            reply.finished = True
            reply.wake.set()

    def _read_one(self) -> None:
        """Read one reply (or one structured chunk) and hand it to its request."""
        head = self._head
        view = memoryview(head)
        _recv_into(self.sock, view[:16])
        magic = struct.unpack_from(">I", head)[0]
        if magic == c.SIMPLE_REPLY_MAGIC:
            _, error, cookie = c.SIMPLE_REPLY.unpack_from(head)
            reply = self._take(cookie)
            if error:
                reply.errno = error
            elif reply.data is not None:
                _recv_into(self.sock, memoryview(reply.data))
            self._finish(cookie)
        elif magic == c.STRUCTURED_REPLY_MAGIC:
            _recv_into(self.sock, view[16:20])
            _, rflags, rtype, cookie, length = c.STRUCTURED_REPLY.unpack_from(head)
            reply = self._take(cookie)
            self._chunk(reply, rtype, length)
            if rflags & c.REPLY_FLAG_DONE:
                self._finish(cookie)
        else:
            raise ConnectionError(f"the server sent a reply with bad magic {magic:#x}")

    def _chunk(self, reply: Reply, rtype: int, length: int) -> None:
        """Take one structured reply chunk's payload off the socket into `reply`."""
        if rtype == c.REPLY_TYPE_OFFSET_DATA and reply.data is not None and length >= 8:
            offset = struct.unpack(">Q", _recv_exact(self.sock, 8))[0]
            start = offset - reply.offset
            if start < 0 or start + length - 8 > reply.length:
                raise ConnectionError("the server sent read data outside the request")
            _recv_into(self.sock, memoryview(reply.data)[start : start + length - 8])
            return
        payload = _recv_exact(self.sock, length)
        if rtype == c.REPLY_TYPE_OFFSET_HOLE and reply.data is not None and length == 12:
            offset, hole = struct.unpack(">QI", payload)
            start = offset - reply.offset
            if start < 0 or start + hole > reply.length:
                raise ConnectionError("the server sent a hole outside the request")
            reply.data[start : start + hole] = bytes(hole)  # zero it (a retried buffer may hold data)
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS and length >= 4:
            if struct.unpack_from(">I", payload)[0] == self._context:
                pairs = struct.iter_unpack(">II", payload[4 : 4 + (length - 4) // 8 * 8])
                reply.extents.extend((n, f) for n, f in pairs)
        elif rtype & 0x8000:  # an error chunk (ERROR, ERROR_OFFSET, or one we do not know)
            error = struct.unpack_from(">I", payload)[0] if length >= 4 else c.EIO
            reply.errno = reply.errno or error or c.EIO


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
