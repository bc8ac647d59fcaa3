"""The connection's fast path answers exactly as check_request and the reply encoders say.

`Connection._transmission` skips `check_request` for what it takes to be a
plain READ or WRITE (in range, no flag but an advertised FUA) and builds those
replies inline. Here random requests -- any command (unknown ones too), any
flags, offsets and lengths biased to the edges (0, the disk's size and one
either side, 2**63, 32 MiB) -- go to a real Connection (helpers.ConnectionHarness)
over disks whose capabilities, read-only flag and negotiated reply mode vary,
and every reply must be byte for byte what an oracle sends: the error
`check_request` gives, else the request applied to a shadow RAM disk, encoded
with the protocol's encoders. At the end the served disk must equal the shadow.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from helpers import ConnectionHarness
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buselab.protocol import constants as c
from buselab.protocol.transmission import (
    Request,
    check_request,
    clip_extents,
    encode_block_status,
    encode_request,
    encode_simple_reply,
    encode_structured_done,
    encode_structured_error,
    encode_structured_read_header,
)
from buselab.storage.backends.ram import RamBackend
from buselab.storage.base import Capabilities

KiB, MiB = 1 << 10, 1 << 20
MAX = c.MAX_PAYLOAD
BIG_DISK = MAX + 4 * KiB  # only in the explicit examples: a whole MAX_PAYLOAD READ fits, one byte more too
MAX_WRITE = 64 * KiB  # a WRITE's payload is always sent: random ones stay small
MODES = ("kernel", "simple", "structured", "structured+meta")  # kernel: no handshake; the rest negotiate
FULL = RamBackend.caps
NOTHING = Capabilities()
FLAG_BITS = (
    c.CMD_FLAG_FUA,
    c.CMD_FLAG_NO_HOLE,
    c.CMD_FLAG_DF,
    c.CMD_FLAG_REQ_ONE,
    c.CMD_FLAG_FAST_ZERO,
    1 << 5,
    1 << 15,
)


@dataclass
class Scenario:
    size: int
    caps: Capabilities
    readonly: bool
    mode: str
    requests: list[tuple[Request, int]] = field(default_factory=list)  # with a WRITE's payload seed


# --- what is sent --------------------------------------------------------------------------------


def edges(size: int) -> list[int]:
    return [0, 1, size - 1, size, size + 1, 4096, MAX - 1, MAX, MAX + 1, 1 << 63, (1 << 64) - 1]


COMMANDS = [c.CMD_READ] * 6 + [c.CMD_WRITE] * 5 + list(range(2, 9)) + [9, 200, 0xFFFF]  # 2 is DISC


@st.composite
def requests(draw, size: int) -> tuple[Request, int]:
    """One request, and the seed of its payload when it is a WRITE.

    Many in range with no flag or FUA, what the fast path takes; the rest at the end and other edges.
    """
    cmd = draw(st.sampled_from(COMMANDS))
    flags = draw(
        st.one_of(
            st.just(0),
            st.just(0),
            st.just(c.CMD_FLAG_FUA),
            st.sets(st.sampled_from(FLAG_BITS), min_size=1, max_size=3).map(sum),
            st.integers(0, 0xFFFF),
        )
    )
    longest = MAX_WRITE if cmd == c.CMD_WRITE else (1 << 32) - 1  # a WRITE's payload is always sent
    where = draw(st.sampled_from(["inside", "inside", "at the end", "edges"]))
    if where == "inside":
        length = draw(st.one_of(st.just(0), st.integers(0, min(size, longest))))
        offset = draw(st.integers(0, size - length))
    elif where == "at the end":  # ending a byte before the end, at it, or a byte past it
        length = draw(st.one_of(st.sampled_from([0, 1, size]), st.integers(0, min(size + 1, longest))))
        offset = max(0, size - length + draw(st.sampled_from([-1, 0, 1])))
    else:
        length = draw(st.one_of(st.sampled_from([n for n in edges(size) if n <= longest]), st.integers(0, size + 2)))
        offset = draw(
            st.one_of(
                st.sampled_from([n for n in edges(size) + [size - length] if n >= 0]),
                st.integers(0, size + 2),
            )
        )
    handle = draw(st.one_of(st.integers(0, (1 << 64) - 1), st.integers(1 << 32, (1 << 64) - 1)))
    return Request(flags, cmd, handle, offset, length), draw(st.integers(0, 1 << 32))


@st.composite
def scenarios(draw) -> Scenario:
    size = draw(st.sampled_from([512, 4096 + 512, 64 * KiB]))
    caps = draw(
        st.one_of(
            st.sampled_from([FULL, NOTHING]),
            st.builds(
                Capabilities,
                flush=st.booleans(),
                fua=st.booleans(),
                trim=st.booleans(),
                zero=st.booleans(),
                fast_zero=st.booleans(),
                cache=st.booleans(),
                extents=st.booleans(),
            ),
        )
    )
    scenario = Scenario(size, caps, draw(st.booleans()), draw(st.sampled_from(MODES)))
    scenario.requests = draw(st.lists(requests(size), min_size=1, max_size=6))
    return scenario


def payload(req: Request, seed: int) -> bytes:
    return random.Random(seed).randbytes(req.length) if req.cmd == c.CMD_WRITE else b""


# --- the oracle ------------------------------------------------------------------------------------


def apply(shadow: RamBackend, req: Request, data: bytes) -> tuple[int, object]:
    """A request check_request let through, done on the shadow disk: (errno, what the reply carries)."""
    cmd, offset, length = req.cmd, req.offset, req.length
    fua = bool(req.flags & c.CMD_FLAG_FUA)
    if cmd == c.CMD_READ:
        return 0, bytes(shadow.read(offset, length))
    if cmd == c.CMD_WRITE:
        shadow.write(offset, data, fua)
    elif cmd == c.CMD_TRIM:
        shadow.trim(offset, length, fua)
    elif cmd == c.CMD_WRITE_ZEROES:
        fast = bool(req.flags & c.CMD_FLAG_FAST_ZERO)
        shadow.write_zeroes(offset, length, may_trim=not req.flags & c.CMD_FLAG_NO_HOLE, fast=fast, fua=fua)
    elif cmd == c.CMD_BLOCK_STATUS:
        extents = shadow.extents(offset, length) if shadow.caps.extents else [(length, 0)]
        return 0, clip_extents(extents, length, bool(req.flags & c.CMD_FLAG_REQ_ONE))
    return 0, None  # FLUSH, CACHE: nothing to see on a RAM disk


def expected_reply(req: Request, data: bytes, shadow: RamBackend, tflags: int, structured: bool, context: int | None):
    """The bytes a correct server sends for `req` (none for DISC)."""
    error = check_request(req, shadow.size, tflags, structured, 0 if context is None else 1)
    if req.cmd == c.CMD_DISC:
        return b""
    result = None
    if not error:
        error, result = apply(shadow, req, data)
    if structured and req.cmd in (c.CMD_READ, c.CMD_BLOCK_STATUS):
        if error:
            return encode_structured_error(req.handle, error, c.ERRNO_NAMES.get(error, ""))
        if req.cmd == c.CMD_READ and not req.length:
            return encode_structured_done(req.handle)  # every chunk must describe at least one byte
        if req.cmd == c.CMD_READ:
            return encode_structured_read_header(req.handle, req.offset, req.length) + result
        assert context is not None  # check_request refuses BLOCK_STATUS without a meta context
        return encode_block_status(req.handle, context, result)
    if error:
        return encode_simple_reply(req.handle, error)  # never with data
    return encode_simple_reply(req.handle) + (result if req.cmd == c.CMD_READ else b"")


# --- the property ------------------------------------------------------------------------------


def describe(i: int, req: Request, tflags: int, mode: str) -> str:
    return (
        f"request {i}: cmd={req.cmd} flags={req.flags:#x} offset={req.offset} length={req.length}"
        f" handle={req.handle:#x}; export flags {tflags:#x}, {mode}"
    )


def header(reply: bytes) -> str:
    """A reply's header in words, for failure messages."""
    magic = int.from_bytes(reply[:4], "big")
    if magic == c.SIMPLE_REPLY_MAGIC and len(reply) >= 16:
        error, handle = int.from_bytes(reply[4:8], "big"), int.from_bytes(reply[8:16], "big")
        return (
            f"(simple reply, error {c.ERRNO_NAMES.get(error, error)}, handle {handle:#x}, {len(reply) - 16} data bytes)"
        )
    if magic == c.STRUCTURED_REPLY_MAGIC and len(reply) >= 20:
        flags, kind = int.from_bytes(reply[4:6], "big"), int.from_bytes(reply[6:8], "big")
        return f"(chunk type {kind:#x}, flags {flags:#x}, handle {int.from_bytes(reply[8:16], 'big'):#x})"
    return f"({len(reply)} bytes)"


