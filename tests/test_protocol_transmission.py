"""Transmission phase, byte for byte: request parsing, request checks, reply encoders."""

from __future__ import annotations

import struct

import pytest

from buselab.protocol import constants as c
from buselab.protocol.transmission import (
    ProtocolError,
    Request,
    check_request,
    clip_extents,
    encode_block_status,
    encode_chunk_header,
    encode_request,
    encode_simple_reply,
    encode_structured_done,
    encode_structured_error,
    encode_structured_read_header,
    parse_request,
    write_payload_length,
)

SIZE = 1 << 20
ALL = (
    c.TF_HAS_FLAGS
    | c.TF_SEND_FLUSH
    | c.TF_SEND_FUA
    | c.TF_SEND_TRIM
    | c.TF_SEND_WRITE_ZEROES
    | c.TF_SEND_DF
    | c.TF_CAN_MULTI_CONN
    | c.TF_SEND_CACHE
    | c.TF_SEND_FAST_ZERO
)
MINIMAL = c.TF_HAS_FLAGS  # a backend with nothing optional
READ_ONLY = ALL | c.TF_READ_ONLY


def req(cmd: int, offset: int = 0, length: int = 512, flags: int = 0, handle: int = 1) -> Request:
    return Request(flags, cmd, handle, offset, length)


def check(r: Request, tflags: int = ALL, structured: bool = False, meta: int = 0, size: int = SIZE) -> int:
    return check_request(r, size, tflags, structured, meta)


# --- requests -------------------------------------------------------------------


def test_request_header_bytes():
    raw = encode_request(c.CMD_WRITE, 0x0102030405060708, 0x1000, 512, c.CMD_FLAG_FUA)
    assert raw == bytes.fromhex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    assert len(raw) == 28


def test_parse_request_round_trip():
    r = parse_request(encode_request(c.CMD_READ, 42, 1 << 40, 4096, c.CMD_FLAG_DF))
    assert (r.flags, r.cmd, r.handle, r.offset, r.length) == (c.CMD_FLAG_DF, c.CMD_READ, 42, 1 << 40, 4096)
    assert r.name == "READ"
    assert r.payload is None
    assert not r.fua
    assert parse_request(encode_request(c.CMD_WRITE, 1, 0, 1, c.CMD_FLAG_FUA)).fua


def test_parse_request_accepts_memoryview():
    raw = bytearray(encode_request(c.CMD_TRIM, 7, 512, 1024))
    assert parse_request(memoryview(raw)).cmd == c.CMD_TRIM


@pytest.mark.parametrize("magic", [0, 0x25609514, 0x67446698, 0xFFFFFFFF])
def test_parse_request_bad_magic(magic):
    raw = struct.pack(">IHHQQI", magic, 0, 0, 1, 0, 512)
    with pytest.raises(ProtocolError, match="magic"):
        parse_request(raw)


def test_parse_request_wrong_length():
    with pytest.raises(struct.error):
        parse_request(encode_request(0, 1, 0, 1)[:27])


def test_unknown_command_name():
    assert req(99).name == "CMD99"


def test_write_payload_length():
    assert write_payload_length(req(c.CMD_WRITE, length=4096)) == 4096
    for cmd in (c.CMD_READ, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_FLUSH, c.CMD_BLOCK_STATUS, c.CMD_CACHE):
        assert write_payload_length(req(cmd, length=4096)) == 0


# --- check_request: what is fine ------------------------------------------------------


@pytest.mark.parametrize(
    "r",
    [
        req(c.CMD_READ, 0, SIZE),
        req(c.CMD_READ, SIZE - 1, 1),
        req(c.CMD_READ, SIZE, 0),
        req(c.CMD_WRITE, SIZE - 512, 512),
        req(c.CMD_WRITE, 0, 512, c.CMD_FLAG_FUA),
        req(c.CMD_READ, 0, 512, c.CMD_FLAG_FUA),
        req(c.CMD_FLUSH, 0, 0),
        req(c.CMD_TRIM, 0, SIZE),
        req(c.CMD_TRIM, 0, SIZE, c.CMD_FLAG_FUA),
        req(c.CMD_WRITE_ZEROES, 0, SIZE, c.CMD_FLAG_NO_HOLE),
        req(c.CMD_WRITE_ZEROES, 0, SIZE, c.CMD_FLAG_FAST_ZERO | c.CMD_FLAG_FUA),
        req(c.CMD_CACHE, 0, SIZE),
        req(c.CMD_DISC, 0, 0),
    ],
    ids=lambda r: f"{r.name}-{r.offset}+{r.length}-f{r.flags}",
)
def test_valid_requests(r):
    assert check(r) == 0


def test_read_max_payload_is_fine():
    assert check(req(c.CMD_READ, 0, c.MAX_PAYLOAD), size=1 << 30) == 0
    assert check(req(c.CMD_WRITE, 0, c.MAX_PAYLOAD), size=1 << 30) == 0


