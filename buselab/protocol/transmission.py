"""Transmission phase: request headers in, replies out, sans-IO.

The serve loop reads the 28-byte header itself (it must, to know how much
payload follows) and calls `parse_request`; `check_request` says which error a
request earns before any backend sees it; the `encode_*` functions build the
reply bytes. Reads return a header plus a separate payload so the caller can
send the backend's buffer without copying it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as c


class ProtocolError(Exception):
    """The stream cannot be parsed any further; the connection must close."""


@dataclass(slots=True)
class Request:
    """One request as it arrived, plus what the engine learns about it later."""

    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    payload: bytes | bytearray | memoryview | None = None  # WRITE data

    @property
    def name(self) -> str:
        return c.CMD_NAMES.get(self.cmd, f"CMD{self.cmd}")

    @property
    def fua(self) -> bool:
        return bool(self.flags & c.CMD_FLAG_FUA)


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    magic, flags, cmd, handle, offset, length = c.REQUEST.unpack(header)
    if magic != c.REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, cmd, handle, offset, length)


def encode_request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return c.REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def write_payload_length(req: Request) -> int:
    """How many payload bytes follow the header on the wire."""
    return req.length if req.cmd == c.CMD_WRITE else 0


def check_request(req: Request, size: int, tflags: int, structured: bool, meta_contexts: int) -> int:
    """The protocol error this request earns before a backend runs it, or 0.

    `tflags` are the transmission flags advertised to this client, so a
    command we never offered is refused the way the spec asks.
    """
    cmd = req.cmd
    if cmd not in c.CMD_NAMES or cmd == c.CMD_DISC:
        return c.EINVAL if cmd != c.CMD_DISC else 0
    if req.flags & ~c.KNOWN_CMD_FLAGS:
        return c.EINVAL
    if req.flags & c.CMD_FLAG_FUA and not tflags & c.TF_SEND_FUA:
        return c.EINVAL
    if req.flags & c.CMD_FLAG_DF and (cmd != c.CMD_READ or not structured):
        return c.EINVAL
    if req.flags & c.CMD_FLAG_FAST_ZERO and (cmd != c.CMD_WRITE_ZEROES or not tflags & c.TF_SEND_FAST_ZERO):
        return c.EINVAL
    if req.flags & c.CMD_FLAG_NO_HOLE and cmd != c.CMD_WRITE_ZEROES:
        return c.EINVAL
    if req.flags & c.CMD_FLAG_REQ_ONE and cmd != c.CMD_BLOCK_STATUS:
        return c.EINVAL
    writes = cmd in (c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES)
    if writes and tflags & c.TF_READ_ONLY:
        return c.EPERM
    needed = {
        c.CMD_FLUSH: c.TF_SEND_FLUSH,
        c.CMD_TRIM: c.TF_SEND_TRIM,
        c.CMD_WRITE_ZEROES: c.TF_SEND_WRITE_ZEROES,
        c.CMD_CACHE: c.TF_SEND_CACHE,
    }.get(cmd)
    if needed and not tflags & needed:
        return c.EINVAL
    if cmd == c.CMD_BLOCK_STATUS and (not meta_contexts or req.length == 0):
        # A block status reply must carry at least one non-empty extent, which
        # a zero-length query cannot have.
        return c.EINVAL
    if cmd == c.CMD_FLUSH:
        return 0 if req.offset == 0 and req.length == 0 else c.EINVAL
    if cmd == c.CMD_READ and req.length > c.MAX_PAYLOAD:
        return c.EOVERFLOW  # the spec allows it for a command without payload asking too much
    if cmd == c.CMD_WRITE and req.length > c.MAX_PAYLOAD:
        return c.EINVAL  # ... and says SHOULD NOT for one that carries it: EINVAL (the payload is skipped)
    if req.offset + req.length > size:
        # The spec: ENOSPC for a write past the end, EINVAL for anything else (TRIM included).
        return c.ENOSPC if cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES) else c.EINVAL
    return 0


# --- replies ---------------------------------------------------------------


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    """Header of a simple reply; a successful READ's data follows it."""
    return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, handle)


def encode_chunk_header(handle: int, reply_type: int, length: int, flags: int = c.REPLY_FLAG_DONE) -> bytes:
    return c.STRUCTURED_REPLY.pack(c.STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


def encode_structured_read_header(handle: int, offset: int, length: int) -> bytes:
    """Header of one OFFSET_DATA chunk carrying a whole read; data follows."""
    return encode_chunk_header(handle, c.REPLY_TYPE_OFFSET_DATA, 8 + length) + struct.pack(">Q", offset)


def encode_structured_done(handle: int) -> bytes:
    return encode_chunk_header(handle, c.REPLY_TYPE_NONE, 0)


def encode_structured_error(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    return encode_chunk_header(handle, c.REPLY_TYPE_ERROR, 6 + len(msg)) + struct.pack(">IH", error, len(msg)) + msg


def encode_block_status(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return encode_chunk_header(handle, c.REPLY_TYPE_BLOCK_STATUS, len(body)) + body


def clip_extents(extents: list[tuple[int, int]], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Merge neighbours with equal flags, fit into u32 lengths and the request."""
    merged: list[list[int]] = []
    for n, f in extents:
        if n <= 0:
            continue
        if merged and merged[-1][1] == f:
            merged[-1][0] += n
        else:
            merged.append([n, f])
    out: list[tuple[int, int]] = []
    remaining = length
    for n, f in merged:
        if remaining <= 0:
            break
        cut = min(n, remaining, 0xFFFFF000)  # keep lengths u32 and block-aligned
        out.append((cut, f))
        remaining -= cut
        if req_one or cut < n:
            # Stop at a cut: the next extent starts where this one really
            # ends, not at the cut, so sending it would shift it (and could
            # call data a hole). Fewer bytes than asked is allowed.
            break
    return out
