"""An NBD spec oracle: what doc/proto.md lets a server send, checked byte by byte.

Written from the spec (NetworkBlockDevice/nbd, doc/proto.md), not from buselab: every
number below is spelt out rather than imported, and nothing here builds a reply the way
the server does. A `SessionOracle` watches one connection from the client's side: it is
told every byte the client sends (`client_bytes`), every byte the server sends
(`server_bytes`), and when either side closes (`client_eof`, `server_eof`). It parses the
client's stream as the server must (so a mutated stream is just another stream), and
raises `Violation` the moment the server sends something the spec does not allow, or
hangs up when it may not. `owed` says whether the server still owes an answer, so a
client can wait for it (or call a silence a hang).

What is checked: the greeting; option replies (magic, the option echoed, the reply types
an option may get, every payload's layout, what they claim against the server's
`Profile`); what each request may get (`expect`: success, which errors, or a hard
disconnect); simple and structured replies (magics, cookies echoed, lengths, flags, chunk
types and their rules); and the data: a `ShadowDisk` holds what was written, so every
byte read back (and every hole or zero extent claimed) is compared with it.

Where the spec leaves the server a choice, every allowed answer passes: any one of
several errors; a hard disconnect once the client broke a MUST ("Either side MAY
initiate a hard disconnect if it detects a violation by the other party of a mandatory
condition"); a simple or a structured reply where both are allowed; any split of a read
into chunks; replies in any order (a read racing a write to the same bytes may see either;
two racing writes leave those bytes unknown); anything at all read back after a TRIM. Where
the spec says which error a server SHOULD send (EINVAL for an unknown command or flag,
ENOSPC for a write past the end, EINVAL for a read, trim or block status past the end,
EPERM for a write to a read-only export), that error is required.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

# --- numbers, from doc/proto.md "Values" -------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags share these two bits
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11
OPTION_NAMES = {
    1: "EXPORT_NAME",
    2: "ABORT",
    3: "LIST",
    4: "PEEK_EXPORT",
    5: "STARTTLS",
    6: "INFO",
    7: "GO",
    8: "STRUCTURED_REPLY",
    9: "LIST_META_CONTEXT",
    10: "SET_META_CONTEXT",
    11: "EXTENDED_HEADERS",
}

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
ERR_UNSUP = REP_ERR + 1
ERR_POLICY = REP_ERR + 2
ERR_INVALID = REP_ERR + 3
ERR_PLATFORM = REP_ERR + 4
ERR_TLS_REQD = REP_ERR + 5
ERR_UNKNOWN = REP_ERR + 6
ERR_SHUTDOWN = REP_ERR + 7
ERR_BLOCK_SIZE_REQD = REP_ERR + 8
ERR_TOO_BIG = REP_ERR + 9
REPLY_NAMES = {
    1: "ACK",
    2: "SERVER",
    3: "INFO",
    4: "META_CONTEXT",
    ERR_UNSUP: "ERR_UNSUP",
    ERR_POLICY: "ERR_POLICY",
    ERR_INVALID: "ERR_INVALID",
    ERR_PLATFORM: "ERR_PLATFORM",
    ERR_TLS_REQD: "ERR_TLS_REQD",
    ERR_UNKNOWN: "ERR_UNKNOWN",
    ERR_SHUTDOWN: "ERR_SHUTDOWN",
    ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    ERR_TOO_BIG: "ERR_TOO_BIG",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11
TF_UNDEFINED = 0xF000  # bit 12 needs extended headers; 13-15 are not defined

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    0: "READ",
    1: "WRITE",
    2: "DISC",
    3: "FLUSH",
    4: "TRIM",
    5: "CACHE",
    6: "WRITE_ZEROES",
    7: "BLOCK_STATUS",
}
WRITE_COMMANDS = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)

FLAG_FUA = 1 << 0
FLAG_NO_HOLE = 1 << 1
FLAG_DF = 1 << 2
FLAG_REQ_ONE = 1 << 3
FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2
CHUNK_NAMES = {0: "NONE", 1: "OFFSET_DATA", 2: "OFFSET_HOLE", 5: "BLOCK_STATUS", 32769: "ERROR", 32770: "ERROR_OFFSET"}

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNO_NAMES = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}
ANY_ERROR = frozenset(ERRNO_NAMES)  # "the allowed values for the error field have been restricted"

DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 1 << 25  # "a maximum payload size that is at least 2^25"
DOS_PAYLOAD = 1 << 25  # "any payload not exceeding 2^25 ... SHOULD NOT be considered a denial of service attack"
MAX_STRING = 4096  # "MUST be no longer than 4096 bytes"


class Violation(AssertionError):
    """The server sent (or did) something doc/proto.md does not allow."""


def _fail(what: str, quote: str = "") -> None:
    raise Violation(f"{what}" + (f'\n  spec: "{quote}"' if quote else ""))


def _string(raw: bytes) -> str | None:
    """A spec string ("UTF-8 ... MUST NOT contain NUL ... MUST be no longer than 4096 bytes"), or None."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- what a client sends ------------------------------------------------------------------------------


def option(opt: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data) if length is None else length) + data