def test_block_status_needs_a_meta_context():
    r = req(c.CMD_BLOCK_STATUS, 0, SIZE)
    assert check(r, structured=True, meta=1) == 0
    assert check(req(c.CMD_BLOCK_STATUS, 0, SIZE, c.CMD_FLAG_REQ_ONE), structured=True, meta=1) == 0
    assert check(r, structured=True, meta=0) == c.EINVAL
    assert check(r) == c.EINVAL
    assert check(req(c.CMD_BLOCK_STATUS, 0, 0), structured=True, meta=1) == c.EINVAL


def test_df_only_on_structured_reads():
    assert check(req(c.CMD_READ, 0, 512, c.CMD_FLAG_DF), structured=True) == 0
    assert check(req(c.CMD_READ, 0, 512, c.CMD_FLAG_DF), structured=False) == c.EINVAL
    assert check(req(c.CMD_WRITE, 0, 512, c.CMD_FLAG_DF), structured=True) == c.EINVAL


# --- check_request: every error path -------------------------------------------------


@pytest.mark.parametrize(
    "r, expected",
    [
        # out of range reads and other non-writes: EINVAL
        (req(c.CMD_READ, SIZE, 1), c.EINVAL),
        (req(c.CMD_READ, SIZE - 511, 512), c.EINVAL),
        (req(c.CMD_READ, (1 << 64) - 512, 512), c.EINVAL),
        (req(c.CMD_CACHE, SIZE, 512), c.EINVAL),
        # writes past the end: ENOSPC
        (req(c.CMD_WRITE, SIZE - 511, 512), c.ENOSPC),
        (req(c.CMD_WRITE, SIZE, 1), c.ENOSPC),
        (req(c.CMD_TRIM, 512, SIZE), c.EINVAL),  # the spec: ENOSPC is for writes only
        (req(c.CMD_WRITE_ZEROES, SIZE, 4096), c.ENOSPC),
        # over-long requests: EOVERFLOW for a READ, EINVAL for a WRITE (which carries its payload)
        (req(c.CMD_READ, 0, c.MAX_PAYLOAD + 1), c.EOVERFLOW),
        (req(c.CMD_WRITE, 0, c.MAX_PAYLOAD + 1), c.EINVAL),  # SHOULD NOT: EOVERFLOW is for no-payload commands
        (req(c.CMD_WRITE, 0, 0xFFFFFFFF), c.EINVAL),
        # unknown commands
        (req(8), c.EINVAL),
        (req(99), c.EINVAL),
        (req(0xFFFF), c.EINVAL),
        # unknown flags, flags that do not apply
        (req(c.CMD_READ, flags=1 << 5), c.EINVAL),
        (req(c.CMD_WRITE, flags=1 << 15), c.EINVAL),
        (req(c.CMD_WRITE, flags=c.CMD_FLAG_NO_HOLE), c.EINVAL),
        (req(c.CMD_TRIM, flags=c.CMD_FLAG_FAST_ZERO), c.EINVAL),
        (req(c.CMD_READ, flags=c.CMD_FLAG_REQ_ONE), c.EINVAL),
        # flush with offset or length
        (req(c.CMD_FLUSH, 512, 0), c.EINVAL),
        (req(c.CMD_FLUSH, 0, 512), c.EINVAL),
    ],
    ids=lambda v: v.name + f"-{v.offset}+{v.length}-f{v.flags}" if isinstance(v, Request) else c.ERRNO_NAMES[v],
)
def test_error_paths(r, expected):
    assert check(r) == expected


def test_overlong_read_is_eoverflow_even_past_the_end():
    assert check(req(c.CMD_READ, SIZE, c.MAX_PAYLOAD + 1)) == c.EOVERFLOW


