"""Hypothesis over the sans-IO handshake, every byte checked by the spec oracle (tests/nbd_oracle.py).

Generated option sequences -- every option the spec defines and some it does not, well
formed and malformed, on known and unknown exports, with mutations on top (bits flipped,
fields set to edge values, options cut, dropped, repeated, swapped, replaced by noise) --
are fed to `ServerHandshake` whole or in random pieces. The oracle checks every byte it
sends back and when it hangs up; and since nothing here waits on a socket, a complete option
the server leaves unanswered is a hang. When the handshake ends in transmission, what the
server will act on (`negotiated`: the export, structured replies, the metadata contexts) must
be what its replies told the client, and the bytes after the last option must be left over.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import nbd_oracle as o
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buselab.protocol.handshake import ExportInfo, ServerHandshake, State

SIZE = 64 << 20
FLAGS = o.TF_HAS_FLAGS | o.TF_SEND_FLUSH | o.TF_SEND_FUA | o.TF_SEND_TRIM | o.TF_SEND_DF
DISK = ExportInfo(name="disk", size=SIZE, flags=FLAGS, description="a test disk")
OTHER = ExportInfo(name="other", size=4096, flags=o.TF_HAS_FLAGS | o.TF_READ_ONLY)
SERVED = {"": DISK, "disk": DISK, "other": OTHER}
PROFILE = o.Profile(
    {name: o.Export(e.name, e.size, e.flags, e.description) for name, e in SERVED.items()},
    listed=("disk", "other"),
)
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same examples every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def start(flags: int = 3) -> list[bytes]:
    return [struct.pack(">I", flags)]


STRUCTURED = o.option(o.OPT_STRUCTURED_REPLY)
SET_BASE = o.meta_request(o.OPT_SET_META_CONTEXT, "", [o.BASE_ALLOCATION])
GO = o.export_request(o.OPT_GO, "", [])
REQUEST = o.request(o.CMD_READ, 1, 0, 512)


@dataclass
class Scenario:
    messages: list[bytes]
    cuts: list[int] = field(default_factory=list)  # where the stream is split when fed; [] = message by message
    edits: list[str] = field(default_factory=list)

    def chunks(self) -> list[bytes]:
        if not self.cuts:
            return list(self.messages)
        stream = b"".join(self.messages)
        points = sorted({min(c, len(stream)) for c in self.cuts} | {0, len(stream)})
        return [stream[a:b] for a, b in zip(points, points[1:]) if b > a]


@st.composite
def scenarios(draw) -> Scenario:
    ch = o.Chooser(draw=draw)
    messages, transmission = o.gen_handshake(ch, names=["", "disk", "other", "nope", b"\xff", b"a\0b"])
    if transmission and ch.chance(50):
        messages.append(REQUEST)  # the first request, in the same bytes: it must be left over
    edits: list[str] = []
    if ch.chance(35):
        messages, edits = o.mutate(ch, messages, ch.integer(1, 3))
    total = sum(map(len, messages))
    cuts = draw(st.lists(st.integers(1, max(1, total)), max_size=6)) if ch.chance(40) else []
    return Scenario(messages, cuts, edits)


def drive(scenario: Scenario, oracle: o.HandshakeOracle) -> ServerHandshake:
    """Feed the scenario to a ServerHandshake, and everything it sends to the oracle."""
    hs = ServerHandshake(lambda name: SERVED.get(name), lambda: [DISK, OTHER])
    oracle.server_bytes(hs.data_to_send())
    for chunk in scenario.chunks():
        if not chunk:
            continue  # b"" would mean the client hung up
        oracle.client_bytes(chunk)
        hs.receive_data(chunk)
        oracle.server_bytes(hs.data_to_send())
        if hs.state is State.CLOSED:
            oracle.server_eof()
            return hs
        if hs.state is State.DONE:
            return hs
        owed = oracle.must_close and f"a hang-up ({oracle.must_close})" or "an answer"
        assert not oracle.owed, f"the server owes {owed} but waits for more bytes (no client would send them)"
    oracle.client_eof()
    hs.receive_data(b"")
    assert hs.state is State.CLOSED, f"the handshake is {hs.state} after the client hung up"
    oracle.server_eof()
    return hs


def check(scenario: Scenario) -> None:
    oracle = o.HandshakeOracle(PROFILE)
    try:
        hs = drive(scenario, oracle)
        if hs.state is not State.DONE:
            assert oracle.negotiated is None, "the oracle saw transmission start; the server did not"
            return
        got, want = hs.negotiated, oracle.negotiated
        assert want is not None, "the server entered transmission; its replies did not say so"
        assert oracle.leftover_server == b"", "the server sent bytes after the handshake ended"
        assert (got.export.name, got.export.size, got.export.flags) == (want.export.name, want.size, want.flags)
        assert got.structured == want.structured, "structured replies: not what the replies said"
        assert got.meta_contexts == want.contexts, (
            f"the server will use metadata contexts {got.meta_contexts}; its replies selected {want.contexts}"
            " ('Issuing this command replaces all previously-set metadata contexts (including when this command fails)')"
        )
        assert got.no_zeroes == want.no_zeroes
        assert hs.leftover == bytes(oracle.client[oracle.pos :]), "the bytes after the last option are not left over"
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nmutations: {scenario.edits or 'none'}; cuts: {scenario.cuts or 'message by message'}\n"
            f"sent:\n{o.describe(scenario.messages)}\nlast seen:\n" + "\n".join(oracle.log[-12:])
        ) from None


@SETTINGS
@given(scenarios())
# What was wrong once, or still is (see the report of issue 13):
@example(
    Scenario(start() + [STRUCTURED, SET_BASE, o.meta_request(o.OPT_SET_META_CONTEXT, "nope", ["base:allocation"]), GO])
)
@example(Scenario(start() + [STRUCTURED, SET_BASE, o.option(o.OPT_SET_META_CONTEXT, b"\0\0\0\0\0\0\0\1"), GO]))
@example(Scenario(start() + [SET_BASE, STRUCTURED, GO]))  # SET before structured replies fails, and selects nothing
@example(Scenario(start() + [STRUCTURED, o.meta_request(o.OPT_SET_META_CONTEXT, "", ["base:"]), GO]))
@example(Scenario(start() + [STRUCTURED, o.meta_request(o.OPT_LIST_META_CONTEXT, "", ["base:"]), GO]))
# Edges: flags, EXPORT_NAME with and without the zeroes, unknown exports, lengths that do not add up.
@example(Scenario(start(1) + [o.option(o.OPT_EXPORT_NAME, b"disk"), REQUEST]))
@example(Scenario(start(3) + [o.option(o.OPT_EXPORT_NAME, b"")]))
@example(Scenario(start(3) + [o.option(o.OPT_EXPORT_NAME, b"nope")]))
@example(Scenario(start(0x10003) + [GO]))
@example(Scenario(start() + [o.option(o.OPT_GO, b"\0\0\0\x09disk\0\0")]))
@example(
    Scenario(start() + [o.export_request(o.OPT_INFO, "disk", [1, 2, 3]), o.export_request(o.OPT_GO, "disk", [1, 2, 3])])
)
@example(Scenario(start() + [o.option(o.OPT_LIST, b"x"), o.option(o.OPT_LIST), o.option(o.OPT_ABORT, b"bye")]))
@example(Scenario(start() + [o.option(o.OPT_STARTTLS), o.option(0xFFFFFFFF, b"??"), GO], cuts=[1, 5, 30, 31]))
@example(Scenario(start() + [o.option(o.OPT_LIST)] * 65 + [GO]))
@example(Scenario(start() + [o.option(o.OPT_LIST, length=0xFFFFFFFF)]))
def test_generated_handshakes_get_what_the_spec_allows(scenario):
    check(scenario)


# --- the oracle is not a rubber stamp -----------------------------------------------------------------------


def replies(scenario: Scenario) -> bytes:
    hs = ServerHandshake(lambda name: SERVED.get(name), lambda: [DISK, OTHER])
    out = hs.data_to_send()
    for msg in scenario.messages:
        hs.receive_data(msg)
        out += hs.data_to_send()
    return out


def oracle_on(messages: list[bytes], server: bytes) -> o.HandshakeOracle:
    oracle = o.HandshakeOracle(PROFILE)
    for msg in messages:
        oracle.client_bytes(msg)
    oracle.server_bytes(server)
    return oracle


LIST_SESSION = start() + [STRUCTURED, SET_BASE, o.option(o.OPT_LIST), o.export_request(o.OPT_GO, "", [3])]


def reply_at(server: bytes, n: int) -> int:
    """Where the n-th option reply starts in `server` (after the 18-byte greeting)."""
    pos = 18
    for _ in range(n):
        pos += 20 + struct.unpack_from(">I", server, pos + 16)[0]
    return pos


def tamper(server: bytes, pos: int, new: bytes) -> bytes:
    return server[:pos] + new + server[pos + len(new) :]


TAMPERED = {
    "greeting magic": lambda s: tamper(s, 0, b"NBDMAGIX"),
    "a handshake flag the spec does not define": lambda s: tamper(s, 16, b"\x00\x07"),
    "the option echoed wrong": lambda s: tamper(s, reply_at(s, 0) + 8, struct.pack(">I", 9)),
    "STRUCTURED_REPLY refused as unsupported": lambda s: tamper(s, reply_at(s, 0) + 12, struct.pack(">I", o.ERR_UNSUP)),
    "the context id of SET_META_CONTEXT, duplicated": lambda s: (
        s[: reply_at(s, 2)] + s[reply_at(s, 1) : reply_at(s, 2)] + s[reply_at(s, 2) :]
    ),
    "no context where base:allocation was asked": lambda s: s[: reply_at(s, 1)] + s[reply_at(s, 2) :],
    "an export missing from LIST": lambda s: s[: reply_at(s, 3)] + s[reply_at(s, 4) :],
    "the export size in GO": lambda s: tamper(s, reply_at(s, 6) + 22, b"\xff"),
    "bytes after GO's ACK": lambda s: s + bytes(124),
    "GO's ACK missing": lambda s: s[: reply_at(s, 8)],
}


def test_the_untampered_replies_pass():
    oracle = oracle_on(LIST_SESSION, replies(Scenario(LIST_SESSION)))
    assert oracle.negotiated is not None and oracle.negotiated.contexts == {1: o.BASE_ALLOCATION}
    assert oracle.leftover_server == b"" and not oracle.owed


@pytest.mark.parametrize("name", TAMPERED)
def test_the_oracle_catches_tampered_replies(name):
    server = TAMPERED[name](replies(Scenario(LIST_SESSION)))
    with pytest.raises(o.Violation):
        oracle = oracle_on(LIST_SESSION, server)
        if oracle.leftover_server:  # what the transmission oracle would refuse: a reply to no request
            raise o.Violation("bytes after the handshake")
        if oracle.owed:  # what a client would call a hang
            raise o.Violation("an answer owed")
