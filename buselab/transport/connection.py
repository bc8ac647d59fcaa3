"""Serving one NBD connection: handshake (for network clients), then requests.

One thread per connection reads requests and, on the fast path, runs each one
inline and sends its reply straight away: handing requests between threads is
what makes Python NBD servers slow. Reads go out with `sendmsg([header, data])`
from the backend's own buffer; writes are received into a per-connection
buffer and applied only once complete, so a client that vanishes mid-payload
changes nothing. Held (paused) requests are answered later by the gate's
thread; `complete` serialises replies with a lock, and handles let the client
match replies that come back out of order.
"""

from __future__ import annotations

import logging
import mmap
import socket
import threading
import time

from ..engine.engine import Engine
from ..protocol import constants as c
from ..protocol.handshake import Negotiated, ServerHandshake, State
from ..protocol.transmission import (
    ProtocolError,
    Request,
    check_request,
    encode_block_status,
    encode_simple_reply,
    encode_structured_error,
    encode_structured_read_header,
)

log = logging.getLogger("buselab")

_REQUEST = c.REQUEST
_SIMPLE = c.SIMPLE_REPLY
_REQUEST_MAGIC = c.REQUEST_MAGIC
_SIMPLE_MAGIC = c.SIMPLE_REPLY_MAGIC
_READ, _WRITE, _DISC = c.CMD_READ, c.CMD_WRITE, c.CMD_DISC
_DISCARD_CHUNK = 1 << 20


class ClientGone(Exception):
    """The peer closed the socket (or it broke) while we were reading."""


