"""The fixed-newstyle handshake, byte for byte, with no sockets."""

from __future__ import annotations

import struct

import pytest

from buselab.protocol import constants as c
from buselab.protocol.handshake import (
    META_CONTEXT_BASE_ALLOCATION,
    ExportInfo,
    HandshakeError,
    ServerHandshake,
    State,
    greeting,
    option_reply,
)

SIZE = 64 << 20
FLAGS = c.TF_HAS_FLAGS | c.TF_SEND_FLUSH | c.TF_SEND_FUA | c.TF_SEND_TRIM | c.TF_SEND_DF
EXPORT = ExportInfo(name="disk", size=SIZE, flags=FLAGS, description="a test disk")
OTHER = ExportInfo(name="other", size=4096, flags=c.TF_HAS_FLAGS | c.TF_READ_ONLY)


def lookup(name: str) -> ExportInfo | None:
    return {"": EXPORT, "disk": EXPORT, "other": OTHER}.get(name)


def lister() -> list[ExportInfo]:
    return [EXPORT, OTHER]


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def info_request(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", 0x3E889045565A9, opt, rtype, len(data)) + data


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload); all bytes must be used."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        pos += 20
        payload = data[pos : pos + length]
        assert len(payload) == length
        pos += length
        out.append((opt, rtype, payload))
    return out


def started(flags: int = c.CLIENT_FLAG_FIXED_NEWSTYLE | c.CLIENT_FLAG_NO_ZEROES, **kw) -> ServerHandshake:
    """A handshake that has sent its greeting and received the client flags."""
    hs = ServerHandshake(lookup, lister, **kw)
    assert hs.data_to_send() == greeting()
    hs.receive_data(struct.pack(">I", flags))
    assert hs.state is State.OPTIONS
    assert hs.data_to_send() == b""
    return hs


def feed(hs: ServerHandshake, data: bytes) -> list[tuple[int, int, bytes]]:
    hs.receive_data(data)
    return parse_replies(hs.data_to_send())


# --- greeting and client flags ------------------------------------------------


def test_greeting_bytes():
    expected = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert greeting() == expected
    hs = ServerHandshake(lookup)
    assert hs.state is State.CLIENT_FLAGS
    assert hs.data_to_send() == expected
    assert hs.data_to_send() == b""  # sent once


def test_option_reply_bytes():
    assert option_reply(c.OPT_GO, c.REP_ACK) == bytes.fromhex("0003e889045565a9 00000007 00000001 00000000")
    assert option_reply(3, c.REP_ERR_UNSUP, b"no") == (
        bytes.fromhex("0003e889045565a9 00000003 80000001 00000002") + b"no"
    )


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags):
    hs = ServerHandshake(lookup)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", flags))
    assert hs.state is State.OPTIONS


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF, 1 | 8])
def test_unknown_client_flags_close(flags):
    hs = ServerHandshake(lookup)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", flags))
    assert hs.state is State.CLOSED
    assert "flags" in hs.close_reason
    assert hs.data_to_send() == b""
    assert hs.negotiated is None


def test_partial_client_flags_wait():
    hs = ServerHandshake(lookup)
    hs.data_to_send()
    hs.receive_data(b"\x00\x00\x00")
    assert hs.state is State.CLIENT_FLAGS
    hs.receive_data(b"\x03")
    assert hs.state is State.OPTIONS


def test_eof_during_handshake_closes():
    hs = started()
    hs.receive_data(option(c.OPT_GO)[:10])
    hs.receive_data(b"")
    assert hs.state is State.CLOSED
    assert "closed" in hs.close_reason
    with pytest.raises(HandshakeError):
        hs.receive_data(b"x")


# --- NBD_OPT_EXPORT_NAME --------------------------------------------------------


