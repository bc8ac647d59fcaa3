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
import os
import socket
import struct
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
    encode_structured_done,
    encode_structured_error,
    encode_structured_read_header,
)
from .affinity import serving_threads

log = logging.getLogger("buselab")

_REQUEST = c.REQUEST
_SIMPLE = c.SIMPLE_REPLY
_REQUEST_MAGIC = c.REQUEST_MAGIC
_SIMPLE_MAGIC = c.SIMPLE_REPLY_MAGIC
_READ, _WRITE, _DISC = c.CMD_READ, c.CMD_WRITE, c.CMD_DISC
_HEADER = c.REQUEST.size
_MAX_PAYLOAD = c.MAX_PAYLOAD
_DISCARD_CHUNK = 1 << 20
# Writes of up to _SMALL_WRITE are parsed where they were received: the backend copies
# the payload straight out of the receive buffer. Bigger ones are assembled in a buffer
# of their own, which costs a copy of whatever part had been received with the header.
# The buffer is anonymous memory: only what a client's requests reach becomes resident.
_SMALL_WRITE = 1 << 20
# The receive buffer starts small (an idle or handshaking client costs little) and grows,
# once, as far as the client's requests need: a burst of pipelined requests, or a few
# whole 1 MiB writes.
_RECV_BUFFER_START = 64 << 10
_RECV_BUFFER = 4 * _SMALL_WRITE
_SPIN = float(os.environ.get("BUSELAB_SPIN_US", "50")) / 1e6
_DONTWAIT = socket.MSG_DONTWAIT
# Poll only while the client's requests usually come this soon after we wait
# for them (sleeping and waking adds tens of microseconds to what we see).
_POLL_IF_WAITS_UNDER = 4 * _SPIN
_MAX_QUEUED_PARTS = 512  # below IOV_MAX (1024): one sendmsg per batch
_PARALLEL_MIN = 64 * 1024  # bytes: smaller requests of a parallel backend run inline (see _transmission)
_REPLY_HOLD = 0.001  # seconds a batch's replies may wait for the rest of it (see _transmission)
_REPLY_MAGICS = (struct.pack(">I", c.SIMPLE_REPLY_MAGIC), struct.pack(">I", c.STRUCTURED_REPLY_MAGIC))


class ClientGone(Exception):
    """The peer closed the socket (or it broke) while we were reading."""


