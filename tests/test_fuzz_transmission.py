"""Hypothesis over the transmission phase, every reply checked by the spec oracle (tests/nbd_oracle.py).

Two layers. `check_request` (sans-IO: the error a request earns before any backend runs it)
must give, for any command, flags, offset and length on any export, an answer the spec
allows. And whole sessions -- a generated handshake, then generated request streams (every
command, unknown ones too, any flags, offsets and lengths biased to the edges), some of them
mutated -- go to a real `Connection` over a socketpair, in lockstep, pipelined or a few bytes
at a time, on RAM disks whose capabilities, size and read-only flag vary. The oracle checks
every byte that comes back (data against a shadow of the disk) and every hang-up, and at the
end the disk must hold what the shadow says.
"""

from __future__ import annotations

import random
import socket
import threading
from dataclasses import dataclass, field

import nbd_oracle as o
import pytest
from helpers import TIMEOUT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buselab.engine.engine import Engine
from buselab.protocol.transmission import Request, check_request
from buselab.storage.backends.ram import RamBackend
from buselab.storage.base import Capabilities
from buselab.transport.connection import Connection

KiB = 1 << 10
MAX = 1 << 25
SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same examples every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- check_request, alone --------------------------------------------------------------------------------

TF_DEFINED = 0x0FFF


def edges(size: int) -> list[int]:
    return [0, 1, 511, 512, size - 1, size, size + 1, MAX, MAX + 1, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1]


@st.composite
def requests_on_exports(draw):
    size = draw(st.sampled_from([512, 4096 + 512, 1 << 20, MAX + 4 * KiB]))
    structured = draw(st.booleans())
    tflags = draw(st.integers(0, TF_DEFINED)) | o.TF_HAS_FLAGS
    if not structured:
        tflags &= ~o.TF_SEND_DF  # "MUST leave this flag clear if structured replies have not been negotiated"
    if not tflags & o.TF_SEND_WRITE_ZEROES:
        tflags &= ~o.TF_SEND_FAST_ZERO
    meta = draw(st.sampled_from(["none", "ok", "other"])) if structured else "none"
    cmd = draw(st.sampled_from([*range(9), 200, 0xFFFF]))
    flags = draw(st.one_of(st.just(0), st.sampled_from([1 << i for i in range(16)]), st.integers(0, 0xFFFF)))
    length = draw(st.one_of(st.sampled_from([n for n in edges(size) if n < 1 << 32]), st.integers(0, size + 1)))
    offset = draw(st.one_of(st.sampled_from(edges(size) + [max(0, size - length)]), st.integers(0, size + 1)))
    return o.Params(size, tflags, structured, meta), cmd, flags, offset, length


@settings(max_examples=3000, **SETTINGS)
@given(requests_on_exports())
@example((o.Params(4096, o.TF_HAS_FLAGS | o.TF_SEND_TRIM), o.CMD_TRIM, 0, 512, 4096))  # TRIM past the end: EINVAL
@example((o.Params(4096, o.TF_HAS_FLAGS | o.TF_SEND_TRIM), o.CMD_TRIM, 0, 4096, 1))
@example((o.Params(MAX + 4 * KiB, o.TF_HAS_FLAGS), o.CMD_WRITE, 0, 0, MAX + 1))  # over the maximum payload
@example((o.Params(4096, o.TF_HAS_FLAGS, True, "none"), o.CMD_BLOCK_STATUS, 0, 0, 512))
def test_check_request_gives_an_answer_the_spec_allows(case):
    p, cmd, flags, offset, length = case
    if cmd == o.CMD_DISC:
        return  # never checked: it closes the connection
    allowed = o.expect(cmd, flags, offset, length, p)
    req = Request(flags, cmd, 1, offset, length)
    error = check_request(req, p.size, p.tflags, p.structured, 0 if p.meta == "none" else 1)
    what = f"{o.COMMAND_NAMES.get(cmd, cmd)} flags={flags:#x} offset={offset} length={length} on {p}"
    if error:
        assert error in allowed.errors, f"{what}: {o.ERRNO_NAMES.get(error, error)}; allowed: {allowed.describe()}"
    else:
        assert allowed.ok, f"{what}: let through; allowed: {allowed.describe()}"


# --- whole sessions over a Connection ------------------------------------------------------------------------


@dataclass
class Scenario:
    size: int
    caps: Capabilities
    readonly: bool
    chunks: list[bytes]
    waits: set[int] = field(default_factory=set)
    seed: int = 0  # of the disk's first content
    note: str = ""


FULL = RamBackend.caps
NOTHING = Capabilities()