def export_request(opt: int, name: bytes | str, infos: Iterable[int] = ()) -> bytes:
    """An NBD_OPT_INFO or NBD_OPT_GO option."""
    raw = name.encode() if isinstance(name, str) else name
    infos = list(infos)
    return option(opt, struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def meta_request(opt: int, name: bytes | str, queries: Iterable[bytes | str]) -> bytes:
    """An NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT option."""
    raw = name.encode() if isinstance(name, str) else name
    queries = [q.encode() if isinstance(q, str) else q for q in queries]
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return option(opt, body)


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


# --- the disk as the spec lets the client know it ---------------------------------------------------------


def _subtract(start: int, end: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) without the (sorted or not) ranges in `holes`."""
    out = []
    pos = start
    for s, e in sorted(holes):
        if e <= pos or s >= end:
            continue
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out


class ShadowDisk:
    """What the export must hold: its bytes, and the ranges whose content the spec leaves open.

    After a TRIM "a client MUST NOT make any assumptions about the contents of the export
    affected by this command, until overwriting it again"; the same goes for bytes two racing
    writes both wrote, and for writes whose reply never came. Those ranges are `unknown`.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.unknown: list[tuple[int, int]] = []  # sorted, disjoint [start, end)

    def _cut(self, start: int, end: int) -> None:
        kept = []
        for s, e in self.unknown:
            if e <= start or s >= end:
                kept.append((s, e))
                continue
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        self.unknown = kept

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self._cut(offset, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def forget(self, offset: int, length: int) -> None:
        start, end = max(0, offset), min(self.size, offset + length)
        if start >= end:
            return
        merged = []
        for s, e in sorted([*self.unknown, (start, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.unknown = merged

    def known(self, start: int, end: int, skip: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """The parts of [start, end) (clipped to the disk) whose content is known, less `skip`."""
        return _subtract(max(0, start), min(self.size, end), [*self.unknown, *skip])

    def mismatch(self, offset: int, got: bytes, skip: list[tuple[int, int]] = ()) -> int | None:
        """The first known byte in which `got` (read at `offset`) differs from the disk, or None."""
        view = memoryview(got)
        for s, e in self.known(offset, offset + len(got), skip):
            if view[s - offset : e - offset] != self.data[s:e]:
                return next(i for i in range(s, e) if got[i - offset] != self.data[i])
        return None

    def nonzero(self, offset: int, length: int, skip: list[tuple[int, int]] = ()) -> int | None:
        """The first known byte in [offset, offset+length) that is not zero, or None."""
        for s, e in self.known(offset, offset + length, skip):
            chunk = self.data[s:e]
            if chunk.count(0) != len(chunk):
                return next(i for i in range(s, e) if self.data[i])
        return None


# --- what a request may get ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the spec lets a server answer to one request."""

    ok: bool  # success is allowed
    errors: frozenset[int]  # errors allowed (empty: none is)
    close_ok: bool  # the client broke a MUST: the server may hang up instead
    why: tuple[str, ...] = ()

    def describe(self) -> str:
        errors = "/".join(ERRNO_NAMES.get(e, str(e)) for e in sorted(self.errors)) or "no error"
        if self.errors == ANY_ERROR:
            errors = "any error"
        return f"{'success or ' if self.ok else ''}{errors}" + (f" ({'; '.join(self.why)})" if self.why else "")


@dataclass(frozen=True)
class Params:
    """What the handshake settled that decides how requests are answered."""

    size: int
    tflags: int
    structured: bool = False
    meta: str = "none"  # "none": no context selected; "ok": some, for this export; "other": some, for another name
    min_block: int = DEFAULT_MIN_BLOCK
    max_payload: int = DEFAULT_MAX_PAYLOAD


class _Rules:
    def __init__(self) -> None:
        self.ok = True
        self.errors: set[int] = set()
        self.close_ok = False
        self.why: list[str] = []

    def add(self, why: str, errors: Iterable[int], *, ok: bool = False, close: bool = False) -> None:
        self.why.append(why)
        self.errors |= set(errors)
        self.ok &= ok
        self.close_ok |= close

    def outcome(self) -> Outcome:
        return Outcome(self.ok, frozenset(self.errors), self.close_ok, tuple(self.why))


def valid_flags(cmd: int, p: Params) -> int:
    """The command flags this request may carry (doc/proto.md "Command flags")."""
    valid = FLAG_FUA if p.tflags & TF_SEND_FUA else 0  # "valid for all commands, provided NBD_FLAG_SEND_FUA"
    if cmd == CMD_WRITE_ZEROES:
        valid |= FLAG_NO_HOLE
        if p.tflags & TF_SEND_FAST_ZERO:
            valid |= FLAG_FAST_ZERO
    if cmd == CMD_READ and p.tflags & TF_SEND_DF:
        valid |= FLAG_DF
    if cmd == CMD_BLOCK_STATUS:
        valid |= FLAG_REQ_ONE
    return valid


def expect(cmd: int, flags: int, offset: int, length: int, p: Params) -> Outcome:
    """Every answer doc/proto.md allows to one request.

    Each rule that applies adds the errors it allows; success is allowed only if every
    rule that applies allows it; a hard disconnect only if some rule is a client's MUST
    broken. The server may report any one of the problems it finds.
    """
    r = _Rules()
    if cmd not in COMMAND_NAMES:
        r.add("unknown command: 'The server SHOULD return NBD_EINVAL if it receives an unknown command'", {EINVAL})
        return r.outcome()
    bad = flags & ~valid_flags(cmd, p)
    if bad:
        r.add(
            f"flags {bad:#x} not valid here: 'SHOULD return NBD_EINVAL if it receives an unknown command flag ..."
            " or a flag not explicitly documented as applicable to the given request'",
            {EINVAL},
            close=True,
        )
    if cmd in WRITE_COMMANDS and p.tflags & TF_READ_ONLY:
        r.add("read-only export: 'SHOULD return NBD_EPERM if it receives a write or trim request'", {EPERM})
    advertised = {CMD_FLUSH: TF_SEND_FLUSH, CMD_TRIM: TF_SEND_TRIM, CMD_WRITE_ZEROES: TF_SEND_WRITE_ZEROES}.get(cmd)
    if advertised and not p.tflags & advertised:
        r.add("command not advertised: the client MUST NOT send it; which error is unspecified", ANY_ERROR, ok=True)
        r.close_ok = True
    if cmd == CMD_CACHE:
        if p.tflags & TF_SEND_CACHE:
            r.add(
                "'A server MAY advertise NBD_FLAG_SEND_CACHE even if the command ... always fails'", {EINVAL}, ok=True
            )
        else:
            r.add("CACHE not advertised: what happens is unspecified", ANY_ERROR, ok=True)
    if cmd == CMD_BLOCK_STATUS:
        if p.meta == "none":
            r.add(
                "no metadata context: 'Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS"
                " without selecting at least one metadata context'",
                {EINVAL},
                close=True,
            )
        elif p.meta == "other":
            r.add("contexts were set for another export name: the client MUST NOT", ANY_ERROR, ok=True, close=True)
    if cmd in (CMD_FLUSH, CMD_DISC):
        if offset or length:
            r.add(f"{COMMAND_NAMES[cmd]} offset and length MUST be zero", ANY_ERROR, ok=True, close=True)
        return r.outcome()
    if offset + length > p.size:
        if cmd in (CMD_WRITE, CMD_WRITE_ZEROES):
            r.add(
                "past the end: 'SHOULD return NBD_ENOSPC if it receives a write request ... beyond'",
                {ENOSPC},
                close=True,
            )
        else:
            r.add(
                "past the end: 'SHOULD return NBD_EINVAL if it receives a read or trim request ... beyond'",
                {EINVAL},
                close=True,
            )
    if p.min_block > 1 and (offset % p.min_block or length % p.min_block):
        r.add("not aligned to the minimum block size: SHOULD EINVAL", {EINVAL}, close=True)
    if length == 0:
        r.add("zero length: 'the behavior of a server on such a request is unspecified'", ANY_ERROR, ok=True)
    if length > p.max_payload:
        if cmd == CMD_READ and p.structured:
            r.add("'permitted to reject large read requests up front with NBD_EOVERFLOW'", {EOVERFLOW}, ok=True)
            r.close_ok |= length > DOS_PAYLOAD
        elif cmd == CMD_READ:
            r.add("simple READ over the maximum payload: 'will fail'; the client MUST NOT", ANY_ERROR, close=True)
        elif cmd == CMD_WRITE:
            r.add(
                "WRITE over the maximum payload: the client MUST NOT; 'SHOULD NOT return NBD_EOVERFLOW except ...'",
                ANY_ERROR - {EOVERFLOW},
                ok=True,
                close=True,
            )
        else:
            fast = cmd == CMD_WRITE_ZEROES and flags & FLAG_FAST_ZERO
            r.add(
                "'MAY reply with an NBD_EOVERFLOW or NBD_EINVAL error'",
                {EINVAL} if fast else {EOVERFLOW, EINVAL},
                ok=True,
            )
    if cmd == CMD_READ and flags & FLAG_DF and p.tflags & TF_SEND_DF and length > 65536:
        r.add("'MAY reject ... with the error NBD_EOVERFLOW if the length is too large'", {EOVERFLOW}, ok=True)
    if cmd == CMD_WRITE_ZEROES and flags & FLAG_FAST_ZERO and p.tflags & TF_SEND_FAST_ZERO:
        r.add("fast zero: 'MUST fail quickly with NBD_ENOTSUP unless ...'", {ENOTSUP}, ok=True)
    return r.outcome()


# --- feeding byte-counting parsers ---------------------------------------------------------------------

PEEK = "peek"  # a parser yields this to wait until a byte is there, taking none


class _Parser:
    """Runs a generator that takes bytes in exact amounts: it yields n (and is sent n bytes),
    -n (n bytes are skipped, None is sent), or PEEK (resumed with None once a byte waits, or
    with "poke" by `poke`)."""

    def __init__(self, script: Iterator) -> None:
        self._script = script
        self.buffer = bytearray()
        self.finished = False
        self._want = next(script)

    def feed(self, data: bytes | bytearray = b"") -> None:
        self.buffer += data
        buf = self.buffer
        while not self.finished:
            want = self._want
            if want == PEEK:
                if not buf:
                    return
                value = None
            elif want < 0:
                take = min(len(buf), -want)
                del buf[:take]
                if take < -want:
                    self._want = want + take
                    return
                value = None
            else:
                if len(buf) < want:
                    return
                value = bytes(buf[:want])
                del buf[:want]
            try:
                self._want = self._script.send(value)
            except StopIteration:
                self.finished = True

    def poke(self) -> None:
        """Resume a script waiting at PEEK without a byte (it is sent "poke"): the other side said something."""
        if self.finished or self._want != PEEK:
            return
        try:
            self._want = self._script.send("poke")
        except StopIteration:
            self.finished = True
            return
        self.feed()


def _hex(data: bytes, limit: int = 48) -> str:
    return data[:limit].hex() + ("..." if len(data) > limit else "")


# --- the handshake -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """One export as the server should describe it."""

    name: str  # its canonical name (NBD_INFO_NAME, NBD_REP_SERVER)
    size: int
    flags: int | None  # transmission flags it advertises once structured replies are on (DF dropped before); None: any
    description: str | None = None


@dataclass(frozen=True)
class Profile:
    """What this server offers: the oracle checks the server's claims against it.

    `max_options` and `max_option_length` are where this server's idea of a denial of
    service starts ("if a server believes a client's behaviour constitutes a denial of
    service, it MAY initiate a hard disconnect").
    """

    exports: dict[str, Export]  # every name the server accepts ("" is the default export)
    listed: tuple[str, ...]  # the names NBD_OPT_LIST returns
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    max_options: int = 64
    max_option_length: int = 64 * 1024


@dataclass
class Negotiated:
    """Where the handshake left things, as the server's replies said."""

    name: str  # the export name the client chose
    export: Export
    size: int
    flags: int
    structured: bool
    contexts: dict[int, str]  # id -> name, from the last NBD_OPT_SET_META_CONTEXT
    meta_name: str | None  # the export name that SET_META_CONTEXT named
    no_zeroes: bool
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_payload: int = DEFAULT_MAX_PAYLOAD

    def params(self) -> Params:
        meta = "none"
        if self.contexts:
            meta = "ok" if self.meta_name == self.name else "other"
        return Params(self.size, self.flags, self.structured, meta, self.min_block, self.max_payload)


BAD_MAGIC = "bad magic"


@dataclass
class _OptionRules:
    ok: bool = True
    errors: set[int] = field(default_factory=set)
    close_ok: bool = False
    why: list[str] = field(default_factory=list)

    def add(self, why: str, errors: Iterable[int], *, ok: bool = False, close: bool = False) -> None:
        self.why.append(why)
        self.errors |= set(errors)
        self.ok &= ok
        self.close_ok |= close


def _namespace_ok(query: str) -> bool:
    """'The namespace must consist entirely of printable non-whitespace UTF-8 characters other than colons'."""
    ns, colon, _ = query.partition(":")
    return bool(colon) and bool(ns) and all(ch.isprintable() and not ch.isspace() for ch in ns)


class HandshakeOracle:
    """The fixed-newstyle handshake, from the server's greeting to transmission (or a close)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.client = bytearray()  # all the client sent
        self.pos = 0  # where the next unparsed client message starts
        self.client_closed = False
        self.server_closed = False
        self.negotiated: Negotiated | None = None
        self.log: list[str] = []
        self.must_close = ""  # why the server MUST hang up now (and send nothing more)
        self.close_ok = ""  # why the server may hang up
        self.silent = ""  # why the server must send nothing more (it may hang up)
        self.current: tuple[int, bytes] | None = None  # the option being answered
        self._boundary = True  # the server is between messages
        self.options = 0
        self.fixed = True
        self.no_zeroes = False
        self.server_flags = 0
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.meta_name: str | None = None
        self._last_info: tuple[bytes, list] | None = None  # a successful INFO's data and replies
        self._prev_info: tuple[bytes, list] | None = None  # the same, if it was the option just before
        self._current_rules: _OptionRules | None = None
        self._greeted = False
        self._server = _Parser(self._script())

    # -- events ---------------------------------------------------------------------------------------
    def client_bytes(self, data: bytes) -> None:
        self.client += data
        self._server.poke()

    def server_bytes(self, data: bytes) -> None:
        self._server.feed(data)

    def client_eof(self) -> None:
        self.client_closed = True

    def server_eof(self) -> None:
        self.server_closed = True
        if not self._boundary or self._server.buffer:
            _fail(f"handshake: the server hung up in the middle of a message ({_hex(bytes(self._server.buffer))})")
        if self.negotiated is not None:
            return
        if not (self.client_closed or self.must_close or self.close_ok or self._current_close_ok()):
            _fail(
                f"handshake: the server hung up on a client that broke no rule ({self._where()})",
                "A party MUST NOT initiate a hard disconnect save where set out in this section",
            )

    @property
    def done(self) -> bool:
        return self.negotiated is not None

    @property
    def leftover_server(self) -> bytes:
        return bytes(self._server.buffer)

    @property
    def owed(self) -> bool:
        """The server owes something: the greeting, a reply, or (see `must_close`) a hang-up."""
        if self.server_closed or self.done:
            return False
        if self.must_close:
            return True
        if self.silent:
            return False
        return self.current is not None or not self._greeted

    def _where(self) -> str:
        if self.current is None:
            return "between options"
        opt, data = self.current
        return f"answering option {OPTION_NAMES.get(opt, opt)} with {len(data)} bytes of data {_hex(data)}"

    def _current_close_ok(self) -> str:
        if self.current is not None and self._current_rules is not None and self._current_rules.close_ok:
            return "; ".join(self._current_rules.why) or "the option may be refused by hanging up"
        # A client that sent an option too long to be buffered may be cut off as soon as its header is in.
        head = self._peek_header()
        if head is not None:
            magic, _, length = head
            if magic != IHAVEOPT:
                return "bad option magic"
            if length > self.profile.max_option_length:
                return f"an option of {length} bytes"
        return ""

    # -- the client's stream, parsed as the server must ----------------------------------------------------
    def _peek_header(self) -> tuple[int, int, int] | None:
        if self.pos == 0 or len(self.client) - self.pos < 16:
            return None
        return struct.unpack_from(">QII", self.client, self.pos)

    def _peek_option(self, consume: bool):
        head = self._peek_header()
        if head is None:
            return None
        magic, opt, length = head
        if magic != IHAVEOPT:
            return BAD_MAGIC
        end = self.pos + 16 + length
        if len(self.client) < end:
            return None
        data = bytes(self.client[self.pos + 16 : end])
        if consume:
            self.pos = end
        return opt, data

    def _take_flags(self):
        if len(self.client) < 4:
            return None
        self.pos = 4
        return struct.unpack_from(">I", self.client)[0]

    def _from_client(self, take: Callable[[], object], what: str):
        """The client's next message; the server may send nothing until it is all there."""
        while True:
            item = take()
            if item is not None:
                return item
            if (yield PEEK) is None:  # not a poke: the server sent a byte
                item = take()
                if item is None:
                    _fail(
                        f"handshake: the server sent {_hex(bytes(self._server.buffer))} before the client sent {what}"
                    )
                return item

    def _silence(self, why: str):
        while (yield PEEK) is not None:
            pass
        _fail(f"handshake: the server sent {_hex(bytes(self._server.buffer))} after {why}; it must send nothing more")

    # -- the server's stream ------------------------------------------------------------------------------
    def _script(self):
        greeting = yield 18
        magic, ihaveopt, flags = struct.unpack(">QQH", greeting)
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            _fail(
                f"bad greeting {greeting.hex()}",
                "S: 64 bits, NBDMAGIC; S: 64 bits, IHAVEOPT; S: 16 bits, handshake flags",
            )
        if not flags & FLAG_FIXED_NEWSTYLE:
            _fail(
                "the server does not set NBD_FLAG_FIXED_NEWSTYLE", "MUST be set by servers that support fixed newstyle"
            )
        if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            _fail(f"handshake flags {flags:#x}", "The server MUST NOT set any other flags")
        self.server_flags = flags
        self._greeted = True
        client_flags = yield from self._from_client(self._take_flags, "its flags")
        self.log.append(f"C: client flags {client_flags:#x}")
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) or (
            client_flags & FLAG_NO_ZEROES and not flags & FLAG_NO_ZEROES
        ):
            self.must_close = f"client flags {client_flags:#x}"
            yield from self._silence(
                f"client flags {client_flags:#x}: 'the server MUST drop the TCP connection if the client sets an"
                " unknown flag, or a flag that does not match something advertised by the server'"
            )
        self.fixed = bool(client_flags & FLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            self.current = None
            self._current_rules = None
            item = yield from self._from_client(lambda: self._peek_option(consume=True), "an option")
            if item == BAD_MAGIC:
                self.close_ok = "bad option magic"
                self.silent = "a bad option magic"
                yield from self._silence(self.silent)
            opt, data = item
            self.current = (opt, data)
            self._prev_info, self._last_info = self._last_info, None  # "no intervening option requests"
            self.options += 1
            self.log.append(f"C: option {OPTION_NAMES.get(opt, opt)} data {_hex(data)}")
            if opt == OPT_EXPORT_NAME:
                yield from self._export_name(data)
                return
            rules = self._rules(opt, data)
            self._current_rules = rules
            replies, final, body = yield from self._replies(opt)
            done = self._judge(opt, data, rules, replies, final, body)
            if opt == OPT_ABORT:
                self.current = None
                self.close_ok = self.silent = "NBD_OPT_ABORT was acknowledged"
                yield from self._silence(self.silent)
            if done:
                return

    def _replies(self, opt: int):
        """Option replies up to the final one: ([(type, data)], final type, final data)."""
        replies = []
        while True:
            self._boundary = True
            head = yield 20
            self._boundary = False
            magic, echoed, rtype, length = struct.unpack(">QIII", head)
            if magic != OPTION_REPLY_MAGIC:
                _fail(f"option reply magic {magic:#x}", "S: 64 bits, 0x3e889045565a9 (magic number for replies)")
            if echoed != opt:
                _fail(f"a reply to option {opt} names option {echoed}", "S: 32 bits, the option as sent by the client")
            body = yield length
            self.log.append(f"S: {REPLY_NAMES.get(rtype, hex(rtype))} {_hex(body)}")
            if rtype & REP_ERR or rtype == REP_ACK:
                self._boundary = True
                return replies, rtype, body
            allowed = {
                OPT_LIST: REP_SERVER,
                OPT_INFO: REP_INFO,
                OPT_GO: REP_INFO,
                OPT_LIST_META_CONTEXT: REP_META_CONTEXT,
                OPT_SET_META_CONTEXT: REP_META_CONTEXT,
            }.get(opt)
            if rtype != allowed:
                _fail(f"reply type {rtype:#x} to option {OPTION_NAMES.get(opt, opt)}, which only gets ACK or an error")
            replies.append((rtype, body))

    def _rules(self, opt: int, data: bytes) -> _OptionRules:
        """What the spec allows as the final reply to one option (other than EXPORT_NAME)."""
        r = _OptionRules()
        p = self.profile
        if self.options > p.max_options:
            r.add("more options than this server takes: a denial of service", (), ok=True, close=True)
        if len(data) > p.max_option_length:
            r.add("an option longer than this server takes: a denial of service", (), ok=True, close=True)
        if not self.fixed:
            r.add("the client did not set NBD_FLAG_C_FIXED_NEWSTYLE: the server may stop at any option", (), ok=True)
            r.close_ok = True
        if opt == OPT_ABORT:
            return r  # "The server MUST reply with NBD_REP_ACK"; data is to be ignored
        if opt == OPT_LIST:
            if data:
                r.add("'the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID'", {ERR_INVALID})
                r.close_ok = True
            return r
        if opt == OPT_STARTTLS:
            errors = {ERR_POLICY, ERR_UNSUP} | ({ERR_INVALID} if data else set())
            r.add("NOTLS: 'it MUST respond with NBD_REP_ERR_POLICY ... NBD_REP_ERR_UNSUP'", errors, close=bool(data))
            return r
        if opt in (OPT_INFO, OPT_GO):
            return self._export_rules(r, data)
        if opt == OPT_STRUCTURED_REPLY:
            if data:
                r.add("'the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID'", {ERR_INVALID})
                r.close_ok = True
            elif self.structured:
                r.add(
                    "sent twice: 'the server MAY fail the repeated message with NBD_REP_ERR_INVALID'",
                    {ERR_INVALID},
                    ok=True,
                )
            return r
        if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._meta_rules(r, opt, data)
        r.add("an option this server does not know: NBD_REP_ERR_UNSUP", {ERR_UNSUP})
        return r

    def _export_rules(self, r: _OptionRules, data: bytes) -> _OptionRules:
        if len(data) < 6:
            r.add("INFO/GO data shorter than 6 bytes", {ERR_INVALID}, close=True)
            return r
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            r.add("'length of name ... MUST be no larger than the option data length - 6'", {ERR_INVALID}, close=True)
            return r
        (count,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * count:
            r.add("the information request count does not match the option length", {ERR_INVALID}, close=True)
            return r
        infos = struct.unpack_from(f">{count}H", data, 6 + nlen)
        if len(set(infos)) != len(infos):
            r.add(
                "'The client MUST NOT include any information request in the list more than once'",
                {ERR_INVALID},
                ok=True,
            )
            r.close_ok = True
        name = _string(data[4 : 4 + nlen])
        if name is None:
            r.add("the export name is not a valid string", {ERR_INVALID, ERR_UNKNOWN}, close=True)
        elif name not in self.profile.exports:
            r.add("'NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server'", {ERR_UNKNOWN})
        return r

    def _meta_rules(self, r: _OptionRules, opt: int, data: bytes) -> _OptionRules:
        listing = opt == OPT_LIST_META_CONTEXT
        if not self.structured:
            if listing:
                r.add("'If a client attempts to do so, a server MAY send NBD_REP_ERR_INVALID'", {ERR_INVALID}, ok=True)
            else:
                r.add(
                    "SET_META_CONTEXT before structured replies: 'a server SHOULD send NBD_REP_ERR_INVALID'",
                    {ERR_INVALID},
                )
                r.close_ok = True
        parsed = _parse_meta(data)
        if parsed is None:
            r.add(
                "'If the option request is syntactically invalid ... the server MUST fail the request with NBD_REP_ERR_INVALID'",
                {ERR_INVALID},
            )
            return r
        raw_name, queries = parsed
        name = _string(raw_name)
        if name is None:
            r.add("the export name is not a valid string", {ERR_INVALID, ERR_UNKNOWN}, close=True)
        elif name not in self.profile.exports:
            r.add("no such export", {ERR_UNKNOWN, ERR_INVALID})
        if queries:
            r.add(
                "'the server MAY fail with NBD_REP_ERR_TOO_BIG if too many queries are requested'",
                {ERR_TOO_BIG},
                ok=True,
            )
        for raw in queries:
            query = _string(raw)
            if query is None or not _namespace_ok(query):
                r.add(
                    f"query {raw!r} is semantically invalid: the server MAY fail with NBD_REP_ERR_INVALID",
                    {ERR_INVALID},
                    ok=True,
                )
        return r

    def _meta_expected(self, opt: int, queries: list[bytes]) -> set[str]:
        """The contexts a META_CONTEXT option must name, from the ones this server has."""
        have = set(self.profile.contexts)
        if opt == OPT_LIST_META_CONTEXT and not queries:
            return have  # "If zero queries are sent, then the server MUST return all the metadata contexts"
        out = set()
        for raw in queries:
            query = _string(raw)
            if query is None:
                continue
            if query in have:
                out.add(query)
            elif opt == OPT_LIST_META_CONTEXT and query.endswith(":") and _namespace_ok(query):
                out |= {ctx for ctx in have if ctx.startswith(query)}  # "base:" lists the base namespace
        return out

    def _judge(self, opt: int, data: bytes, r: _OptionRules, replies, final: int, body: bytes) -> bool:
        """Check an option's replies; update what is negotiated. True once transmission starts."""
        name = OPTION_NAMES.get(opt, str(opt))
        if opt == OPT_SET_META_CONTEXT:
            # "Issuing this command replaces all previously-set metadata contexts (including when this command fails)"
            self.contexts, self.meta_name = {}, None
        if final & REP_ERR:
            if body and _string(body) is None:
                _fail(f"{name}: the message of error {REPLY_NAMES.get(final, hex(final))} is not a valid string")
            if final not in r.errors:
                allowed = "/".join(REPLY_NAMES.get(e, hex(e)) for e in sorted(r.errors)) or "no error"
                _fail(
                    f"option {name} (data {_hex(data)}) got {REPLY_NAMES.get(final, hex(final))}; allowed: "
                    f"{'ACK or ' if r.ok else ''}{allowed}" + (f" ({'; '.join(r.why)})" if r.why else "")
                )
            return False
        if body:
            _fail(f"{name}: NBD_REP_ACK with {len(body)} bytes of data", "NBD_REP_ACK ... No data.")
        if not r.ok:
            allowed = "/".join(REPLY_NAMES.get(e, hex(e)) for e in sorted(r.errors))
            _fail(f"option {name} (data {_hex(data)}) got ACK; it must fail with {allowed} ({'; '.join(r.why)})")
        if opt == OPT_STRUCTURED_REPLY:
            self.structured = True
        elif opt == OPT_LIST:
            self._judge_list(replies)
        elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._judge_meta(opt, data, replies)
        elif opt in (OPT_INFO, OPT_GO):
            return self._judge_export(opt, data, replies)
        return False

    def _judge_list(self, replies) -> None:
        names = []
        for _, body in replies:
            if len(body) < 4:
                _fail(f"NBD_REP_SERVER of {len(body)} bytes")
            (nlen,) = struct.unpack_from(">I", body)
            if nlen > len(body) - 4:
                _fail(
                    "NBD_REP_SERVER name length past its end",
                    "MUST be no larger than the reply packet header length - 4",
                )
            name = _string(body[4 : 4 + nlen])
            if name is None or _string(body[4 + nlen :]) is None:
                _fail(f"NBD_REP_SERVER with a name or details that are not valid strings: {_hex(body)}")
            names.append(name)
        if sorted(names) != sorted(self.profile.listed):
            _fail(f"NBD_OPT_LIST listed {names}, the server has {list(self.profile.listed)}", "one for each export")

    def _judge_meta(self, opt: int, data: bytes, replies) -> None:
        parsed = _parse_meta(data)
        assert parsed is not None  # a syntax error must have been refused
        raw_name, queries = parsed
        got: dict[int, str] = {}
        names = []
        for _, body in replies:
            if len(body) < 4:
                _fail(f"NBD_REP_META_CONTEXT of {len(body)} bytes")
            (ctx_id,) = struct.unpack_from(">I", body)
            ctx = _string(body[4:])
            if ctx is None or not _namespace_ok(ctx):
                _fail(
                    f"NBD_REP_META_CONTEXT name {body[4:]!r}",
                    "each namespace returned MUST begin with the relevant namespace, followed by a colon",
                )
            names.append(ctx)
            if opt == OPT_SET_META_CONTEXT:
                if ctx_id in got:
                    _fail(f"two contexts with id {ctx_id}", "each with a unique metadata context ID")
                got[ctx_id] = ctx
        want = self._meta_expected(opt, queries)
        if opt == OPT_SET_META_CONTEXT:
            if sorted(names) != sorted(want):
                _fail(
                    f"SET_META_CONTEXT with queries {queries} selected {names}; it must select {sorted(want)}",
                    "the server MUST reply with a number of NBD_REP_META_CONTEXT replies, one for each selected"
                    " metadata context",
                )
            self.contexts, self.meta_name = got, _string(raw_name)
            return
        # LIST may answer a wildcard record ("base:") in place of what it covers.
        covered = set()
        for ctx in names:
            covers = {c for c in want if c == ctx or (ctx.endswith(":") and c.startswith(ctx))}
            if not covers:
                _fail(f"LIST_META_CONTEXT with queries {queries} listed {ctx!r}; it must list {sorted(want)}")
            covered |= covers
        if covered != want:
            _fail(f"LIST_META_CONTEXT with queries {queries} listed {names}; it must list {sorted(want)}")

    def _judge_export(self, opt: int, data: bytes, replies) -> bool:
        (nlen,) = struct.unpack_from(">I", data)
        name = _string(data[4 : 4 + nlen])
        export = self.profile.exports[name]
        seen: dict[int, bytes] = {}
        for _, body in replies:
            if len(body) < 2:
                _fail(f"NBD_REP_INFO of {len(body)} bytes", "includes the 2 bytes for the type designator")
            (itype,) = struct.unpack_from(">H", body)
            if itype in seen:
                _fail(f"NBD_INFO type {itype} sent twice", "A particular information type SHOULD only appear once")
            seen[itype] = body[2:]
        if INFO_EXPORT not in seen:
            _fail("NBD_REP_ACK without NBD_INFO_EXPORT", "The server MUST send an NBD_INFO_EXPORT information type")
        info = seen[INFO_EXPORT]
        if len(info) != 10:
            _fail(f"NBD_INFO_EXPORT of {len(info) + 2} bytes", "*length* MUST be 12")
        size, flags = struct.unpack(">QH", info)
        self._check_export(export, size, flags)
        if INFO_NAME in seen and _string(seen[INFO_NAME]) != export.name:
            _fail(f"NBD_INFO_NAME {seen[INFO_NAME]!r} for export {export.name!r}")
        if INFO_DESCRIPTION in seen and _string(seen[INFO_DESCRIPTION]) is None:
            _fail(f"NBD_INFO_DESCRIPTION {seen[INFO_DESCRIPTION]!r} is not a valid string")
        sizes = (DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_PAYLOAD)
        if INFO_BLOCK_SIZE in seen:
            if len(seen[INFO_BLOCK_SIZE]) != 12:
                _fail(f"NBD_INFO_BLOCK_SIZE of {len(seen[INFO_BLOCK_SIZE]) + 2} bytes", "The *length* MUST be 14")
            low, preferred, high = struct.unpack(">III", seen[INFO_BLOCK_SIZE])
            if not _power_of_two(low) or low > 65536:
                _fail(f"minimum block size {low}", "this value MUST be a power of 2, MUST NOT be larger than 2^16")
            if not _power_of_two(preferred) or preferred < max(low, 512):
                _fail(
                    f"preferred block size {preferred}",
                    "MUST be a power of 2 at least as large as the maximum of the minimum block size and 2^9",
                )
            if high < preferred:
                _fail(
                    f"maximum payload {high} below the preferred block size",
                    "MUST be at least as large as the preferred block size",
                )
            sizes = (low, preferred, high)
        signature = sorted(seen.items())
        if opt == OPT_INFO:
            self._last_info = (data, signature)
            return False
        if self._prev_info is not None and self._prev_info[0] == data and self._prev_info[1] != signature:
            _fail(
                f"NBD_OPT_GO told {signature}, the NBD_OPT_INFO just before it told {self._prev_info[1]}",
                "the server MUST reply with the same set of information",
            )
        self.negotiated = Negotiated(
            name, export, size, flags, self.structured, dict(self.contexts), self.meta_name, self.no_zeroes, *sizes
        )
        return True

    def _check_export(self, export: Export, size: int, flags: int) -> None:
        if size != export.size:
            _fail(f"export {export.name!r} has size {size}, not {export.size}")
        if not flags & TF_HAS_FLAGS:
            _fail(f"transmission flags {flags:#x}", "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1")
        if flags & TF_SEND_DF and not self.structured:
            _fail(
                f"transmission flags {flags:#x}: SEND_DF without structured replies",
                "MUST leave this flag clear if structured replies have not been negotiated",
            )
        if flags & TF_SEND_FAST_ZERO and not flags & TF_SEND_WRITE_ZEROES:
            _fail(
                f"transmission flags {flags:#x}",
                "MUST set this transmission flag to 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set",
            )
        if flags & TF_UNDEFINED:
            _fail(
                f"transmission flags {flags:#x} set undefined bits",
                "The server MUST NOT set the flag for features it does not support",
            )
        if export.flags is not None:
            want = export.flags if self.structured else export.flags & ~TF_SEND_DF
            if flags != want:
                _fail(
                    f"export {export.name!r} advertised flags {flags:#x}, not {want:#x} (structured={self.structured})"
                )

    def _export_name(self, data: bytes):
        name = _string(data)
        export = self.profile.exports.get(name) if name is not None else None
        if export is None:
            self.must_close = f"NBD_OPT_EXPORT_NAME for an unknown export {data!r}"
            yield from self._silence(
                f"{self.must_close}: 'If the chosen export does not exist ... the server MUST terminate the session'"
            )
        info = yield 10
        self._boundary = False
        size, flags = struct.unpack(">QH", info)
        self._check_export(export, size, flags)
        if not (self.no_zeroes and self.server_flags & FLAG_NO_ZEROES):
            zeroes = yield 124
            if zeroes != bytes(124):
                _fail("the 124 reserved bytes after NBD_OPT_EXPORT_NAME are not zero")
        self._boundary = True
        self.log.append(f"S: export size {size} flags {flags:#x}")
        self.negotiated = Negotiated(
            name, export, size, flags, self.structured, dict(self.contexts), self.meta_name, self.no_zeroes
        )


def _parse_meta(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """(export name, queries) of a META_CONTEXT option, or None if it is syntactically invalid."""
    if len(data) < 4:
        return None
    (nlen,) = struct.unpack_from(">I", data)
    pos = 4 + nlen
    if pos + 4 > len(data):
        return None
    name = data[4:pos]
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qlen,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + qlen > len(data):
            return None
        queries.append(data[pos + 4 : pos + 4 + qlen])
        pos += 4 + qlen
    if pos != len(data):
        return None
    return name, queries


# --- transmission ----------------------------------------------------------------------------------------

STORE_LIMIT = 1 << 26  # WRITE payloads longer than this are skipped, not kept (they must fail anyway)


@dataclass(eq=False)
class Req:
    """One request as the client sent it, and what has come back for it."""

    seq: int
    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    outcome: Outcome
    payload: bytes | None = None
    complete: bool = False  # a WRITE's payload is all sent
    after_disc: object = None  # the DISC sent before it, if any
    conflicts: list = field(default_factory=list)  # requests in flight with it that touch the same bytes
    chunks: int = 0
    content: list = field(default_factory=list)  # [start, end) covered by content chunks
    error_offsets: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    contexts_seen: set = field(default_factory=set)
    mismatch: str = ""  # data that differs from the disk (fatal unless the reply ends in an error)
    finished: bool = False
    error: int | None = None  # the error it got, 0 for success

    def describe(self) -> str:
        name = COMMAND_NAMES.get(self.cmd, f"command {self.cmd}")
        return f"request #{self.seq} {name} flags={self.flags:#x} offset={self.offset} length={self.length} cookie={self.cookie:#x}"

    @property
    def writes(self) -> bool:
        return self.cmd in WRITE_COMMANDS and self.outcome.ok

    def span(self, size: int) -> tuple[int, int]:
        return min(self.offset, size), min(self.offset + self.length, size)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if start < end else None


class TransmissionOracle:
    """Requests and replies after the handshake; the data checked against a ShadowDisk."""

    def __init__(self, params: Params, disk: ShadowDisk, contexts: dict[int, str] | None = None) -> None:
        if disk.size != params.size:
            raise ValueError(f"the shadow disk has {disk.size} bytes, the export {params.size}")
        self.p = params
        self.disk = disk
        self.contexts = dict(contexts or {})
        self.requests: list[Req] = []
        self.inflight: list[Req] = []
        self.close_ok = ""
        self.disc: Req | None = None
        self.client_closed = False
        self.server_closed = False
        self.log: list[str] = []
        self._boundary = True
        self._client = _Parser(self._client_script())
        self._server = _Parser(self._server_script())

    # -- events ---------------------------------------------------------------------------------------
    def client_bytes(self, data: bytes) -> None:
        self._client.feed(data)

    def server_bytes(self, data: bytes) -> None:
        self._server.feed(data)

    def client_eof(self) -> None:
        self.client_closed = True

    def server_eof(self) -> None:
        self.server_closed = True
        if not self._boundary or self._server.buffer:
            _fail(f"the server hung up in the middle of a reply ({_hex(bytes(self._server.buffer))})")
        clean_disc = self.disc is not None and not self.disc.outcome.why
        if not (self.client_closed or self.close_ok or clean_disc):
            _fail(
                "the server hung up on a client that broke no rule",
                "The client and the server MUST NOT initiate any form of disconnect other than in one of the above"
                " circumstances",
            )
        if clean_disc and not self.close_ok:
            missing = [r for r in self.requests if r.seq < self.disc.seq and r.complete and not r.finished]
            if missing:
                _fail(
                    f"after DISC the server hung up without answering {missing[0].describe()}",
                    "The server MUST handle all outstanding requests",
                )
        for req in self.inflight:
            if req.writes and req.complete:  # it may or may not have happened
                self.disk.forget(*_span_length(req, self.disk.size))

    @property
    def owed(self) -> bool:
        """A reply the server must still send, or the hang-up it owes after a DISC."""
        if self.server_closed:
            return False
        return any(self._owed(r) for r in self.inflight) or bool(self.must_close)

    @property
    def must_close(self) -> str:
        clean_disc = self.disc is not None and not self.disc.outcome.why
        return "DISC" if clean_disc and not self.server_closed else ""

    def _owed(self, req: Req) -> bool:
        if not req.complete or req.cmd == CMD_DISC:
            return False
        if req.after_disc is not None:
            return req.after_disc.finished  # only if that DISC was refused with an error
        return True

    # -- the client's stream ----------------------------------------------------------------------------
    def _client_script(self):
        seq = 0
        while True:
            head = yield 28
            magic, flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", head)
            if magic != REQUEST_MAGIC:
                self.close_ok = self.close_ok or f"bad request magic {magic:#x}"
                self.log.append(f"C: bad request magic {head.hex()}")
                while True:
                    yield -(1 << 62)
            seq += 1
            req = Req(seq, cmd, flags, cookie, offset, length, expect(cmd, flags, offset, length, self.p))
            self.log.append(f"C: {req.describe()}")
            if self.disc is not None and not self.disc.finished:
                req.after_disc = self.disc
            if req.outcome.close_ok and req.after_disc is None:
                self.close_ok = self.close_ok or f"{req.describe()}: {'; '.join(req.outcome.why)}"
            if cmd == CMD_WRITE and length > self.p.max_payload:
                # "either the server or the client MAY initiate a hard disconnect if a payload length ... would be
                # large enough to be deemed a denial of service attack"
                if length > DOS_PAYLOAD:
                    self.close_ok = self.close_ok or f"{req.describe()}: a payload over 2^25 bytes"
            span = req.span(self.p.size)
            for other in self.inflight:
                if (req.writes or other.writes) and _overlap(span, other.span(self.p.size)):
                    req.conflicts.append(other)
                    other.conflicts.append(req)
            self.requests.append(req)
            self.inflight.append(req)
            if cmd == CMD_WRITE:
                if length <= STORE_LIMIT:
                    req.payload = yield length
                else:
                    yield -length
            req.complete = True
            if cmd == CMD_DISC and req.after_disc is None:
                self.disc = req

    # -- the server's stream ----------------------------------------------------------------------------
    def _match(self, cookie: int, what: str) -> Req:
        for req in self.inflight:
            if req.cookie == cookie and not req.finished:
                break
        else:
            _fail(
                f"{what} with cookie {cookie:#x}, which no request in flight has",
                "the server MUST use the same value for cookie as was sent by the client",
            )
        if req.cmd == CMD_DISC and not req.outcome.why:
            _fail(f"a reply to DISC ({req.describe()})", "There is no reply to an NBD_CMD_DISC")
        if req.after_disc is not None and not req.after_disc.outcome.why:
            _fail(
                f"{what} to {req.describe()}, sent after DISC", "whereupon the server MUST ... close the TCP connection"
            )
        return req

    def _error_ok(self, req: Req, error: int) -> None:
        if error not in ERRNO_NAMES:
            _fail(f"{req.describe()}: error {error}", "the allowed values for the error field have been restricted")
        if error not in req.outcome.errors:
            _fail(f"{req.describe()}: got {ERRNO_NAMES[error]}; allowed: {req.outcome.describe()}")

    def _success_ok(self, req: Req) -> None:
        if not req.outcome.ok:
            _fail(f"{req.describe()}: succeeded; allowed: {req.outcome.describe()}")
        if not req.complete:
            _fail(f"{req.describe()}: succeeded before its payload was all sent")

    def _skip_for(self, req: Req) -> list[tuple[int, int]]:
        """Bytes of `req`'s range that a racing write may or may not have changed when it ran."""
        span = req.span(self.p.size)
        out = []
        for other in req.conflicts:
            if other.writes:
                both = _overlap(span, other.span(self.p.size))
                if both:
                    out.append(both)
        return out

    def _finish(self, req: Req, error: int) -> None:
        req.finished = True
        req.error = error
        self.inflight.remove(req)
        self.log.append(f"S: {req.describe()} -> {ERRNO_NAMES.get(error, error) if error else 'OK'}")
        if error:
            return
        if req.mismatch:
            _fail(req.mismatch)
        if req.cmd == CMD_DISC:
            return
        start, end = req.span(self.disk.size)
        if req.cmd == CMD_WRITE:
            if req.payload is None:
                self.disk.forget(start, end - start)
            else:
                self.disk.write(start, req.payload[: end - start])
        elif req.cmd == CMD_WRITE_ZEROES:
            self.disk.zero(start, end - start)
        elif req.cmd == CMD_TRIM:
            self.disk.forget(start, end - start)
        if req.cmd in WRITE_COMMANDS:
            for other in req.conflicts:
                if other.writes:
                    both = _overlap((start, end), other.span(self.disk.size))
                    if both:
                        self.disk.forget(both[0], both[1] - both[0])

    def _server_script(self):
        while True:
            self._boundary = True
            head = yield 4
            self._boundary = False
            (magic,) = struct.unpack(">I", head)
            if magic == SIMPLE_MAGIC:
                error, cookie = struct.unpack(">IQ", (yield 12))
                req = self._match(cookie, "a simple reply")
                if req.chunks:
                    _fail(f"{req.describe()}: a simple reply after structured chunks")
                if self.p.structured and req.cmd == CMD_READ:
                    _fail(
                        f"{req.describe()}: a simple reply ({ERRNO_NAMES.get(error, error) if error else 'OK'}) to READ",
                        "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL due"
                        " to bad flags)",
                    )
                if error:
                    self._error_ok(req, error)
                    self._finish(req, error)
                    continue
                if req.cmd == CMD_DISC:
                    _fail(f"{req.describe()}: a success reply", "There is no reply to an NBD_CMD_DISC")
                self._success_ok(req)
                if req.cmd == CMD_BLOCK_STATUS:
                    _fail(f"{req.describe()}: succeeded with a simple reply", "MUST be sent as a structured reply")
                if req.cmd == CMD_READ:
                    data = yield req.length
                    self._check_data(req, req.offset, data)
                self._finish(req, 0)
            elif magic == STRUCTURED_MAGIC:
                if not self.p.structured:
                    _fail(
                        "a structured reply chunk",
                        "The server MUST NOT send this reply type unless the client has successfully negotiated structured replies",
                    )
                flags, ctype, cookie, length = struct.unpack(">HHQI", (yield 16))
                req = self._match(cookie, f"a {CHUNK_NAMES.get(ctype, ctype)} chunk")
                req.chunks += 1
                if flags & ~REPLY_FLAG_DONE:
                    _fail(
                        f"{req.describe()}: chunk flags {flags:#x}",
                        "The server MUST NOT set any other flags without first negotiating",
                    )
                yield from self._chunk(req, ctype, length, bool(flags & REPLY_FLAG_DONE))
                if flags & REPLY_FLAG_DONE:
                    self._done(req)
            else:
                _fail(f"reply magic {magic:#010x} ({_hex(head + bytes(self._server.buffer))})")

    def _chunk(self, req: Req, ctype: int, length: int, done: bool):
        name = CHUNK_NAMES.get(ctype, f"type {ctype:#x}")
        what = f"{req.describe()}: {name} chunk of {length} bytes"
        if ctype == CHUNK_NONE:
            if length or not done:
                _fail(
                    what + (" without NBD_REPLY_FLAG_DONE" if not done else ""),
                    "*length* MUST be 0 ... MUST always be used with the NBD_REPLY_FLAG_DONE bit set",
                )
            return
        if ctype & 0x8000:
            yield from self._error_chunk(req, ctype, length, what)
            return
        if ctype in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
            if req.cmd != CMD_READ:
                _fail(what, "Valid as a reply to NBD_CMD_READ")
            if ctype == CHUNK_OFFSET_DATA and length < 9:
                _fail(what, "*length* MUST be at least 9 ... each chunk MUST describe at least one byte")
            if ctype == CHUNK_OFFSET_HOLE and length != 12:
                _fail(what, "*length* MUST be exactly 12")
            if ctype == CHUNK_OFFSET_DATA:
                (offset,) = struct.unpack(">Q", (yield 8))
                size = length - 8
            else:
                offset, size = struct.unpack(">QI", (yield 12))
                if not size:
                    _fail(what + ": a hole of 0 bytes", "hole size (unsigned, MUST be nonzero)")
            end = offset + size
            if offset < req.offset or end > req.offset + req.length:
                _fail(
                    f"{what} at offset {offset}: outside the request",
                    "MUST NOT send chunks that describe data outside the offset and length of the request",
                )
            for s, e in req.content + req.error_offsets:
                if s < end and offset < e:
                    _fail(
                        f"{what} at offset {offset} overlaps an earlier chunk",
                        "MUST NOT send content chunks that overlap with any earlier content or error chunk",
                    )
            if req.flags & FLAG_DF and req.content:
                _fail(f"{what}: a second content chunk with DF set", "the server MUST send at most one content chunk")
            req.content.append((offset, end))
            if ctype == CHUNK_OFFSET_DATA:
                self._check_data(req, offset, (yield size))
            else:
                bad = self.disk.nonzero(offset, size, self._skip_for(req))
                if bad is not None and not req.mismatch:
                    req.mismatch = (
                        f"{what}: a hole over [{offset}, {end}), but byte {bad} of the disk is {self.disk.data[bad]:#x}"
                    )
            return
        if ctype == CHUNK_BLOCK_STATUS:
            if req.cmd != CMD_BLOCK_STATUS:
                _fail(what, "NBD_REPLY_TYPE_BLOCK_STATUS is a reply to NBD_CMD_BLOCK_STATUS")
            if length < 12 or (length - 4) % 8:
                _fail(what, "*length* MUST be 4 + (a positive integer multiple of 8)")
            body = yield length
            self._block_status(req, body, what)
            return
        _fail(
            what + ": an unknown chunk type",
            "If the client receives an unknown or unexpected type, other than an *error chunk*, it MUST initiate a hard disconnect",
        )

    def _error_chunk(self, req: Req, ctype: int, length: int, what: str):
        fixed = 14 if ctype == CHUNK_ERROR_OFFSET else 6
        if length < fixed:
            _fail(what, f"*length* MUST be at least {fixed}")
        body = yield length
        error, mlen = struct.unpack_from(">IH", body)
        if not error:
            _fail(what + ": error 0", "error (MUST be nonzero)")
        if mlen > length - fixed:
            _fail(what + f": a message of {mlen} bytes", "message length (no more than header *length* - 6)")
        if _string(body[6 : 6 + mlen]) is None:
            _fail(what + f": the message {body[6 : 6 + mlen]!r} is not a valid string")
        if ctype == CHUNK_ERROR_OFFSET:
            if req.cmd not in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS):
                _fail(
                    what,
                    "Valid as a reply to NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_CACHE, NBD_CMD_WRITE_ZEROES, and NBD_CMD_BLOCK_STATUS",
                )
            (offset,) = struct.unpack_from(">Q", body, 6 + mlen)
            if not req.offset <= offset < req.offset + req.length:
                _fail(
                    what + f" at offset {offset}", "which MUST lie within the original offset and length of the request"
                )
            req.error_offsets.append((offset, offset + 1))
        self._error_ok(req, error)
        req.errors.append(error)

    def _block_status(self, req: Req, body: bytes, what: str) -> None:
        (ctx_id,) = struct.unpack_from(">I", body)
        if ctx_id not in self.contexts:
            _fail(f"{what}: context id {ctx_id}, not one of the selected {sorted(self.contexts)}")
        if ctx_id in req.contexts_seen:
            _fail(
                f"{what}: a second chunk for context {ctx_id}",
                "exactly one status chunk per negotiated metadata context ID",
            )
        req.contexts_seen.add(ctx_id)
        extents = list(struct.iter_unpack(">II", body[4:]))
        if req.flags & FLAG_REQ_ONE:
            if len(extents) != 1 or extents[0][0] > req.length:
                _fail(
                    f"{what}: extents {extents[:4]} with REQ_ONE",
                    "every reply chunk MUST contain exactly one descriptor, and that descriptor MUST NOT exceed the *length* of the original request",
                )
        elif sum(n for n, _ in extents[:-1]) >= req.length:
            _fail(
                f"{what}: extents {extents[:4]}...",
                "the sum of the *length* fields of the first N-1 extents (if any) MUST be less than the requested length",
            )
        pos = req.offset
        skip = self._skip_for(req)
        for n, state in extents:
            if not n:
                _fail(f"{what}: an extent of length 0", "length of the extent ... (unsigned, MUST be nonzero)")
            if self.contexts[ctx_id] == BASE_ALLOCATION:
                if state & ~(STATE_HOLE | STATE_ZERO):
                    _fail(
                        f"{what}: base:allocation flags {state:#x}",
                        "For the base:allocation context, the remainder of the flags field is reserved. Servers SHOULD set it to all-zero",
                    )
                if state & STATE_ZERO:
                    bad = self.disk.nonzero(pos, n, skip)
                    if bad is not None and not req.mismatch:
                        req.mismatch = f"{what}: [{pos}, {pos + n}) said to read as zeroes, but byte {bad} is {self.disk.data[bad]:#x}"
            pos += n

    def _check_data(self, req: Req, offset: int, data: bytes) -> None:
        bad = self.disk.mismatch(offset, data, self._skip_for(req))
        if bad is not None and not req.mismatch:
            req.mismatch = f"{req.describe()}: byte {bad} read back as {data[bad - offset]:#04x}, the disk holds {self.disk.data[bad]:#04x}"

    def _done(self, req: Req) -> None:
        if req.errors:
            self._finish(req, req.errors[0])
            return
        self._success_ok(req)
        if req.cmd == CMD_READ:
            covered = sum(e - s for s, e in req.content)
            if covered != req.length:
                _fail(
                    f"{req.describe()}: success with {covered} of {req.length} bytes in content chunks",
                    "When no error is detected, the server MUST send enough data chunks to cover the entire region",
                )
        if req.cmd == CMD_BLOCK_STATUS and req.contexts_seen != set(self.contexts):
            _fail(
                f"{req.describe()}: success with status for contexts {sorted(req.contexts_seen)}, not {sorted(self.contexts)}",
                "exactly one chunk of type NBD_REPLY_TYPE_BLOCK_STATUS per selected context id",
            )
        self._finish(req, 0)


def _span_length(req: Req, size: int) -> tuple[int, int]:
    start, end = req.span(size)
    return start, end - start


# --- a whole connection ----------------------------------------------------------------------------------


class SessionOracle:
    """One connection: the handshake, then (once the server says so) transmission."""

    def __init__(self, profile: Profile, disk: ShadowDisk) -> None:
        self.profile = profile
        self.disk = disk
        self.handshake = HandshakeOracle(profile)
        self.transmission: TransmissionOracle | None = None
        self.sent = bytearray()
        self.received = bytearray()

    def client_bytes(self, data: bytes) -> None:
        self.sent += data
        (self.transmission or self.handshake).client_bytes(data)

    def server_bytes(self, data: bytes) -> None:
        self.received += data
        if self.transmission is not None:
            self.transmission.server_bytes(data)
            return
        self.handshake.server_bytes(data)
        if self.handshake.done:
            self._start_transmission()

    def _start_transmission(self) -> None:
        hs = self.handshake
        neg = hs.negotiated
        self.transmission = TransmissionOracle(neg.params(), self.disk, neg.contexts)
        self.transmission.client_bytes(bytes(hs.client[hs.pos :]))
        if hs.client_closed:
            self.transmission.client_eof()
        self.transmission.server_bytes(hs.leftover_server)

    def client_eof(self) -> None:
        (self.transmission or self.handshake).client_eof()
        self.handshake.client_eof()

    def server_eof(self) -> None:
        (self.transmission or self.handshake).server_eof()

    @property
    def owed(self) -> bool:
        return (self.transmission or self.handshake).owed

    @property
    def must_close(self) -> str:
        """Why the server must hang up now (after sending what it owes), if it must."""
        return (self.transmission or self.handshake).must_close

    def log(self, last: int = 12) -> str:
        lines = self.handshake.log + (self.transmission.log if self.transmission else [])
        return "\n".join(lines[-last:])


# --- a fuzzing client ------------------------------------------------------------------------------------


class Chooser:
    """Where generated sessions get their choices: a seeded `random.Random`, or (`Chooser(draw=...)`) hypothesis."""

    def __init__(self, rnd=None, *, draw=None) -> None:
        self._rnd = rnd
        self._draw = draw
        if draw is not None:
            from hypothesis import strategies as st  # only the hypothesis tests need it

            self._st = st

    def integer(self, lo: int, hi: int) -> int:
        if self._draw is not None:
            return self._draw(self._st.integers(lo, hi))
        return self._rnd.randint(lo, hi)

    def choice(self, seq):
        seq = list(seq)
        return seq[self.integer(0, len(seq) - 1)]

    def chance(self, percent: int) -> bool:
        return self.integer(0, 99) < percent

    def raw(self, n: int) -> bytes:
        if self._draw is not None:
            return self._draw(self._st.binary(min_size=n, max_size=n))
        return self._rnd.randbytes(n)

    def weighted(self, table: list[tuple[int, object]]):
        pick = self.integer(0, sum(w for w, _ in table) - 1)
        for weight, value in table:
            if pick < weight:
                return value
            pick -= weight
        raise AssertionError("not reached")


NAMES = ["", "", "", "disk", "other", "nope", "\u00e9t\u00e9", b"\xff\xfe", b"a\0b", "x" * 300]
QUERIES = [BASE_ALLOCATION] * 4 + ["base:", "base:other", "qemu:dirty-bitmap:a", "nocolon", ":leaf", "x-a b:c", b"\xc3"]
INFOS = [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 4, 0xFFFF]
U32 = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


def _name(ch: Chooser, names) -> bytes:
    name = ch.choice(names)
    return name.encode() if isinstance(name, str) else name


def gen_option(ch: Chooser, names=NAMES) -> bytes:
    """One option, mostly well formed, from every kind the spec defines and some it does not."""
    kind = ch.weighted(
        [(6, "structured"), (8, "set_meta"), (4, "list_meta"), (5, "info"), (2, "list"), (1, "starttls"),
         (3, "unknown"), (3, "malformed"), (1, "abort"), (1, "peek")]
    )  # fmt: skip
    if kind == "structured":
        return option(OPT_STRUCTURED_REPLY, ch.raw(ch.integer(1, 4)) if ch.chance(10) else b"")
    if kind in ("set_meta", "list_meta"):
        opt = OPT_SET_META_CONTEXT if kind == "set_meta" else OPT_LIST_META_CONTEXT
        queries = [ch.choice(QUERIES) for _ in range(ch.weighted([(2, 0), (6, 1), (2, 2), (1, 3)]))]
        return meta_request(opt, _name(ch, names), queries)
    if kind == "info":
        return export_request(OPT_INFO, _name(ch, names), [ch.choice(INFOS) for _ in range(ch.integer(0, 3))])
    if kind == "list":
        return option(OPT_LIST, ch.raw(ch.integer(1, 8)) if ch.chance(20) else b"")
    if kind == "starttls":
        return option(OPT_STARTTLS, ch.raw(ch.integer(1, 4)) if ch.chance(30) else b"")
    if kind == "unknown":
        return option(
            ch.choice([0, OPT_PEEK_EXPORT, OPT_EXTENDED_HEADERS, 12, 0x7FFFFFFF, 0xFFFFFFFF]), ch.raw(ch.integer(0, 8))
        )
    if kind == "abort":
        return option(OPT_ABORT, ch.raw(ch.integer(0, 4)) if ch.chance(20) else b"")
    if kind == "peek":
        return option(OPT_PEEK_EXPORT)
    # Malformed: lengths inside the data that do not add up.
    opt = ch.choice([OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
    name = _name(ch, names)
    if opt in (OPT_INFO, OPT_GO):
        nlen = ch.choice([len(name) + 1, len(name) + 100, 0xFFFFFFFF, max(0, len(name) - 1)])
        count = ch.choice([0, 1, 2, 0xFFFF])
        tail = struct.pack(">H", count) + ch.raw(ch.integer(0, 5))
        return option(opt, struct.pack(">I", nlen) + name + tail)
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", ch.choice([1, 2, 0xFFFFFFFF]))
    body += struct.pack(">I", ch.choice([15, 16, 200, 0xFFFFFFFF])) + BASE_ALLOCATION.encode()
    return option(opt, body[: ch.integer(0, len(body))] if ch.chance(30) else body)


def gen_handshake(ch: Chooser, names=NAMES) -> tuple[list[bytes], bool]:
    """Client flags, some options, and (mostly) an option that starts transmission.

    Also says whether it ends with GO or EXPORT_NAME for the default export (so requests may follow).
    """
    flags = ch.weighted([(75, 3), (17, 1), (2, 0), (2, 2), (4, None)])
    if flags is None:
        flags = ch.choice([4, 0x80000000, 0xFFFFFFFF, ch.integer(0, 0xFFFFFFFF)])
    out = [struct.pack(">I", flags)]
    if ch.chance(60):  # what a client wanting block status does
        out.append(option(OPT_STRUCTURED_REPLY))
        if ch.chance(80):
            out.append(meta_request(OPT_SET_META_CONTEXT, b"", [BASE_ALLOCATION]))
    out += [gen_option(ch, names) for _ in range(ch.weighted([(4, 0), (4, 1), (2, 2), (1, 4)]))]
    end = ch.weighted([(72, "go"), (14, "export_name"), (6, "none"), (4, "abort"), (4, "other")])
    infos = [ch.choice(INFOS) for _ in range(ch.weighted([(3, 0), (3, 1), (2, 2), (1, 3)]))]
    if end == "go":
        out.append(export_request(OPT_GO, b"", infos))
    elif end == "export_name":
        out.append(option(OPT_EXPORT_NAME, b""))
    elif end == "other":
        name = _name(ch, names)
        out.append(export_request(OPT_GO, name, infos) if ch.chance(50) else option(OPT_EXPORT_NAME, name))
    elif end == "abort":
        out.append(option(OPT_ABORT))
    return out, end in ("go", "export_name")


def gen_session(ch: Chooser, size: int, *, most: int = 10, mutations: int = 30) -> tuple[list[bytes], int, list[str]]:
    """A whole session's messages, how many of them are the handshake's, and the mutations made."""
    messages, transmission = gen_handshake(ch)
    handshake = len(messages)
    if transmission or ch.chance(10):
        messages += gen_requests(ch, size, most=most)
    edits: list[str] = []
    if ch.chance(mutations):
        messages, edits = mutate(ch, messages, ch.weighted([(6, 1), (3, 2), (1, 3)]))
    return messages, handshake, edits


def gen_requests(ch: Chooser, size: int, *, most: int = 10, max_write: int = 64 * 1024) -> list[bytes]:
    """Requests (each with its WRITE payload): any command and flags; offsets and lengths biased to the edges."""
    out = []
    cookies: set[int] = set()
    edges = [0, 1, 511, 512, 4096, size - 1, size, size + 1, 1 << 25, (1 << 25) + 1, 0xFFFFFFFF]
    for _ in range(ch.integer(1, most)):
        cmd = ch.weighted(
            [(30, CMD_READ), (22, CMD_WRITE), (10, CMD_BLOCK_STATUS), (7, CMD_TRIM), (7, CMD_WRITE_ZEROES),
             (5, CMD_FLUSH), (3, CMD_CACHE), (2, CMD_DISC), (4, None)]
        )  # fmt: skip
        if cmd is None:
            cmd = ch.choice([8, 9, 200, 0xFFFF])
        flags = ch.weighted([(60, 0), (15, FLAG_FUA), (15, "valid"), (5, "bit"), (5, "any")])
        if flags == "valid":
            flags = ch.choice([FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_FUA | FLAG_NO_HOLE])
        elif flags == "bit":
            flags = 1 << ch.integer(0, 15)
        elif flags == "any":
            flags = ch.integer(0, 0xFFFF)
        longest = max_write if cmd == CMD_WRITE else 0xFFFFFFFF
        where = ch.weighted([(55, "inside"), (25, "end"), (20, "edges")])
        if cmd in (CMD_FLUSH, CMD_DISC) and ch.chance(85):
            offset = length = 0
        elif where == "inside":
            length = ch.choice([0, 1, 512, 4096, ch.integer(0, min(size, longest, 65536))])
            length = min(length, size, longest)
            offset = ch.integer(0, size - length)
        elif where == "end":
            length = min(ch.choice([0, 1, 512, ch.integer(0, min(size + 1, 65536))]), longest)
            offset = max(0, size - length + ch.choice([-1, 0, 0, 1]))
        else:
            length = min(ch.choice(edges + [ch.integer(0, size + 2)]), longest)
            offset = ch.choice([*edges, size - length if length <= size else 0, 1 << 63, (1 << 64) - 1])
        cookie = ch.choice([ch.integer(0, 0xFFFFFFFF), ch.integer(0, (1 << 64) - 1), len(out) + 1])
        if cookie in cookies and not ch.chance(3):
            cookie = max(cookies) + 1 if max(cookies) < (1 << 64) - 1 else 0
        cookies.add(cookie)
        payload = ch.raw(min(length, 64)) * (length // 64 + 1) if cmd == CMD_WRITE else b""
        out.append(request(cmd, cookie, offset, length, flags, payload[:length] if cmd == CMD_WRITE else b""))
        if cmd == CMD_DISC and ch.chance(70):
            return out
    if ch.chance(85):
        out.append(request(CMD_DISC, 0))
    return out


INTERESTING_U32 = [0, 1, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(ch: Chooser, messages: list[bytes], count: int) -> tuple[list[bytes], list[str]]:
    """`count` random edits to a session's messages: bits, bytes, fields, cuts, drops, copies, swaps, splices."""
    out = list(messages)
    done = []
    for _ in range(count):
        if not out:
            break
        i = ch.integer(0, len(out) - 1)
        msg = bytearray(out[i])
        op = ch.choice(["bit", "byte", "u32", "cut", "drop", "copy", "swap", "insert", "splice"])
        if op == "bit" and msg:
            pos = ch.integer(0, len(msg) - 1)
            msg[pos] ^= 1 << ch.integer(0, 7)
            done.append(f"flip a bit of byte {pos} of message {i}")
        elif op == "byte" and msg:
            pos = ch.integer(0, len(msg) - 1)
            msg[pos] = ch.choice([0, 0xFF, 0x80, 0x7F, ch.integer(0, 255)])
            done.append(f"byte {pos} of message {i} := {msg[pos]:#x}")
        elif op == "u32" and len(msg) >= 4:
            pos = ch.integer(0, len(msg) - 4)
            value = ch.choice(INTERESTING_U32)
            msg[pos : pos + 4] = struct.pack(">I", value)
            done.append(f"bytes {pos}..{pos + 3} of message {i} := {value:#x}")
        elif op == "cut":
            pos = ch.integer(0, len(msg))
            del msg[pos:]
            done.append(f"message {i} cut to {pos} bytes")
        elif op == "drop":
            del out[i]
            done.append(f"message {i} dropped")
            continue
        elif op == "copy":
            out.insert(i, bytes(msg))
            done.append(f"message {i} sent twice")
        elif op == "swap" and i + 1 < len(out):
            out[i], out[i + 1] = out[i + 1], out[i]
            done.append(f"messages {i} and {i + 1} swapped")
            continue
        elif op == "insert":
            pos = ch.integer(0, len(msg))
            extra = ch.raw(ch.integer(1, 16))
            msg[pos:pos] = extra
            done.append(f"{len(extra)} bytes inserted at {pos} of message {i}")
        elif op == "splice":
            msg = bytearray(ch.raw(ch.integer(1, 40)))
            done.append(f"message {i} replaced by {len(msg)} random bytes")
        out[i] = bytes(msg)
    return out, done


class Wire:
    """A client socket that tells a SessionOracle everything that goes both ways.

    Sending never blocks on a server that is busy sending replies (both are done as the
    socket allows), and waiting has a limit: a server that owes something and stays
    silent for `timeout` seconds fails the test.
    """

    def __init__(self, sock, oracle: SessionOracle, timeout: float = 5.0) -> None:
        self.sock = sock
        self.oracle = oracle
        self.timeout = timeout
        self.eof = False
        sock.setblocking(False)

    def _pump(self, want_write: bool) -> bool:
        """Wait for the socket; take in what the server sent. True if it can take more bytes."""
        import select

        readable, writable, _ = select.select([self.sock], [self.sock] if want_write else [], [], self.timeout)
        if not readable and not writable:
            raise Violation(
                f"the server sent nothing for {self.timeout} s"
                + (" and took no more bytes" if want_write else f" while it owes {self._owes()}")
                + f"\n{self.oracle.log()}"
            )
        if readable:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            if data == b"":
                self.eof = True
                self.oracle.server_eof()
            elif data:
                self.oracle.server_bytes(data)
        return bool(writable)

    def _owes(self) -> str:
        return self.oracle.must_close and f"a hang-up ({self.oracle.must_close})" or "a reply"

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.eof:
            if not self._pump(True):
                continue
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.drain()  # the server hung up: the oracle says whether it could
                return
            self.oracle.client_bytes(bytes(view[:sent]))
            view = view[sent:]

    def wait(self) -> None:
        """Until the server owes nothing (or has hung up)."""
        while self.oracle.owed and not self.eof:
            self._pump(False)

    def drain(self) -> None:
        while not self.eof:
            self._pump(False)

    def close(self) -> None:
        """Wait for what is owed, hang up (shutdown for writing), read to the end."""
        import socket

        self.wait()
        if not self.eof:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.oracle.client_eof()
            self.drain()
        self.sock.close()


def plan(ch: Chooser, messages: list[bytes], handshake: int) -> tuple[list[bytes], set[int], str]:
    """How a session's messages go out: (chunks, indexes of chunks after which to wait for answers, mode).

    lockstep: wait after every message; handshake: wait after each option, then pipeline the requests;
    pipelined: everything at once (options too, which a client MUST NOT do); trickle: the handshake in
    lockstep, then the requests cut into pieces of 1 to 9 bytes.
    """
    mode = ch.weighted([(30, "lockstep"), (45, "handshake"), (10, "pipelined"), (15, "trickle")])
    if mode == "lockstep":
        return list(messages), set(range(len(messages))), mode
    if mode == "pipelined":
        return [b"".join(messages)], set(), mode
    chunks = list(messages[:handshake])
    waits = set(range(len(chunks)))
    rest = b"".join(messages[handshake:])
    if mode == "handshake":
        return chunks + list(messages[handshake:]), waits, mode
    pos = 0
    while pos < len(rest):
        step = ch.integer(1, 9)
        chunks.append(rest[pos : pos + step])
        pos += step
    return chunks, waits, mode


def run_session(sock, oracle: SessionOracle, chunks: list[bytes], waits: set[int], *, timeout: float = 5.0) -> None:
    """Send `chunks` over `sock`, waiting for what is owed after those in `waits`; then hang up and read to the end."""
    wire = Wire(sock, oracle, timeout)
    try:
        wire.wait()  # the greeting
        for i, chunk in enumerate(chunks):
            if wire.eof:
                break
            wire.send(chunk)
            if i in waits:
                wire.wait()
        wire.close()
    finally:
        sock.close()


def describe(chunks: list[bytes], limit: int = 40) -> str:
    """The chunks a session sent, in hex, one a line (for failure messages and reproducers)."""
    lines = [f"  {i}: {_hex(c, 64)}" for i, c in enumerate(chunks[:limit])]
    if len(chunks) > limit:
        lines.append(f"  ... and {len(chunks) - limit} more")
    return "\n".join(lines)