class Connection:
    def __init__(
        self,
        sock: socket.socket,
        engine: Engine,
        peer: str,
        *,
        kernel: bool = False,
        handshake_limit: float | None = None,
    ) -> None:
        self.sock = sock
        sock.settimeout(None)  # blocking: the poll in _fill relies on MSG_DONTWAIT alone to return at once
        self.handshake_limit = handshake_limit  # seconds a client has to finish the handshake
        self.engine = engine
        self.peer = peer
        self.kernel = kernel  # kernel clients skip the handshake and never want structured replies
        self.structured = False
        self.meta_contexts: dict[int, str] = {}
        self.tflags = engine.flags
        self.number = engine.telemetry.connection_opened(peer)
        self._send_lock = threading.Lock()
        # executing: a request of ours is in the backend; unrecorded: a reply is sent and its
        # bookkeeping not yet done. Engine.quiesce and Engine.settle wait on them (see InFlight).
        self.slot = engine.inflight.open(f"connection {self.number}")
        # Requests of ours running on the engine's workers (a parallel backend: see _dispatch).
        self._workers_slot = engine.inflight.open(f"connection {self.number} workers")
        self._workers_idle = threading.Condition()
        self._prefix = b""  # bytes read past the handshake
        # Anonymous memory: pages become resident only as they are used.
        self._recv_view = memoryview(mmap.mmap(-1, _RECV_BUFFER_START))
        self._pos = self._end = 0  # unread bytes are _recv_view[_pos:_end]
        self._payload_view: memoryview | None = None  # large writes land here whole: see _payload
        self._out: list = []  # reply parts not sent yet
        self._usual_wait = 0.0  # seconds, a moving average: see _fill
        # perf_counter when the last receive completed: the arrival of the requests it completed,
        # and their start in telemetry (so a request's latency includes waiting in our buffer).
        self._arrived = time.perf_counter()
        self.closed_reason = ""
        engine.telemetry.watch(self.number, self.requests_waiting)

    # -- the whole life of a connection -----------------------------------------
    def serve(self) -> None:
        reason = "client disconnected"
        try:
            if not self.kernel:
                try:
                    negotiated = self._handshake()
                except TimeoutError:
                    reason = f"handshake not finished within {self.handshake_limit:g} s"
                    log.warning("connection %d (%s): %s; closing it", self.number, self.peer, reason)
                    return
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
            # str(exc), not exc: a log record that holds the exception holds its traceback and so
            # this connection and its buffers, for as long as a handler keeps the record.
            log.warning("connection %d (%s): %s; closing it", self.number, self.peer, str(exc))
        except OSError as exc:
            reason = f"socket error: {exc.strerror or exc}"
        finally:
            # Also when a tap raised mid-request: nothing of ours may keep quiesce or settle waiting.
            serving_threads.leave()
            self._closed(reason)

    def abandon(self, reason: str) -> None:
        """Close a connection that will never be served (the server is stopping)."""
        self._closed(reason)

    def _closed(self, reason: str) -> None:
        self._drain_workers(5.0)  # their replies go out before the socket closes
        self.engine.inflight.close(self.slot)
        self.engine.inflight.close(self._workers_slot)
        self.closed_reason = reason
        for held in self.engine.gate.forget_connection(self):
            self.engine.telemetry.event(f"dropped held {held.req.name} of closed connection {self.number}")
        self.engine.telemetry.connection_closed(self.number, reason)
        try:
            self.sock.close()
        except OSError:
            pass
        self._recv_view = memoryview(b"")  # the buffers go with the last view of them
        self._payload_view = None

    def _handshake(self) -> Negotiated | None:
        """Haggle options; TimeoutError if the client takes longer than the handshake limit."""
        hs = ServerHandshake(self.engine.lookup)
        sock = self.sock
        deadline = None if self.handshake_limit is None else time.monotonic() + self.handshake_limit
        try:
            if deadline is not None:
                sock.settimeout(self.handshake_limit)
            sock.sendall(hs.data_to_send())
            while hs.state not in (State.DONE, State.CLOSED):
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                data = sock.recv(65536)
                hs.receive_data(data)
                out = hs.data_to_send()
                if out:
                    sock.sendall(out)
        finally:
            sock.settimeout(None)
        if hs.state is State.CLOSED:
            if hs.close_kind is None or not hs.close_kind.client_chose:
                log.warning("connection %d (%s): handshake failed: %s", self.number, self.peer, hs.close_reason)
            self.engine.telemetry.event(f"connection {self.number}: {hs.close_reason}")
            return None
        self._prefix = hs.leftover
        return hs.negotiated

    # -- reading ----------------------------------------------------------------
    def _fill(self, need: int, what: str) -> None:
        """Make at least `need` unread bytes available in the receive buffer.

        Replies still queued go out first: we are about to block, and the
        client may be waiting for them before it sends more.
        """
        if self._out:
            self._flush_replies()
        view = self._recv_view
        pos, end = self._pos, self._end
        if need > len(view):
            view = self._grow(need)
            pos, end = self._pos, self._end
        elif pos and pos + need > len(view):
            # Move the unread tail to the front, but only when what we need would not fit
            # after it: a big write's partial payload is moved once per trip round the
            # buffer, not on every request.
            n = end - pos
            if n:
                view[:n] = view[pos:end]
            pos, end = 0, n
        elif pos == end:
            pos = end = 0  # nothing unread: start again at the front, for free
        recv_into = self.sock.recv_into
        if end - pos >= need:
            self._pos, self._end = pos, end
            return
        perf_counter = time.perf_counter
        waiting_since = perf_counter()
        if self._usual_wait < _POLL_IF_WAITS_UNDER and not self.kernel and serving_threads.alone():
            # Adaptive polling: a client that waits for each reply sends its
            # next request a few tens of microseconds after it; asking for it
            # without sleeping saves the wake-up of this thread (and, in a VM,
            # of its idle CPU), which costs more than the whole request. Only
            # while requests have lately come that fast: a slow or idle client
            # (the demo, an emulated guest) is waited for asleep, burning nothing.
            deadline = waiting_since + _SPIN
            while True:
                try:
                    got = recv_into(view[end:], 0, _DONTWAIT)
                except BlockingIOError:
                    if perf_counter() > deadline:
                        break
                    continue
                if not got:
                    break  # closed: the blocking loop below says so
                end += got
                if end - pos >= need:
                    break
        while end - pos < need:
            got = recv_into(view[end:])
            if not got:
                self._pos, self._end = pos, end
                if end == pos and what == "request":
                    raise ClientGone("client disconnected")
                raise ClientGone(f"client disconnected in the middle of a {what}; nothing of it was applied")
            end += got
        # The requests this receive completed arrived now (one clock reading per receive).
        arrived = self._arrived = perf_counter()
        # A moving average of how long we wait for the client, which decides the polling above.
        self._usual_wait = (3 * self._usual_wait + arrived - waiting_since) / 4
        self._pos, self._end = pos, end

    def _grow(self, need: int) -> memoryview:
        """Replace the receive buffer with one of at least `need` bytes, keeping what is unread."""
        size = len(self._recv_view)
        while size < need:
            size *= 2
        view = memoryview(mmap.mmap(-1, max(size, min(_RECV_BUFFER, 4 * size))))
        n = self._end - self._pos
        view[:n] = self._recv_view[self._pos : self._end]
        # A view of the old buffer may live on (a held request's copy is made from it first);
        # the mmap is unmapped once the last one goes.
        self._recv_view = view
        self._pos, self._end = 0, n
        return view

    def _payload(self, length: int) -> memoryview:
        """The buffer large writes are assembled in, mapped the first time one comes."""
        if self._payload_view is None:
            self._payload_view = memoryview(mmap.mmap(-1, c.MAX_PAYLOAD))
        return self._payload_view[:length]

    def _take(self, dest: memoryview, what: str) -> None:
        """Fill `dest` with the next len(dest) bytes: first buffered, then straight from the socket."""
        have = min(self._end - self._pos, len(dest))
        if have:
            dest[:have] = self._recv_view[self._pos : self._pos + have]
            self._pos += have
        if have < len(dest):
            if self._out:
                self._flush_replies()
            pos = have
            recv_into = self.sock.recv_into
            while pos < len(dest):
                got = recv_into(dest[pos:])
                if not got:
                    raise ClientGone(f"client disconnected in the middle of a {what}; nothing of it was applied")
                pos += got

    def _discard(self, length: int) -> None:
        """Skip an oversized payload without holding it in memory."""
        while length:
            n = min(length, _DISCARD_CHUNK)
            self._take(self._payload(n), "oversized write payload")
            length -= n

    # -- the request loop ---------------------------------------------------------
    def _transmission(self) -> str:
        """Read requests in batches, run them inline, send their replies together.

        A client with many requests in flight sends them back to back, so one
        recv usually yields several and one sendmsg answers them all: fewer
        system calls and fewer GIL hand-offs per request, which is what limits a
        Python server.
        """
        engine = self.engine
        telemetry = engine.telemetry
        gate = engine.gate
        rec = telemetry.recorder()
        record = telemetry.record
        next_seq = telemetry.next_seq
        execute = engine.execute
        stack = engine.stack
        now = time.perf_counter
        unpack = _REQUEST.unpack_from
        view = self._recv_view
        out = self._out
        number = self.number
        pack_simple = _SIMPLE.pack
        structured = self.structured
        writable = not self.tflags & c.TF_READ_ONLY
        fua_ok = c.CMD_FLAG_FUA if self.tflags & c.TF_SEND_FUA else 0
        slot = self.slot
        inflight = engine.inflight
        if not self.kernel:
            # Network connections only: the kernel's nbd driver spreads its requests
            # over its connections by CPU, and in the VM tests pinned kernel
            # connections once left a request unanswered (not understood; left alone).
            serving_threads.enter()
        if self._prefix:
            if len(self._prefix) > len(view):
                view = self._grow(len(self._prefix))
            view[: len(self._prefix)] = self._prefix
            self._end = len(self._prefix)
            self._prefix = b""
        arrived = self._arrived = now()  # for requests that came with the end of the handshake
        while True:
            if self._end - self._pos < _HEADER:
                self._fill(_HEADER, "request")
                view = self._recv_view  # _fill may have grown it
                arrived = self._arrived
            pos = self._pos
            magic, flags, cmd, handle, offset, length = unpack(view, pos)
            if magic != _REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#010x}")
            req = Request(flags, cmd, handle, offset, length)
            if cmd == _WRITE:
                if length > c.MAX_PAYLOAD:
                    self._pos = pos + _HEADER
                    self._discard(length)
                elif length <= _SMALL_WRITE:
                    if self._end - pos < _HEADER + length:
                        self._fill(_HEADER + length, f"{length}-byte WRITE")
                        pos = self._pos
                        view = self._recv_view  # _fill may have grown it
                        arrived = self._arrived
                    req.payload = view[pos + _HEADER : pos + _HEADER + length]
                    self._pos = pos + _HEADER + length
                else:
                    self._pos = pos + _HEADER
                    req.payload = self._payload(length)
                    self._take(req.payload, f"{length}-byte WRITE")
            else:
                self._pos = pos + _HEADER
            # Its arrival, not now: requests read together wait for each other, and that is
            # time in buselab (a clock reading per request would also cost more).
            start = arrived
            if cmd == _DISC:
                self._flush_replies()
                self._drain_workers()
                return "client sent DISC"
            # The common case -- a READ or WRITE in range with no flag but an
            # advertised FUA -- needs none of check_request's questions.
            if (
                (cmd == _READ or (cmd == _WRITE and writable))
                and not flags & ~fua_ok
                and length <= _MAX_PAYLOAD
                and offset + length <= engine.size
            ):
                error = 0
            else:
                error = check_request(req, engine.size, self.tflags, self.structured, len(self.meta_contexts))
            if error:
                data = None
            else:
                slot.executing = 1  # before looking at the gate: see Engine.quiesce
                if gate.paused and gate.hold(req, self, start):
                    slot.executing = 0
                    if inflight.waiters:
                        inflight.wake()
                    continue
                if stack.parallel and length >= _PARALLEL_MIN and self._end - self._pos >= _HEADER:
                    # A backend that waits (a proxy), a big request and more behind it: it runs
                    # on a worker, so they overlap, and its reply goes out when it is done, in
                    # any order, as NBD allows. Small ones and the last of a batch run here: for
                    # them a hand-off (and the GIL's traffic between threads) costs more than the
                    # overlap saves (bench/proxy_bench.py: 4 KiB at iodepth 16 halved).
                    self._dispatch(req, start)
                    slot.executing = 0
                    if inflight.waiters:
                        inflight.wake()
                    continue
                error, data = execute(req)
                slot.executing = 0
                if inflight.waiters:
                    inflight.wake()
            if error or structured:
                out += self._reply_parts(req, error, data)
            elif cmd == _READ:
                out += (pack_simple(_SIMPLE_MAGIC, 0, handle), data)
            else:
                out.append(pack_simple(_SIMPLE_MAGIC, 0, handle))
            end = now()
            # No further request is buffered: we would send the replies before waiting anyway,
            # so send them before the bookkeeping below, which a client waiting for this reply
            # (iodepth 1, the kernel's sync I/O) need not wait for. Not while a trace is being
            # recorded: a read's data is a view of the disk, and a write another client sends
            # once it has this reply could change it before the recorder takes its hash.
            early = self._end - self._pos < _HEADER and not telemetry.taps
            seq = 0
            if early:
                slot.unrecorded = 1
                seq = next_seq()  # before the reply: see Telemetry.next_seq
                self._flush_replies()
            record(
                rec,
                cmd,
                flags,
                offset,
                length,
                start,
                end,
                error,
                number,
                handle,
                data if cmd == _READ else req.payload,
                seq,
            )
            if early:
                slot.unrecorded = 0
                if inflight.waiters:
                    inflight.wake()
            # A batch of fast requests answers together; one that has run for a while (a delay
            # filter, a slow backend) sends each reply as it is ready, or the first request's
            # client would wait for all the others while its latency said it had not.
            if len(out) >= _MAX_QUEUED_PARTS or end - arrived > _REPLY_HOLD:
                self._flush_replies()

    # -- requests on workers (a parallel backend) -----------------------------------
    def _dispatch(self, req: Request, start: float) -> None:
        if req.payload is not None:
            req.payload = bytes(req.payload)  # the receive buffer is reused for the next requests
        with self._workers_idle:
            self._workers_slot.executing += 1  # quiesce waits for it from now, as for our own
        self.engine.workers().submit(self._work, req, start)

    def _work(self, req: Request, start: float) -> None:
        try:
            error, data = self.engine.execute(req)
            self.complete(req, start, error, data)
        finally:
            with self._workers_idle:
                self._workers_slot.executing -= 1
                self._workers_idle.notify_all()
            if self.engine.inflight.waiters:
                self.engine.inflight.wake()

    def _drain_workers(self, timeout: float = 30.0) -> None:
        """Wait until our requests on workers are answered (DISC, or the connection ends)."""
        with self._workers_idle:
            self._workers_idle.wait_for(lambda: not self._workers_slot.executing, timeout)

    def requests_waiting(self) -> int:
        """Requests read from the socket and not answered yet, the gate's held ones apart.

        For the lab and `ctl status` (Telemetry.in_flight_now), from another thread and off
        the serve path: replies queued and not sent yet (a batch's replies go out together),
        the request in hand, and the ones whose header waits in the receive buffer, walked
        header by header. The serving thread may move the buffer meanwhile, so the count can
        be off by a few (a header that no longer parses ends the walk); it changes nothing.
        """
        view, pos, end = self._recv_view, self._pos, self._end
        n = self.slot.executing
        for part in list(self._out):  # one reply header (bytes, starting with a magic) per reply
            if type(part) is bytes and part[:4] in _REPLY_MAGICS:
                n += 1
        unpack = _REQUEST.unpack_from
        try:
            while end - pos >= _HEADER and n < 65536:
                magic, _, cmd, _, _, length = unpack(view, pos)
                if magic != _REQUEST_MAGIC:
                    break
                pos += _HEADER + length if cmd == _WRITE else _HEADER
                n += 1
        except (ValueError, IndexError, TypeError, struct.error):  # a buffer replaced meanwhile
            pass
        return n

    # -- replies ------------------------------------------------------------------
    def complete(self, req: Request, start: float, error: int, data: object) -> None:
        """Reply and record; called from any thread (the gate's, for held requests).

        Recorded before the reply leaves: the request's seq then comes before any a client
        sends once it has the reply, a recorder hashes the data it gets, and no reply is
        out before it is counted (so nothing here for Engine.settle to wait on).
        """
        telemetry = self.engine.telemetry
        try:
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
        finally:  # a tap that raised must not leave the client without its answer
            try:
                parts = self._reply_parts(req, error, data)
                with self._send_lock:
                    self._sendmsg_all(parts)
            except OSError as exc:
                # The client is gone (its serve loop notices and cleans up), or the reply
                # could not be sent: say so, a client left waiting for it is a hang to explain.
                log.info("connection %d: the reply to a released %s was not sent: %s", self.number, req.name, str(exc))

    def _reply_parts(self, req: Request, error: int, data: object) -> list:
        cmd = req.cmd
        if self.structured and cmd in (_READ, c.CMD_BLOCK_STATUS):
            if error:
                return [encode_structured_error(req.handle, error, c.ERRNO_NAMES.get(error, ""))]
            if cmd == _READ:
                if not req.length:
                    # Every chunk must describe at least one byte: a zero-length read is done
                    # with no data chunk at all.
                    return [encode_structured_done(req.handle)]
                return [encode_structured_read_header(req.handle, req.offset, req.length), data]
            context_id = next(iter(self.meta_contexts))
            return [encode_block_status(req.handle, context_id, data)]  # type: ignore[arg-type]
        if cmd == _READ and not error:
            return [_SIMPLE.pack(_SIMPLE_MAGIC, 0, req.handle), data]
        # An error reply never carries data (BUSE's bug #12 sent it anyway).
        return [encode_simple_reply(req.handle, error)]

    def _flush_replies(self) -> None:
        out = self._out
        if not out:
            return
        with self._send_lock:
            for i in range(0, len(out), _MAX_QUEUED_PARTS):
                self._sendmsg_all(out[i : i + _MAX_QUEUED_PARTS])
        out.clear()

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