def test_export_name_with_no_zeroes():
    hs = started()
    hs.receive_data(option(c.OPT_EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == struct.pack(">QH", SIZE, FLAGS & ~c.TF_SEND_DF)
    assert hs.state is State.DONE
    assert hs.negotiated is not None
    assert hs.negotiated.export.name == "disk"
    assert hs.negotiated.no_zeroes is True
    assert hs.negotiated.structured is False


def test_export_name_without_no_zeroes_pads_124_zero_bytes():
    hs = started(c.CLIENT_FLAG_FIXED_NEWSTYLE)
    hs.receive_data(option(c.OPT_EXPORT_NAME, b""))
    out = hs.data_to_send()
    assert len(out) == 8 + 2 + 124
    assert out[:10] == struct.pack(">QH", SIZE, FLAGS & ~c.TF_SEND_DF)
    assert out[10:] == bytes(124)
    assert hs.state is State.DONE
    assert hs.negotiated.no_zeroes is False


def test_export_name_unknown_closes_without_reply():
    hs = started()
    hs.receive_data(option(c.OPT_EXPORT_NAME, b"nope"))
    assert hs.state is State.CLOSED
    assert "nope" in hs.close_reason
    assert hs.data_to_send() == b""
    assert hs.negotiated is None


def test_export_name_not_utf8_closes_without_option_reply():
    # EXPORT_NAME has no error reply: an option-reply here would be garbage to the client.
    hs = started()
    hs.receive_data(option(c.OPT_EXPORT_NAME, b"\xff\xfe"))
    assert hs.state is State.CLOSED
    assert hs.data_to_send() == b""


def test_export_name_after_structured_reply_keeps_it():
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    hs.receive_data(option(c.OPT_EXPORT_NAME, b"disk"))
    # With structured replies DF may be advertised.
    assert hs.data_to_send() == struct.pack(">QH", SIZE, FLAGS)
    assert hs.negotiated.structured is True


def test_leftover_bytes_after_export_name_are_kept():
    hs = started()
    request = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 1, 0, 512)
    hs.receive_data(option(c.OPT_EXPORT_NAME, b"disk") + request)
    assert hs.state is State.DONE
    assert hs.leftover == request


# --- ABORT and LIST ---------------------------------------------------------------


def test_abort_acks_and_closes():
    hs = started()
    hs.receive_data(option(c.OPT_ABORT))
    assert hs.data_to_send() == reply(c.OPT_ABORT, c.REP_ACK)
    assert hs.state is State.CLOSED
    assert "abort" in hs.close_reason


def test_list_sends_each_export_then_ack():
    hs = started()
    hs.receive_data(option(c.OPT_LIST))
    assert hs.data_to_send() == (
        reply(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x04disk")
        + reply(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x05other")
        + reply(c.OPT_LIST, c.REP_ACK)
    )
    assert hs.state is State.OPTIONS


def test_list_default_lister_lists_default_export():
    hs = ServerHandshake(lookup)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3) + option(c.OPT_LIST))
    assert hs.data_to_send() == reply(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x04disk") + reply(c.OPT_LIST, c.REP_ACK)


def test_list_with_data_is_invalid_and_haggling_goes_on():
    hs = started()
    replies = feed(hs, option(c.OPT_LIST, b"junk"))
    assert [(o, t) for o, t, _ in replies] == [(c.OPT_LIST, c.REP_ERR_INVALID)]
    assert hs.state is State.OPTIONS


# --- INFO and GO --------------------------------------------------------------------


def block_size_info(export: ExportInfo = EXPORT) -> bytes:
    return struct.pack(">HIII", c.INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block)


def test_info_bytes_and_haggling_continues():
    hs = started()
    hs.receive_data(option(c.OPT_INFO, info_request("disk", c.INFO_NAME, c.INFO_DESCRIPTION, c.INFO_BLOCK_SIZE)))
    assert hs.data_to_send() == (
        reply(c.OPT_INFO, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, SIZE, FLAGS & ~c.TF_SEND_DF))
        + reply(c.OPT_INFO, c.REP_INFO, struct.pack(">H", c.INFO_NAME) + b"disk")
        + reply(c.OPT_INFO, c.REP_INFO, struct.pack(">H", c.INFO_DESCRIPTION) + b"a test disk")
        + reply(c.OPT_INFO, c.REP_INFO, block_size_info())
        + reply(c.OPT_INFO, c.REP_ACK)
    )
    assert hs.state is State.OPTIONS  # INFO does not end the handshake
    assert hs.negotiated is None


def test_block_size_values_follow_the_spec():
    assert EXPORT.min_block == 1
    assert EXPORT.preferred_block == 4096
    assert EXPORT.max_block == 32 << 20
    for value in (EXPORT.preferred_block, EXPORT.max_block):
        assert value & (value - 1) == 0  # powers of two


def test_go_without_requests_sends_export_and_block_size_then_ends():
    hs = started()
    hs.receive_data(option(c.OPT_GO, info_request("")))
    assert hs.data_to_send() == (
        reply(c.OPT_GO, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, SIZE, FLAGS & ~c.TF_SEND_DF))
        + reply(c.OPT_GO, c.REP_INFO, block_size_info())
        + reply(c.OPT_GO, c.REP_ACK)
    )
    assert hs.state is State.DONE
    assert hs.negotiated.export.name == "disk"
    assert hs.negotiated.export.size == SIZE
    assert hs.negotiated.export.flags == FLAGS & ~c.TF_SEND_DF