def check(scenario: Scenario) -> None:
    backend = RamBackend(scenario.size)
    backend.caps = scenario.caps  # what the engine advertises follows from these
    shadow = RamBackend(scenario.size)
    shadow.caps = scenario.caps
    mode = scenario.mode
    structured = mode.startswith("structured")
    harness = ConnectionHarness(
        backend,
        kernel=mode == "kernel",
        structured=structured,
        meta=mode == "structured+meta",
        readonly=scenario.readonly,
        timeout=2.0,  # a reply shorter than the oracle's is waited for this long (per recv)
    )
    with harness as h:
        client = h.client
        if mode == "kernel":
            tflags = h.engine.flags  # what the kernel is told, with the size, by ioctl or netlink
        else:
            tflags = client.flags  # what the handshake advertised
            assert client.size == scenario.size
        assert bool(tflags & c.TF_READ_ONLY) == scenario.readonly
        assert bool(tflags & c.TF_SEND_FUA) == scenario.caps.fua
        disconnected = False
        for i, (req, seed) in enumerate(scenario.requests):
            data = payload(req, seed)
            want = expected_reply(req, data, shadow, tflags, structured, client.context_id)
            client.send(encode_request(req.cmd, req.handle, req.offset, req.length, req.flags) + data)
            if req.cmd == c.CMD_DISC:
                assert h.wait_closed() == "client sent DISC"
                assert client.pending() == b"", f"{describe(i, req, tflags, mode)}: a reply to DISC"
                disconnected = True
                break
            try:
                got = client.recv_exact(len(want))
            except (TimeoutError, ConnectionError) as exc:
                raise AssertionError(
                    f"{describe(i, req, tflags, mode)}: {exc}; wanted {want[:32]!r}..., the connection closed"
                    f" because: {h.connection.closed_reason or '(it is still open)'}"
                ) from exc
            assert got == want, (
                f"{describe(i, req, tflags, mode)}: got {header(got)} {got[:40]!r}...,"
                f" wanted {header(want)} {want[:40]!r}..."
            )
        if not disconnected:
            assert h.disconnect() == "client sent DISC"  # and nothing was sent beyond the replies above
        assert bytes(backend.read(0, scenario.size)) == bytes(shadow.read(0, scenario.size)), "the disks differ"