@st.composite
def scenarios(draw) -> Scenario:
    size = draw(st.sampled_from([512, 4096 + 512, 64 * KiB]))
    caps = draw(
        st.one_of(
            st.sampled_from([FULL, FULL, NOTHING]),
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
    ch = o.Chooser(draw=draw)
    messages, handshake, edits = o.gen_session(ch, size, most=8)
    chunks, waits, mode = o.plan(ch, messages, handshake)
    note = f"{mode}; mutations: {edits or 'none'}"
    readonly = draw(st.sampled_from([False, False, False, True]))
    return Scenario(size, caps, readonly, chunks, waits, draw(st.integers(0, 1 << 32)), note)


def scenario(*messages: bytes, size: int = 4096, caps: Capabilities = FULL, readonly: bool = False) -> Scenario:
    """A hand-made scenario: the messages in lockstep."""
    return Scenario(size, caps, readonly, list(messages), set(range(len(messages))))


def check(sc: Scenario) -> None:
    data = random.Random(sc.seed).randbytes(sc.size)
    backend = RamBackend(sc.size)
    backend.caps = sc.caps  # what the engine advertises follows from these
    backend.write(0, data)
    engine = Engine(backend, readonly=sc.readonly)
    export = o.Export("", sc.size, engine.flags)
    profile = o.Profile({"": export}, ("",))
    disk = o.ShadowDisk(data)
    oracle = o.SessionOracle(profile, disk)
    server_end, client_end = socket.socketpair()
    conn = Connection(server_end, engine, "fuzz")
    thread = threading.Thread(target=conn.serve, name="fuzz-connection", daemon=True)
    thread.start()
    try:
        o.run_session(client_end, oracle, sc.chunks, sc.waits, timeout=TIMEOUT)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the connection still serves after the client hung up"
        held = bytes(backend.read(0, sc.size))
        for start, end in disk.known(0, sc.size):
            assert held[start:end] == disk.data[start:end], f"the disk differs from the shadow in [{start}, {end})"
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{sc.note}; disk of {sc.size} bytes, flags {engine.flags:#x}, read-only: {sc.readonly}\n"
            f"sent:\n{o.describe(sc.chunks)}\nlast seen:\n{oracle.log()}\n"
            f"the server closed because: {conn.closed_reason or '(still open)'}"
        ) from None
    finally:
        client_end.close()
        thread.join(5)
        engine.close()


HELLO = [(3).to_bytes(4, "big"), o.option(o.OPT_STRUCTURED_REPLY)]
SET_BASE = o.meta_request(o.OPT_SET_META_CONTEXT, "", [o.BASE_ALLOCATION])
GO = o.export_request(o.OPT_GO, "", [o.INFO_BLOCK_SIZE])
DISC = o.request(o.CMD_DISC, 0)


@settings(max_examples=300, **SETTINGS)
@given(scenarios())
# What was wrong once, or still is (see the report of issue 13):
@example(scenario(*HELLO, GO, o.request(o.CMD_READ, 1, 100, 0), DISC))  # zero-length READ, structured
@example(
    scenario(*HELLO, SET_BASE, o.meta_request(o.OPT_SET_META_CONTEXT, "nope", []), GO, o.request(7, 1, 0, 512), DISC)
)
@example(scenario(*HELLO, o.meta_request(o.OPT_SET_META_CONTEXT, "", ["base:"]), GO, o.request(7, 1, 0, 512), DISC))
@example(scenario(HELLO[0], GO, o.request(o.CMD_TRIM, 1, 512, 4096), o.request(o.CMD_TRIM, 2, 4096, 1), DISC))
# Edges: the last byte and one past it; block status of a written, trimmed and zeroed disk; racing writes.
@example(scenario(*HELLO, SET_BASE, GO, o.request(o.CMD_READ, 1, 4095, 1), o.request(o.CMD_READ, 2, 4095, 2), DISC))
@example(
    scenario(
        *HELLO,
        SET_BASE,
        GO,
        o.request(o.CMD_TRIM, 1, 0, 4096),
        o.request(o.CMD_BLOCK_STATUS, 2, 0, 4096),
        o.request(o.CMD_WRITE_ZEROES, 3, 1024, 1024, o.FLAG_NO_HOLE),
        o.request(o.CMD_BLOCK_STATUS, 4, 0, 4096, o.FLAG_REQ_ONE),
        o.request(o.CMD_READ, 5, 0, 4096, o.FLAG_DF),
        DISC,
        size=8192,
    )
)
@example(
    Scenario(
        4096,
        FULL,
        False,
        [HELLO[0], GO, b"".join(o.request(o.CMD_WRITE, i, 0, 512, 0, bytes([i]) * 512) for i in range(1, 6)), DISC],
        {0, 1, 3},
        note="five writes to the same bytes, in flight together",
    )
)
def test_fuzzed_sessions_over_a_connection_get_what_the_spec_allows(sc):
    check(sc)


# --- the oracle is not a rubber stamp -----------------------------------------------------------------------

SIZE = 4096
PARAMS = o.Params(SIZE, o.TF_HAS_FLAGS | o.TF_SEND_TRIM | o.TF_SEND_FLUSH | o.TF_SEND_DF, structured=True, meta="ok")


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return (0x67446698).to_bytes(4, "big") + error.to_bytes(4, "big") + cookie.to_bytes(8, "big") + data


def chunk(cookie: int, ctype: int, payload: bytes = b"", flags: int = 1) -> bytes:
    head = (0x668E33EF).to_bytes(4, "big") + flags.to_bytes(2, "big") + ctype.to_bytes(2, "big")
    return head + cookie.to_bytes(8, "big") + len(payload).to_bytes(4, "big") + payload


def offset_data(cookie: int, offset: int, data: bytes, flags: int = 1) -> bytes:
    return chunk(cookie, o.CHUNK_OFFSET_DATA, offset.to_bytes(8, "big") + data, flags)


def error_chunk(cookie: int, error: int) -> bytes:
    return chunk(cookie, o.CHUNK_ERROR, error.to_bytes(4, "big") + b"\0\0")


DISK = bytes(range(256)) * (SIZE // 256)
CLIENT = [
    o.request(o.CMD_READ, 1, 10, 4),
    o.request(o.CMD_READ, 2, 0, 0),
    o.request(o.CMD_TRIM, 3, SIZE - 512, 1024),
    o.request(o.CMD_WRITE, 4, 0, 2, payload=b"hi"),
    o.request(o.CMD_BLOCK_STATUS, 5, 0, 1024, o.FLAG_REQ_ONE),
    o.request(o.CMD_READ, 6, 0, 4),
]
GOOD = [
    offset_data(1, 10, DISK[10:14]),
    chunk(2, o.CHUNK_NONE),
    error_chunk(3, o.EINVAL),
    simple(4),
    chunk(5, o.CHUNK_BLOCK_STATUS, (1).to_bytes(4, "big") + (1024).to_bytes(4, "big") + bytes(4)),
    offset_data(6, 0, b"hi" + DISK[2:4], 0) + chunk(6, o.CHUNK_NONE),
]
BAD = {
    "the wrong cookie": (0, offset_data(9, 10, DISK[10:14])),
    "a wrong byte": (0, offset_data(1, 10, DISK[10:13] + b"?")),
    "a short read claimed as success": (0, offset_data(1, 10, DISK[10:13])),
    "data outside the request": (0, offset_data(1, 9, DISK[9:14])),
    "a simple reply to a structured READ": (0, simple(1, 0, DISK[10:14])),
    "a zero-length READ answered with an empty OFFSET_DATA": (1, offset_data(2, 0, b"")),
    "TRIM past the end refused with ENOSPC": (2, error_chunk(3, o.ENOSPC)),
    "an error that is not an NBD error": (2, error_chunk(3, 2)),
    "the write said done, and not done": (3, simple(4, o.EIO)),
    "two extents with REQ_ONE": (4, chunk(5, 5, (1).to_bytes(4, "big") + ((512).to_bytes(4, "big") + bytes(4)) * 2)),
    "an unknown context id": (4, chunk(5, 5, (2).to_bytes(4, "big") + (1024).to_bytes(4, "big") + bytes(4))),
    "a NONE chunk without DONE": (1, chunk(2, o.CHUNK_NONE, flags=0)),
    "a reply flag never negotiated": (1, chunk(2, o.CHUNK_NONE, flags=3)),
    "the write not seen by a later read": (5, offset_data(6, 0, DISK[0:4])),
}


def transmission(client: list[bytes], server: list[bytes]) -> o.TransmissionOracle:
    oracle = o.TransmissionOracle(PARAMS, o.ShadowDisk(DISK), {1: o.BASE_ALLOCATION})
    for request, reply in zip(client, server):
        oracle.client_bytes(request)
        oracle.server_bytes(reply)
    return oracle


def test_the_untampered_replies_pass():
    oracle = transmission(CLIENT, GOOD)
    assert [r.error for r in oracle.requests] == [0, 0, o.EINVAL, 0, 0, 0] and not oracle.owed
    oracle.client_eof()
    oracle.server_eof()


@pytest.mark.parametrize("name", BAD)
def test_the_oracle_catches_tampered_replies(name):
    i, reply = BAD[name]
    server = GOOD[:i] + [reply] + GOOD[i + 1 :]
    with pytest.raises(o.Violation):
        transmission(CLIENT, server)


def test_the_oracle_catches_a_hang_up_with_replies_owed():
    oracle = transmission(CLIENT[:2] + [DISC], GOOD[:1] + [b"", b""])
    assert oracle.owed and oracle.must_close == "DISC"
    with pytest.raises(o.Violation, match="MUST handle all outstanding requests"):
        oracle.server_eof()
