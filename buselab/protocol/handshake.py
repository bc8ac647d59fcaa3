"""Server side of the fixed-newstyle NBD handshake, sans-IO.

Feed it the bytes the client sent (`receive_data`), send what `data_to_send`
returns, and look at `state`: once it is DONE, `negotiated` says which export
the client chose and whether it wants structured replies. Nothing here touches
a socket, so every message and every error path is tested byte for byte.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import constants as c


class HandshakeError(Exception):
    """The client broke the protocol so badly that the connection must close."""


@dataclass(frozen=True)
class ExportInfo:
    """What a client may learn about an export during the handshake."""

    name: str
    size: int
    flags: int  # transmission flags, TF_HAS_FLAGS included
    description: str = ""
    min_block: int = c.MIN_BLOCK_SIZE
    preferred_block: int = c.PREFERRED_BLOCK_SIZE
    max_block: int = c.MAX_PAYLOAD


@dataclass
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportInfo
    structured: bool = False
    meta_contexts: dict[int, str] = field(default_factory=dict)  # id -> name
    no_zeroes: bool = False


class State(enum.Enum):
    CLIENT_FLAGS = "waiting for client flags"
    OPTIONS = "option haggling"
    DONE = "transmission"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a handshake ended without transmission; `close_reason` has the details in words."""

    CLIENT_CLOSED = "client closed"  # EOF: the client left (nbdinfo --list, a probe)
    ABORTED = "aborted"  # NBD_OPT_ABORT: the client said it was done
    BAD_FLAGS = "bad client flags"
    BAD_OPTION = "bad option"  # wrong magic, too long, too many
    UNKNOWN_EXPORT = "unknown export"

    @property
    def client_chose(self) -> bool:
        """The client ended it on purpose: nothing for the log."""
        return self in (CloseReason.CLIENT_CLOSED, CloseReason.ABORTED)


# Returns the export for a name ("" is the default export) or None.
ExportLookup = Callable[[str], ExportInfo | None]
# Lists the exports for NBD_OPT_LIST.
ExportLister = Callable[[], list[ExportInfo]]

META_CONTEXT_BASE_ALLOCATION = 1


def greeting() -> bytes:
    """The first bytes the server sends: NBDMAGIC, IHAVEOPT, handshake flags."""
    return struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, c.HANDSHAKE_FLAGS)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def _string(data: bytes, pos: int, length: int) -> tuple[str, int]:
    if pos + length > len(data):
        raise ValueError("string runs past the end of the option")
    try:
        return data[pos : pos + length].decode("utf-8"), pos + length
    except UnicodeDecodeError as exc:
        raise ValueError("string is not UTF-8") from exc