class Connection:
    def __init__(self, sock: socket.socket, engine: Engine, peer: str, *, kernel: bool = False) -> None:
        self.sock = sock
        self.engine = engine
        self.peer = peer
        self.kernel = kernel  # kernel clients skip the handshake and never want structured replies
        self.structured = False
        self.meta_contexts: dict[int, str] = {}
        self.tflags = engine.flags
        self.number = engine.telemetry.connection_opened(peer)
        self._send_lock = threading.Lock()
        self.busy = False  # a request of ours is in the backend (see Engine.quiesce)
        self._prefix = b""  # bytes read past the handshake
        # Anonymous memory: pages become resident only as large writes use them.
        self._buffer = mmap.mmap(-1, c.MAX_PAYLOAD)
        self._buffer_view = memoryview(self._buffer)
        self.closed_reason = ""

    # -- the whole life of a connection -----------------------------------------
    def serve(self) -> None:
        reason = "client disconnected"
        try:
            if not self.kernel:
                negotiated = self._handshake()
                if negotiated is None:
                    return
                self.structured = negotiated.structured
                self.meta_contexts = negotiated.meta_contexts
                self.tflags = negotiated.export.flags
            reason = self._transmission()
        except ClientGone as exc:
            reason = str(exc) or "client disconnected"
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("connection %d (%s): %s; closing it", self.number, self.peer, exc)
        except OSError as exc:
            reason = f"socket error: {exc.strerror or exc}"
        finally:
            self.closed_reason = reason
            for held in self.engine.gate.forget_connection(self):
                self.engine.telemetry.event(f"dropped held {held.req.name} of closed connection {self.number}")
            self.engine.telemetry.connection_closed(self.number, reason)
            try:
                self.sock.close()
            except OSError:
                pass
            self._buffer_view.release()

    def _handshake(self) -> Negotiated | None:
        hs = ServerHandshake(self.engine.lookup)
        self.sock.sendall(hs.data_to_send())
        while hs.state not in (State.DONE, State.CLOSED):
            data = self.sock.recv(65536)
            hs.receive_data(data)
            out = hs.data_to_send()
            if out:
                self.sock.sendall(out)
        if hs.state is State.CLOSED:
            if "aborted" not in hs.close_reason and "closed the connection" not in hs.close_reason:
                log.warning("connection %d (%s): handshake failed: %s", self.number, self.peer, hs.close_reason)
            self.engine.telemetry.event(f"connection {self.number}: {hs.close_reason}")
            return None
        self._prefix = hs.leftover
        return hs.negotiated

    # -- reading ----------------------------------------------------------------
    def _recv_into(self, view: memoryview, what: str) -> None:
        """Fill `view` completely or raise ClientGone naming what was cut short."""
        pos = 0
        need = len(view)
        if self._prefix:
            n = min(need, len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            pos = n
        recv_into = self.sock.recv_into
        while pos < need:
            n = recv_into(view[pos:] if pos else view)
            if n == 0:
                if pos == 0 and what == "request":
                    raise ClientGone("client disconnected")
                raise ClientGone(f"client disconnected in the middle of a {what}; nothing of it was applied")
            pos += n

    def _discard(self, length: int) -> None:
        """Skip an oversized payload without holding it in memory."""
        while length:
            n = min(length, _DISCARD_CHUNK)
            self._recv_into(self._buffer_view[:n], "oversized write payload")
            length -= n

    # -- the request loop ---------------------------------------------------------
    def _transmission(self) -> str:
        engine = self.engine
        telemetry = engine.telemetry
        gate = engine.gate
        rec = telemetry.recorder()
        record = telemetry.record
        execute = engine.execute
        now = time.perf_counter
        header = bytearray(_REQUEST.size)
        header_view = memoryview(header)
        unpack = _REQUEST.unpack_from
        buffer_view = self._buffer_view
        number = self.number
        engine.connections.add(self)
        while True:
            self._recv_into(header_view, "request")
            magic, flags, cmd, handle, offset, length = unpack(header)
            if magic != _REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#010x}")
            req = Request(flags, cmd, handle, offset, length)
            if cmd == _WRITE:
                if length > c.MAX_PAYLOAD:
                    self._discard(length)
                else:
                    req.payload = buffer_view[:length]
                    self._recv_into(req.payload, f"{length}-byte WRITE")
            start = now()
            if cmd == _DISC:
                return "client sent DISC"
            error = check_request(req, engine.size, self.tflags, self.structured, len(self.meta_contexts))
            if error:
                self.complete(req, start, error, None)
                continue
            self.busy = True  # before looking at the gate: see Engine.quiesce
            if gate.paused and gate.hold(req, self, start):
                self.busy = False
                continue
            error, data = execute(req)
            self.busy = False
            self._send_reply(req, error, data)
            record(
                rec,
                cmd,
                flags,
                offset,
                length,
                start,
                now(),
                error,
                number,
                handle,
                data if cmd == _READ else req.payload,
            )

    # -- replies ------------------------------------------------------------------
    def complete(self, req: Request, start: float, error: int, data: object) -> None:
        """Reply and record; called from any thread (the gate's, for held requests)."""
        try:
            self._send_reply(req, error, data)
        except OSError:
            pass  # the client is gone; its serve loop notices and cleans up
        telemetry = self.engine.telemetry
        telemetry.record(
            telemetry.recorder(),
            req.cmd,
            req.flags,
            req.offset,
            req.length,
            start,
            time.perf_counter(),
            error,
            self.number,
            req.handle,
            data if req.cmd == _READ and not error else req.payload,
        )

    def _send_reply(self, req: Request, error: int, data: object) -> None:
        cmd = req.cmd
        if self.structured and cmd in (_READ, c.CMD_BLOCK_STATUS):
            if error:
                parts = [encode_structured_error(req.handle, error, c.ERRNO_NAMES.get(error, ""))]
            elif cmd == _READ:
                parts = [encode_structured_read_header(req.handle, req.offset, req.length), data]
            else:
                context_id = next(iter(self.meta_contexts))
                parts = [encode_block_status(req.handle, context_id, data)]  # type: ignore[arg-type]
        elif cmd == _READ and not error:
            parts = [_SIMPLE.pack(_SIMPLE_MAGIC, 0, req.handle), data]
        else:
            # An error reply never carries data (BUSE's bug #12 sent it anyway).
            parts = [encode_simple_reply(req.handle, error)]
        with self._send_lock:
            self._sendmsg_all(parts)

    def _sendmsg_all(self, parts: list) -> None:
        sent = self.sock.sendmsg(parts)
        total = sum(len(p) for p in parts)
        if sent == total:
            return
        # Partial send (large reads): finish with sendall on what is left.
        for part in parts:
            n = len(part)
            if sent >= n:
                sent -= n
                continue
            self.sock.sendall(memoryview(part)[sent:])
            sent = 0


def peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return peer or "unix socket"