def big(mode: str, *sent: tuple[Request, int], readonly: bool = False) -> Scenario:
    """A scenario on a disk bigger than MAX_PAYLOAD: only the length limit refuses a whole-disk request."""
    return Scenario(BIG_DISK, FULL, readonly, mode, list(sent))


def read(offset: int, length: int, flags: int = 0, handle: int = 7) -> tuple[Request, int]:
    return Request(flags, c.CMD_READ, handle, offset, length), 0


def write(offset: int, length: int, flags: int = 0, handle: int = 9) -> tuple[Request, int]:
    return Request(flags, c.CMD_WRITE, handle, offset, length), 1


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
# The length limit, on a disk where the range alone would allow it (kept out of the random
# examples: 32 MiB of payload each).
@example(big("kernel", read(0, MAX), read(0, MAX + 1), read(BIG_DISK - MAX, MAX)))
@example(big("structured+meta", read(0, MAX + 1, c.CMD_FLAG_DF), read(4 * KiB, MAX, c.CMD_FLAG_FUA)))
@example(big("kernel", write(0, MAX + 1), write(0, MAX, c.CMD_FLAG_FUA), read(MAX - 4, 8)))
@example(big("simple", write(4 * KiB, MAX), write(0, MAX + 1), read(0, 8 * KiB)))
@example(big("kernel", write(0, MAX), read(0, 4), readonly=True))
# A small disk, and each case of the fast path's condition once.
@example(Scenario(4 * KiB, FULL, False, "kernel", [write(0, 4 * KiB), read(1, 4 * KiB - 1), read(1, 4 * KiB)]))
@example(Scenario(4 * KiB, NOTHING, False, "kernel", [write(0, 512, c.CMD_FLAG_FUA), read(0, 512, c.CMD_FLAG_FUA)]))
@example(Scenario(4 * KiB, FULL, True, "simple", [write(0, 512), read(0, 512, c.CMD_FLAG_FUA)]))
@example(Scenario(4 * KiB, FULL, False, "simple", [read(0, 512, c.CMD_FLAG_DF), write(4 * KiB, 0)]))
@example(Scenario(4 * KiB, FULL, False, "structured", [read(0, 512, c.CMD_FLAG_DF), read(4 * KiB - 1, 2)]))
@example(Scenario(4 * KiB, FULL, False, "kernel", [write(1 << 63, 512), read((1 << 64) - 256, 512)]))
@example(Scenario(4 * KiB, FULL, False, "kernel", [write(0, 8, 1 << 5), read(0, 8, 1 << 15), write(0, 8, 2)]))
def test_every_reply_is_what_check_request_and_the_encoders_say(scenario):
    check(scenario)


def test_the_oracle_is_not_the_server():
    """The oracle gets the basics right by itself (so the property is not comparing a thing with itself)."""
    shadow = RamBackend(4096)
    shadow.write(0, b"abcd")
    tflags = c.TF_HAS_FLAGS | c.TF_SEND_FLUSH  # no FUA
    ok = Request(0, c.CMD_READ, 5, 0, 4)
    assert expected_reply(ok, b"", shadow, tflags, False, None) == encode_simple_reply(5) + b"abcd"
    fua = Request(c.CMD_FLAG_FUA, c.CMD_READ, 5, 0, 4)
    assert expected_reply(fua, b"", shadow, tflags, False, None) == encode_simple_reply(5, c.EINVAL)
    ro_write = Request(0, c.CMD_WRITE, 6, 0, 4)
    assert expected_reply(ro_write, b"wxyz", shadow, tflags | c.TF_READ_ONLY, False, None) == encode_simple_reply(
        6, c.EPERM
    )
    assert bytes(shadow.read(0, 4)) == b"abcd"
    past_end = Request(0, c.CMD_WRITE, 7, 4094, 4)
    assert expected_reply(past_end, b"wxyz", shadow, tflags, False, None) == encode_simple_reply(7, c.ENOSPC)
    overlong = Request(0, c.CMD_READ, 8, 0, MAX + 1)
    reply = expected_reply(overlong, b"", shadow, tflags, True, None)
    assert reply == encode_structured_error(8, c.EOVERFLOW, "EOVERFLOW")