class ServerHandshake:
    """The server's half of the handshake as a state machine fed with bytes."""

    def __init__(
        self,
        lookup: ExportLookup,
        lister: ExportLister | None = None,
        *,
        max_options: int = c.MAX_OPTIONS,
    ) -> None:
        self._lookup = lookup
        self._lister = lister or (lambda: [e for e in [lookup("")] if e is not None])
        self._max_options = max_options
        self._buffer = bytearray()
        self._out = bytearray(greeting())
        self._options_seen = 0
        self._structured = False
        self._meta_contexts: dict[int, str] = {}
        self._no_zeroes = False
        self.state = State.CLIENT_FLAGS
        self.negotiated: Negotiated | None = None
        self.close_reason = ""  # in words, for logs and the lab
        self.close_kind: CloseReason | None = None

    # -- I/O facing ----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client; an empty bytes object means EOF."""
        if self.state in (State.DONE, State.CLOSED):
            raise HandshakeError(f"no data expected in state {self.state.value}")
        if not data:
            self._close(CloseReason.CLIENT_CLOSED, "client closed the connection during the handshake")
            return
        self._buffer += data
        self._process()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def leftover(self) -> bytes:
        """Bytes received after the handshake ended: the first requests, if any."""
        return bytes(self._buffer)

    # -- the state machine ---------------------------------------------------
    def _close(self, kind: CloseReason, reason: str) -> None:
        self.state = State.CLOSED
        self.close_kind = kind
        self.close_reason = reason

    def _process(self) -> None:
        while self.state in (State.CLIENT_FLAGS, State.OPTIONS):
            if self.state is State.CLIENT_FLAGS:
                if len(self._buffer) < 4:
                    return
                (flags,) = struct.unpack_from(">I", self._buffer)
                del self._buffer[:4]
                if flags & ~(c.CLIENT_FLAG_FIXED_NEWSTYLE | c.CLIENT_FLAG_NO_ZEROES):
                    self._close(CloseReason.BAD_FLAGS, f"client sent unknown handshake flags {flags:#x}")
                    return
                self._no_zeroes = bool(flags & c.CLIENT_FLAG_NO_ZEROES)
                self.state = State.OPTIONS
                continue
            if len(self._buffer) < c.OPTION_HEADER.size:
                return
            magic, option, length = c.OPTION_HEADER.unpack_from(self._buffer)
            if magic != c.IHAVEOPT:
                self._close(CloseReason.BAD_OPTION, f"bad option magic {magic:#x}")
                return
            if length > c.MAX_OPTION_LENGTH:
                # We cannot buffer it; the spec lets us drop such a client.
                self._close(
                    CloseReason.BAD_OPTION, f"option {option} is {length} bytes long (limit {c.MAX_OPTION_LENGTH})"
                )
                return
            end = c.OPTION_HEADER.size + length
            if len(self._buffer) < end:
                return
            data = bytes(self._buffer[c.OPTION_HEADER.size : end])
            del self._buffer[:end]
            self._options_seen += 1
            if self._options_seen > self._max_options:
                self._close(CloseReason.BAD_OPTION, f"client sent more than {self._max_options} options")
                return
            self._handle_option(option, data)

    def _handle_option(self, option: int, data: bytes) -> None:
        handler = {
            c.OPT_EXPORT_NAME: self._opt_export_name,
            c.OPT_ABORT: self._opt_abort,
            c.OPT_LIST: self._opt_list,
            c.OPT_INFO: self._opt_info_go,
            c.OPT_GO: self._opt_info_go,
            c.OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            c.OPT_LIST_META_CONTEXT: self._opt_meta_context,
            c.OPT_SET_META_CONTEXT: self._opt_meta_context,
        }.get(option)
        if handler is None:
            self._reply(option, c.REP_ERR_UNSUP, b"unsupported option")
            return
        try:
            handler(option, data)
        except ValueError as exc:
            self._reply(option, c.REP_ERR_INVALID, str(exc).encode())

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._out += option_reply(option, reply_type, data)

    def _advertised(self, export: ExportInfo) -> ExportInfo:
        """The export as this client sees it: DF only once structured replies are on.

        The spec says SEND_DF MUST stay clear unless structured replies were
        negotiated (nbdkit and qemu-nbd do the same).
        """
        if export.flags & c.TF_SEND_DF and not self._structured:
            return dataclasses.replace(export, flags=export.flags & ~c.TF_SEND_DF)
        return export

    def _finish(self, export: ExportInfo) -> None:
        self.negotiated = Negotiated(
            export=export,
            structured=self._structured,
            meta_contexts=dict(self._meta_contexts),
            no_zeroes=self._no_zeroes,
        )
        self.state = State.DONE

    # -- options ---------------------------------------------------------------
    def _opt_export_name(self, option: int, data: bytes) -> None:
        try:
            name, _ = _string(data, 0, len(data))
        except ValueError as exc:
            # No option reply exists for EXPORT_NAME: hanging up is the only answer.
            self._close(CloseReason.UNKNOWN_EXPORT, f"client asked for an export whose name is not valid: {exc}")
            return
        export = self._lookup(name)
        if export is None:
            # EXPORT_NAME has no error reply: all the server can do is hang up.
            self._close(CloseReason.UNKNOWN_EXPORT, f"client asked for unknown export {name!r}")
            return
        export = self._advertised(export)
        self._out += struct.pack(">QH", export.size, export.flags)
        if not self._no_zeroes:
            self._out += bytes(124)
        # Meta contexts only make sense with structured replies, which a client
        # using EXPORT_NAME may still have negotiated.
        self._finish(export)

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._reply(option, c.REP_ACK)
        self._close(CloseReason.ABORTED, "client aborted the handshake")

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_LIST takes no data")
        for export in self._lister():
            name = export.name.encode()
            self._reply(option, c.REP_SERVER, struct.pack(">I", len(name)) + name)
        self._reply(option, c.REP_ACK)

    def _opt_info_go(self, option: int, data: bytes) -> None:
        if len(data) < 4:
            raise ValueError("option too short")
        (name_len,) = struct.unpack_from(">I", data)
        name, pos = _string(data, 4, name_len)
        if pos + 2 > len(data):
            raise ValueError("option too short for the information request count")
        (count,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + 2 * count != len(data):
            raise ValueError("information request count does not match the option length")
        requested = set(struct.unpack_from(f">{count}H", data, pos))
        export = self._lookup(name)
        if export is None:
            self._reply(option, c.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        export = self._advertised(export)
        self._reply(option, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, export.size, export.flags))
        if c.INFO_NAME in requested:
            self._reply(option, c.REP_INFO, struct.pack(">H", c.INFO_NAME) + export.name.encode())
        if c.INFO_DESCRIPTION in requested and export.description:
            self._reply(option, c.REP_INFO, struct.pack(">H", c.INFO_DESCRIPTION) + export.description.encode())
        # The spec lets a server send block sizes unasked; clients use them to
        # split and align requests, so always do.
        self._reply(
            option,
            c.REP_INFO,
            struct.pack(">HIII", c.INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block),
        )
        self._reply(option, c.REP_ACK)
        if option == c.OPT_GO:
            self._finish(export)

    def _opt_structured_reply(self, option: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_STRUCTURED_REPLY takes no data")
        self._structured = True
        self._reply(option, c.REP_ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        if option == c.OPT_SET_META_CONTEXT:
            # Whatever the outcome, the contexts of an earlier SET are gone: the spec asks a
            # failed SET to leave none selected, not the previous ones.
            self._meta_contexts = {}
        if option == c.OPT_SET_META_CONTEXT and not self._structured:
            raise ValueError("NBD_OPT_SET_META_CONTEXT needs structured replies first")
        if len(data) < 4:
            raise ValueError("option too short")
        (name_len,) = struct.unpack_from(">I", data)
        name, pos = _string(data, 4, name_len)
        if pos + 4 > len(data):
            raise ValueError("option too short for the query count")
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                raise ValueError("query runs past the end of the option")
            (qlen,) = struct.unpack_from(">I", data, pos)
            query, pos = _string(data, pos + 4, qlen)
            queries.append(query)
        if pos != len(data):
            raise ValueError("trailing bytes after the queries")
        if self._lookup(name) is None:
            self._reply(option, c.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        # We know one context. LIST with no queries lists all; "base:" means
        # every context of that namespace.
        # "base:" alone lists every context of the namespace, but SET MUST ignore that form.
        listing = option == c.OPT_LIST_META_CONTEXT
        matches = (not queries and listing) or any(
            q == c.BASE_ALLOCATION or (listing and q == "base:") for q in queries
        )
        if matches:
            if option == c.OPT_SET_META_CONTEXT:
                self._meta_contexts[META_CONTEXT_BASE_ALLOCATION] = c.BASE_ALLOCATION
            self._reply(
                option,
                c.REP_META_CONTEXT,
                struct.pack(">I", META_CONTEXT_BASE_ALLOCATION if option == c.OPT_SET_META_CONTEXT else 0)
                + c.BASE_ALLOCATION.encode(),
            )
        self._reply(option, c.REP_ACK)