@pytest.mark.parametrize("cmd", [c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(cmd):
    assert check(req(cmd, 0, 512), tflags=READ_ONLY) == c.EPERM
    # Even past the end: EPERM says what the client must fix first.
    assert check(req(cmd, SIZE, 512), tflags=READ_ONLY) == c.EPERM


def test_read_only_export_still_reads_and_flushes():
    assert check(req(c.CMD_READ), tflags=READ_ONLY) == 0
    assert check(req(c.CMD_FLUSH, 0, 0), tflags=READ_ONLY) == 0
    assert check(req(c.CMD_CACHE), tflags=READ_ONLY) == 0


@pytest.mark.parametrize(
    "r",
    [
        req(c.CMD_WRITE, flags=c.CMD_FLAG_FUA),  # FUA not advertised
        req(c.CMD_READ, flags=c.CMD_FLAG_FUA),
        req(c.CMD_FLUSH, 0, 0),
        req(c.CMD_TRIM),
        req(c.CMD_WRITE_ZEROES),
        req(c.CMD_CACHE),
    ],
    ids=lambda r: f"{r.name}-f{r.flags}",
)
def test_commands_not_advertised_are_einval(r):
    assert check(r, tflags=MINIMAL) == c.EINVAL
    # ...and fine when advertised.
    assert check(r, tflags=ALL) == 0


def test_fast_zero_needs_its_flag():
    r = req(c.CMD_WRITE_ZEROES, flags=c.CMD_FLAG_FAST_ZERO)
    assert check(r, tflags=ALL & ~c.TF_SEND_FAST_ZERO) == c.EINVAL
    assert check(r, tflags=ALL) == 0


def test_plain_read_and_write_on_minimal_export():
    assert check(req(c.CMD_READ), tflags=MINIMAL) == 0
    assert check(req(c.CMD_WRITE), tflags=MINIMAL) == 0


# --- reply encoders -----------------------------------------------------------------------


def test_simple_reply_bytes():
    assert encode_simple_reply(0x1122334455667788) == bytes.fromhex("67446698 00000000 1122334455667788")
    # Errors go out in network byte order with the protocol's numbers (BUSE #12).
    assert encode_simple_reply(1, c.EIO) == bytes.fromhex("67446698 00000005 0000000000000001")
    assert encode_simple_reply(2, c.ENOSPC) == bytes.fromhex("67446698 0000001c 0000000000000002")


def test_chunk_header_bytes():
    assert encode_chunk_header(5, c.REPLY_TYPE_NONE, 0) == bytes.fromhex("668e33ef 0001 0000 0000000000000005 00000000")
    assert encode_chunk_header(5, c.REPLY_TYPE_OFFSET_DATA, 10, flags=0) == bytes.fromhex(
        "668e33ef 0000 0001 0000000000000005 0000000a"
    )


def test_structured_done_bytes():
    assert encode_structured_done(9) == bytes.fromhex("668e33ef 0001 0000 0000000000000009 00000000")


def test_structured_read_header_bytes():
    header = encode_structured_read_header(3, 0x10000, 4096)
    assert header == bytes.fromhex("668e33ef 0001 0001 0000000000000003 00001008 0000000000010000")
    assert len(header) == 20 + 8


def test_structured_error_bytes():
    assert encode_structured_error(4, c.EIO, "EIO") == (
        bytes.fromhex("668e33ef 0001 8001 0000000000000004 00000009 00000005 0003") + b"EIO"
    )
    assert encode_structured_error(4, c.EINVAL) == bytes.fromhex(
        "668e33ef 0001 8001 0000000000000004 00000006 00000016 0000"
    )


def test_structured_error_message_is_capped_at_4096_bytes():
    out = encode_structured_error(1, c.EIO, "x" * 10000)
    _, _, _, _, length = c.STRUCTURED_REPLY.unpack_from(out)
    assert length == 6 + 4096
    assert len(out) == 20 + 6 + 4096


def test_block_status_bytes():
    out = encode_block_status(6, 1, [(4096, 0), (8192, c.STATE_HOLE | c.STATE_ZERO)])
    assert out == bytes.fromhex(
        "668e33ef 0001 0005 0000000000000006 00000014 00000001 00001000 00000000 00002000 00000003"
    )


# --- clip_extents -----------------------------------------------------------------------------

HOLE = c.STATE_HOLE | c.STATE_ZERO


def test_clip_merges_equal_neighbours():
    assert clip_extents([(512, 0), (512, 0), (1024, HOLE), (512, HOLE)], 2560, False) == [(1024, 0), (1536, HOLE)]


def test_clip_drops_empty_extents():
    assert clip_extents([(0, 0), (512, HOLE), (0, 0), (512, HOLE)], 1024, False) == [(1024, HOLE)]


def test_clip_to_request_length():
    assert clip_extents([(4096, 0), (4096, HOLE)], 5000, False) == [(4096, 0), (904, HOLE)]
    assert clip_extents([(1 << 20, HOLE)], 4096, False) == [(4096, HOLE)]


def test_clip_req_one_gives_one_extent():
    assert clip_extents([(4096, 0), (4096, HOLE)], 8192, True) == [(4096, 0)]
    assert clip_extents([(4096, 0), (4096, 0), (4096, HOLE)], 12288, True) == [(8192, 0)]


def test_clip_short_backend_answer_is_kept_short():
    # The spec allows fewer bytes than asked, never more.
    assert clip_extents([(512, 0)], 4096, False) == [(512, 0)]


def test_clip_keeps_lengths_u32_and_never_shifts_later_extents():
    # A 5 GiB data run then a hole, for a request just under 4 GiB: the data
    # extent must be cut, and the hole must NOT be reported right after the cut
    # (that would call real data a hole, and nbdcopy would skip copying it).
    length = 0xFFFFFFFF
    out = clip_extents([(5 << 30, 0), (1 << 20, HOLE)], length, False)
    assert all(0 < n <= 0xFFFFFFFF for n, _ in out)
    assert out[0][1] == 0
    assert sum(n for n, _ in out) <= length
    assert [f for _, f in out] == [0]
    assert out[0][0] % 4096 == 0


def test_clip_total_never_exceeds_length():
    extents = [(700, 0), (300, HOLE), (1 << 33, 0)]
    for length in (1, 699, 700, 701, 1000, 4096, 0xFFFFFFFF):
        out = clip_extents(extents, length, False)
        assert out
        assert sum(n for n, _ in out) <= length
        assert all(a[1] != b[1] for a, b in zip(out, out[1:]))