def test_go_other_export_read_only():
    hs = started()
    replies = feed(hs, option(c.OPT_GO, info_request("other")))
    assert replies[0] == (c.OPT_GO, c.REP_INFO, struct.pack(">HQH", 0, 4096, c.TF_HAS_FLAGS | c.TF_READ_ONLY))
    assert hs.negotiated.export.flags & c.TF_READ_ONLY


def test_description_omitted_when_empty():
    hs = started()
    replies = feed(hs, option(c.OPT_INFO, info_request("other", c.INFO_DESCRIPTION)))
    types = [struct.unpack_from(">H", p)[0] for _, t, p in replies if t == c.REP_INFO]
    assert types == [c.INFO_EXPORT, c.INFO_BLOCK_SIZE]


def test_unknown_export_gets_err_unknown_and_handshake_goes_on():
    hs = started()
    replies = feed(hs, option(c.OPT_GO, info_request("missing")))
    assert len(replies) == 1
    opt, rtype, payload = replies[0]
    assert (opt, rtype) == (c.OPT_GO, c.REP_ERR_UNKNOWN)
    assert b"missing" in payload
    assert hs.state is State.OPTIONS
    replies = feed(hs, option(c.OPT_INFO, info_request("missing")))
    assert replies[0][1] == c.REP_ERR_UNKNOWN
    replies = feed(hs, option(c.OPT_GO, info_request("disk")))
    assert replies[-1] == (c.OPT_GO, c.REP_ACK, b"")
    assert hs.state is State.DONE


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no name length
        b"\x00\x00\x00",  # short name length
        b"\x00\x00\x00\x09disk",  # name runs past the end
        b"\x00\x00\x00\x04disk",  # no request count
        b"\x00\x00\x00\x04disk\x00\x02\x00\x01",  # count 2, one given
        b"\x00\x00\x00\x04disk\x00\x00\x00",  # trailing byte
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # name not UTF-8
    ],
)
def test_malformed_info_go_is_invalid_and_haggling_goes_on(data):
    hs = started()
    replies = feed(hs, option(c.OPT_GO, data))
    assert [(o, t) for o, t, _ in replies] == [(c.OPT_GO, c.REP_ERR_INVALID)]
    assert hs.state is State.OPTIONS
    feed(hs, option(c.OPT_GO, info_request("")))
    assert hs.state is State.DONE


# --- STRUCTURED_REPLY and meta contexts -----------------------------------------------


def test_structured_reply_ack():
    hs = started()
    hs.receive_data(option(c.OPT_STRUCTURED_REPLY))
    assert hs.data_to_send() == reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK)
    replies = feed(hs, option(c.OPT_GO, info_request("")))
    # Once structured replies are on, DF may be (and is) advertised.
    assert replies[0][2] == struct.pack(">HQH", c.INFO_EXPORT, SIZE, FLAGS)
    assert hs.negotiated.structured is True


def test_structured_reply_with_data_is_invalid():
    hs = started()
    replies = feed(hs, option(c.OPT_STRUCTURED_REPLY, b"x"))
    assert [(o, t) for o, t, _ in replies] == [(c.OPT_STRUCTURED_REPLY, c.REP_ERR_INVALID)]
    feed(hs, option(c.OPT_GO, info_request("")))
    assert hs.negotiated.structured is False


def test_send_df_never_advertised_without_structured_replies():
    hs = started()
    replies = feed(hs, option(c.OPT_GO, info_request("")))
    (_, size, flags) = struct.unpack(">HQH", replies[0][2])
    assert not flags & c.TF_SEND_DF
    assert not hs.negotiated.export.flags & c.TF_SEND_DF  # so the server refuses DF later


def meta_reply(opt: int, context_id: int) -> bytes:
    return reply(opt, c.REP_META_CONTEXT, struct.pack(">I", context_id) + b"base:allocation")


def test_list_meta_context_without_queries_lists_base_allocation():
    hs = started()
    hs.receive_data(option(c.OPT_LIST_META_CONTEXT, meta_request("disk")))
    assert hs.data_to_send() == meta_reply(c.OPT_LIST_META_CONTEXT, 0) + reply(c.OPT_LIST_META_CONTEXT, c.REP_ACK)


@pytest.mark.parametrize("query", ["base:allocation", "base:"])
def test_list_meta_context_query(query):
    hs = started()
    hs.receive_data(option(c.OPT_LIST_META_CONTEXT, meta_request("", query)))
    assert hs.data_to_send() == meta_reply(c.OPT_LIST_META_CONTEXT, 0) + reply(c.OPT_LIST_META_CONTEXT, c.REP_ACK)


def test_list_meta_context_unknown_query_only_acks():
    hs = started()
    hs.receive_data(option(c.OPT_LIST_META_CONTEXT, meta_request("", "qemu:dirty-bitmap:x")))
    assert hs.data_to_send() == reply(c.OPT_LIST_META_CONTEXT, c.REP_ACK)


def test_set_meta_context_before_structured_reply_is_invalid():
    hs = started()
    replies = feed(hs, option(c.OPT_SET_META_CONTEXT, meta_request("", "base:allocation")))
    assert [(o, t) for o, t, _ in replies] == [(c.OPT_SET_META_CONTEXT, c.REP_ERR_INVALID)]
    assert hs.state is State.OPTIONS
    feed(hs, option(c.OPT_GO, info_request("")))
    assert hs.negotiated.meta_contexts == {}


def test_set_meta_context_base_allocation():
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    hs.receive_data(option(c.OPT_SET_META_CONTEXT, meta_request("disk", "base:allocation")))
    assert hs.data_to_send() == (
        meta_reply(c.OPT_SET_META_CONTEXT, META_CONTEXT_BASE_ALLOCATION) + reply(c.OPT_SET_META_CONTEXT, c.REP_ACK)
    )
    assert META_CONTEXT_BASE_ALLOCATION != 0
    feed(hs, option(c.OPT_GO, info_request("disk")))
    assert hs.negotiated.structured is True
    assert hs.negotiated.meta_contexts == {META_CONTEXT_BASE_ALLOCATION: "base:allocation"}


def test_set_meta_context_unknown_query_clears_previous_selection():
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    feed(hs, option(c.OPT_SET_META_CONTEXT, meta_request("", "base:allocation")))
    replies = feed(hs, option(c.OPT_SET_META_CONTEXT, meta_request("", "qemu:dirty-bitmap:x")))
    assert replies == [(c.OPT_SET_META_CONTEXT, c.REP_ACK, b"")]
    feed(hs, option(c.OPT_GO, info_request("")))
    assert hs.negotiated.meta_contexts == {}


def test_meta_context_unknown_export():
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    for opt in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
        replies = feed(hs, option(opt, meta_request("missing", "base:allocation")))
        assert [(o, t) for o, t, _ in replies] == [(opt, c.REP_ERR_UNKNOWN)]
    assert hs.state is State.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",
        b"\x00\x00\x00\x00",  # no query count
        b"\x00\x00\x00\x00\x00\x00\x00\x01",  # one query missing
        b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x10base",  # query runs past the end
        b"\x00\x00\x00\x00\x00\x00\x00\x00zz",  # trailing bytes
    ],
)
def test_malformed_meta_context_is_invalid(data):
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    replies = feed(hs, option(c.OPT_LIST_META_CONTEXT, data))
    assert [(o, t) for o, t, _ in replies] == [(c.OPT_LIST_META_CONTEXT, c.REP_ERR_INVALID)]
    assert hs.state is State.OPTIONS


# --- unknown options, limits -------------------------------------------------------------


@pytest.mark.parametrize("opt", [c.OPT_PEEK_EXPORT, c.OPT_STARTTLS, 11, 99, 0xFFFFFFFF])
def test_unknown_option_err_unsup_and_haggling_continues(opt):
    hs = started()
    replies = feed(hs, option(opt, b"some data"))
    assert len(replies) == 1
    assert replies[0][:2] == (opt, c.REP_ERR_UNSUP)
    assert hs.state is State.OPTIONS
    replies = feed(hs, option(c.OPT_GO, info_request("")))
    assert replies[-1] == (c.OPT_GO, c.REP_ACK, b"")
    assert hs.state is State.DONE


def test_option_length_over_cap_closes_before_the_data_arrives():
    hs = started()
    hs.receive_data(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, c.MAX_OPTION_LENGTH + 1))
    assert hs.state is State.CLOSED
    assert str(c.MAX_OPTION_LENGTH) in hs.close_reason
    assert hs.data_to_send() == b""


def test_option_length_at_cap_is_buffered():
    hs = started()
    replies = feed(hs, option(99, bytes(c.MAX_OPTION_LENGTH)))
    assert replies[0][:2] == (99, c.REP_ERR_UNSUP)
    assert hs.state is State.OPTIONS


def test_bad_option_magic_closes():
    hs = started()
    hs.receive_data(struct.pack(">QII", 0x1122334455667788, c.OPT_GO, 0))
    assert hs.state is State.CLOSED
    assert "magic" in hs.close_reason


def test_too_many_options_close():
    hs = started(max_options=c.MAX_OPTIONS)
    hs.receive_data(option(c.OPT_LIST) * c.MAX_OPTIONS)
    assert len(parse_replies(hs.data_to_send())) == 3 * c.MAX_OPTIONS
    assert hs.state is State.OPTIONS
    hs.receive_data(option(c.OPT_LIST))
    assert hs.state is State.CLOSED
    assert hs.data_to_send() == b""
    assert "options" in hs.close_reason


def test_option_count_default_is_bounded():
    assert 0 < c.MAX_OPTIONS <= 1024
    hs = started()
    hs.receive_data(option(99) * (c.MAX_OPTIONS + 1))
    assert hs.state is State.CLOSED


# --- byte at a time -----------------------------------------------------------------------


def full_client_stream() -> bytes:
    return (
        struct.pack(">I", 3)
        + option(c.OPT_LIST)
        + option(99, b"xyz")
        + option(c.OPT_INFO, info_request("disk", c.INFO_NAME))
        + option(c.OPT_STRUCTURED_REPLY)
        + option(c.OPT_LIST_META_CONTEXT, meta_request(""))
        + option(c.OPT_SET_META_CONTEXT, meta_request("", "base:allocation"))
        + option(c.OPT_GO, info_request("disk", c.INFO_BLOCK_SIZE))
        + struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_FLUSH, 9, 0, 0)
    )


def test_bytes_one_at_a_time_give_the_same_result():
    stream = full_client_stream()
    whole = ServerHandshake(lookup, lister)
    whole.receive_data(stream)
    expected = whole.data_to_send()
    assert whole.state is State.DONE

    trickle = ServerHandshake(lookup, lister)
    out = bytearray(trickle.data_to_send())
    handshake_end = len(stream) - 28  # the FLUSH request after GO is not the handshake's
    for i in range(handshake_end):
        assert trickle.state is not State.DONE, f"finished early at byte {i}"
        trickle.receive_data(stream[i : i + 1])
        out += trickle.data_to_send()
    assert bytes(out) == expected
    assert trickle.state is State.DONE
    assert trickle.negotiated == whole.negotiated
    assert trickle.leftover == b""
    assert whole.leftover == stream[handshake_end:]
    replies = parse_replies(bytes(out)[18:])
    assert [r[0] for r in replies if r[1] == c.REP_ACK] == [
        c.OPT_LIST,
        c.OPT_INFO,
        c.OPT_STRUCTURED_REPLY,
        c.OPT_LIST_META_CONTEXT,
        c.OPT_SET_META_CONTEXT,
        c.OPT_GO,
    ]


def test_data_after_done_is_refused():
    hs = started()
    feed(hs, option(c.OPT_GO, info_request("")))
    with pytest.raises(HandshakeError):
        hs.receive_data(b"more")


@pytest.mark.parametrize(
    "failing",
    [
        meta_request("missing", "base:allocation"),  # unknown export: REP_ERR_UNKNOWN
        b"\x00\x00\x00\x00\x00\x00\x00\x00zz",  # malformed: REP_ERR_INVALID
    ],
    ids=["unknown-export", "malformed"],
)
def test_a_failed_set_meta_context_leaves_no_context_selected(failing):
    """The spec: a SET that fails clears what an earlier SET selected, it does not keep it."""
    hs = started()
    feed(hs, option(c.OPT_STRUCTURED_REPLY))
    feed(hs, option(c.OPT_SET_META_CONTEXT, meta_request("", "base:allocation")))
    replies = feed(hs, option(c.OPT_SET_META_CONTEXT, failing))
    assert replies[-1][1] & c.REP_FLAG_ERROR
    feed(hs, option(c.OPT_GO, info_request("")))
    assert hs.negotiated.meta_contexts == {}
