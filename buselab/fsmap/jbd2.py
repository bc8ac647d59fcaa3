"""The jbd2 journal (ext3/ext4), read from its blocks' own headers.

Every block the journal writes for itself starts with a 12-byte big-endian header: the magic
0xC03B3998, a block type (1 descriptor, 2 commit, 3/4 superblock v1/v2, 5 revoke) and the
transaction's sequence number. A descriptor lists, in tags, the file-system blocks whose copies
follow it in the log; a commit closes the transaction. Logged copies that happen to start with
the magic are stored with it zeroed (the ESCAPE flag), so a block that starts with the magic is
always one of the journal's own. Layout: the kernel's Documentation/filesystems/ext4/journal.rst.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .layouts import JBD2_HEADER, JBD2_MAGIC, JBD2_REVOKE_COUNT, JBD2_SUPERBLOCK

DESCRIPTOR, COMMIT, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE = 1, 2, 3, 4, 5
BLOCK_TYPES = {DESCRIPTOR: "descriptor", COMMIT: "commit", SUPERBLOCK_V1: "superblock", SUPERBLOCK_V2: "superblock"}
BLOCK_TYPES[REVOKE] = "revoke"

INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT = 0x1, 0x2, 0x4
INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3, INCOMPAT_FAST_COMMIT = 0x8, 0x10, 0x20
INCOMPAT_NAMES = {
    INCOMPAT_REVOKE: "revoke",
    INCOMPAT_64BIT: "64bit",
    INCOMPAT_ASYNC_COMMIT: "async_commit",
    INCOMPAT_CSUM_V2: "csum_v2",
    INCOMPAT_CSUM_V3: "csum_v3",
    INCOMPAT_FAST_COMMIT: "fast_commit",
}
TAG_ESCAPE, TAG_SAME_UUID, TAG_DELETED, TAG_LAST = 0x1, 0x2, 0x4, 0x8
_MAGIC = JBD2_MAGIC.to_bytes(4, "big")
MAX_DECODED_BLOCKS = 256  # of one request's data: a bound on the cost of a label


@dataclass
class JournalArea:
    """Where a jbd2 journal lives on the disk, so a request's own bytes can be decoded."""

    fs_offset: int  # where its file system starts on the disk
    block_size: int
    extents: list[tuple[int, int, int]]  # (disk offset, length, first journal block)
    prefix: str = ""  # "partition 1 (ext4): " on a partitioned disk
    incompat: int = 0
    first: int = 1  # s_first: the first block of the log
    maxlen: int = 0  # s_maxlen: blocks in the journal
    fast_commit_blocks: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tag_bytes(self) -> int:
        """Size of one descriptor tag (the kernel's journal_tag_bytes)."""
        if self.incompat & INCOMPAT_CSUM_V3:
            return 16
        size = 12 + (2 if self.incompat & INCOMPAT_CSUM_V2 else 0)
        return size if self.incompat & INCOMPAT_64BIT else size - 4

    @property
    def has_tail(self) -> bool:
        return bool(self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))

    def journal_block(self, disk_offset: int) -> int | None:
        for start, length, first in self.extents:
            if start <= disk_offset < start + length:
                return first + (disk_offset - start) // self.block_size
        return None


def parse_superblock(buf: bytes) -> dict[str, Any] | None:
    """The jbd2 superblock's fields that say where the log is, or None if `buf` is not one."""
    if len(buf) < JBD2_SUPERBLOCK.size:
        return None
    sb = JBD2_SUPERBLOCK.parse(buf)
    if sb.h_magic != JBD2_MAGIC or sb.h_blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        return None
    v2 = sb.h_blocktype == SUPERBLOCK_V2
    incompat = sb.s_feature_incompat if v2 else 0
    return {
        "version": 2 if v2 else 1,
        "block_size": sb.s_blocksize,
        "blocks": sb.s_maxlen,
        "first": sb.s_first,
        "sequence": sb.s_sequence,
        "start": sb.s_start,  # 0: the log is empty (clean); else recovery starts at this block
        "errno": sb.s_errno,
        "features": [name for bit, name in INCOMPAT_NAMES.items() if incompat & bit],
        "incompat": incompat,
        "fast_commit_blocks": (sb.s_num_fc_blks or 256) if incompat & INCOMPAT_FAST_COMMIT else 0,
        "users": sb.s_nr_users if v2 else 1,
    }


def header(block: bytes | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """(block type, sequence) of a journal block that starts at `pos`, or None for logged data."""
    if block[pos : pos + 4] != _MAGIC or len(block) < pos + 12:
        return None
    _, blocktype, sequence = JBD2_HEADER.struct.unpack_from(block, pos)
    return (blocktype, sequence) if blocktype in BLOCK_TYPES else None


def descriptor_tags(area: JournalArea, block: bytes | memoryview, pos: int = 0) -> list[int]:
    """The file-system block numbers a descriptor block's tags name, in log order."""
    return [target for target, _ in descriptor_entries(area, block, pos)]


def descriptor_entries(area: JournalArea, block: bytes | memoryview, pos: int = 0) -> list[tuple[int, int]]:
    """(file-system block, tag flags) of each tag of a descriptor block, in log order."""
    end = pos + area.block_size - (4 if area.has_tail else 0)
    end = min(end, len(block))
    p = pos + 12
    size = area.tag_bytes
    wide = bool(area.incompat & INCOMPAT_64BIT)
    # tag3 (csum_v3): blocknr, flags (32 bits), blocknr_high, checksum; the older tag: blocknr,
    # checksum (16 bits), flags (16 bits), then blocknr_high with 64bit. Never read past a tag.
    v3 = bool(area.incompat & INCOMPAT_CSUM_V3)
    unpack = (_TAG3 if v3 else _TAG_WIDE if wide else _TAG_NARROW).unpack_from
    entries: list[tuple[int, int]] = []
    while p + size <= end and len(entries) < area.block_size:
        values = unpack(block, p)
        flags = values[1]
        entries.append((values[0] | values[2] << 32 if wide else values[0], flags))
        p += size if flags & TAG_SAME_UUID else size + 16
        if flags & TAG_LAST:
            break
    return entries


_TAG3 = struct.Struct(">III")  # blocknr, flags, blocknr_high (then a checksum, not needed)
_TAG_WIDE = struct.Struct(">I2xHI")  # blocknr, (checksum), flags, blocknr_high
_TAG_NARROW = struct.Struct(">I2xH")  # blocknr, (checksum), flags


def revoked_blocks(area: JournalArea, block: bytes | memoryview, pos: int = 0) -> list[int]:
    """The file-system blocks a revoke block revokes."""
    if len(block) < pos + 16:
        return []
    (used,) = JBD2_REVOKE_COUNT.unpack_from(block, pos + 12)
    entry = 8 if area.incompat & INCOMPAT_64BIT else 4
    end = pos + min(used, area.block_size, len(block) - pos)
    return [int.from_bytes(block[p : p + entry], "big") for p in range(pos + 16, end - entry + 1, entry)]


@dataclass
class Replay:
    """What recovery would write in place: file-system block -> (journal block of its newest copy, escaped)."""

    blocks: dict[int, tuple[int, bool]]
    transactions: int  # committed transactions found in the live log
    end_sequence: int  # the first sequence number not found


def replay_plan(area: JournalArea, read_block: Callable[[int], bytes], start: int, sequence: int) -> Replay:
    """Walk the live log as jbd2 recovery does: from `start` (s_start) with `sequence` (s_sequence).

    Each committed transaction's logged blocks are kept, the newest copy of a block winning; a
    block revoked in a transaction at or after the one that logged it is dropped (the kernel's
    jbd2_journal_test_revoke); a transaction without its commit block is not applied. Checksums
    are not verified.
    """
    plan: dict[int, tuple[int, bool, int]] = {}
    revoked: dict[int, int] = {}
    last = area.maxlen - area.fast_commit_blocks
    if not (area.first <= start < last):
        return Replay({}, 0, sequence)

    def step(n: int) -> int:
        n += 1
        return area.first if n >= last else n

    pending: dict[int, tuple[int, bool]] = {}
    pending_revoked: list[int] = []
    n = start
    committed = 0
    for _ in range(last):  # a bound: the log cannot be longer than the journal
        block = read_block(n)
        found = header(block)
        if found is None or found[1] != sequence:
            break
        blocktype = found[0]
        if blocktype == DESCRIPTOR:
            for target, flags in descriptor_entries(area, block):
                n = step(n)
                pending[target] = (n, bool(flags & TAG_ESCAPE))
        elif blocktype == REVOKE:
            pending_revoked += revoked_blocks(area, block)
        elif blocktype == COMMIT:
            for target, (copy, escaped) in pending.items():
                plan[target] = (copy, escaped, sequence)
            for target in pending_revoked:
                revoked[target] = max(revoked.get(target, sequence), sequence)
            pending, pending_revoked = {}, []
            committed += 1
            sequence += 1
        else:
            break
        n = step(n)
    blocks = {
        target: (copy, escaped) for target, (copy, escaped, seq) in plan.items() if revoked.get(target, seq - 1) < seq
    }
    return Replay(blocks, committed, sequence)


def revoke_count(area: JournalArea, block: bytes | memoryview, pos: int = 0) -> int:
    """How many blocks a revoke block revokes."""
    if len(block) < pos + 16:
        return 0
    (used,) = JBD2_REVOKE_COUNT.unpack_from(block, pos + 12)
    entry = 8 if area.incompat & INCOMPAT_64BIT else 4
    return max(0, min(used, area.block_size) - 16) // entry


def describe_blocks(area: JournalArea, offset: int, data: bytes | memoryview) -> str | None:
    """A label for a request into the journal, from its own bytes: 'jbd2 commit, transaction 57'.

    `offset` is the request's offset on the disk and `data` its bytes (a write's payload or a
    read's reply). Blocks are taken at the file system's block boundaries; at most
    MAX_DECODED_BLOCKS of them are looked at.
    """
    bs = area.block_size
    skip = (-(offset - area.fs_offset)) % bs
    parts: list[str] = []
    details: list[str] = []
    sequences: list[int] = []
    plain = 0
    logged = 0  # tags announced by the last descriptor seen
    pos = skip
    count = 0
    while pos + 12 <= len(data) and count < MAX_DECODED_BLOCKS:
        found = header(data, pos)
        if found is None:
            plain += 1
        else:
            if plain:
                parts.append(_blocks(plain, logged))
                plain = 0
            blocktype, sequence = found
            if blocktype in (SUPERBLOCK_V1, SUPERBLOCK_V2):
                info = parse_superblock(bytes(data[pos : pos + 1024]))
                if info is not None:
                    state = "empty" if info["start"] == 0 else f"starts at block {info['start']}"
                    return (
                        f"{area.prefix}jbd2 superblock (v{info['version']}), log {state}, sequence {info['sequence']}"
                    )
            parts.append(BLOCK_TYPES[blocktype])
            if blocktype == DESCRIPTOR:
                logged = len(descriptor_tags(area, data, pos))
                details.append(f"{logged} blocks")
            elif blocktype == REVOKE:
                details.append(f"{revoke_count(area, data, pos)} blocks")
            else:
                details.append("")
            if blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
                sequences.append(sequence)
        pos += bs
        count += 1
    if not parts:
        if not plain:
            return None
        first = area.journal_block(offset + skip)
        where = f", journal block {first}" if first is not None else ""
        if first is not None and area.fast_commit_blocks and first >= area.maxlen - area.fast_commit_blocks:
            return f"{area.prefix}jbd2 fast-commit area{where}"
        more = f" (+{plain - 1} blocks)" if plain > 1 else ""
        if not bytes(data[skip:]).strip(b"\0"):  # mkfs zeroing the journal: nothing logged there yet
            return f"{area.prefix}jbd2 unused block{where}{more} (zeros)"
        return f"{area.prefix}jbd2 logged block{where}{more}"
    if plain:
        parts.append(_blocks(plain, logged))
    if not sequences:
        return f"{area.prefix}jbd2 " + ", ".join(parts)
    lo, hi = min(sequences), max(sequences)
    which = f"transaction {lo}" if lo == hi else f"transactions {lo}-{hi}"
    if len(parts) == 1:  # one of the journal's own blocks: 'jbd2 descriptor, transaction 57 (5 blocks)'
        detail = f" ({details[0]})" if details[0] else ""
        return f"{area.prefix}jbd2 {parts[0]}, {which}{detail}"
    return f"{area.prefix}jbd2 " + ", ".join(parts) + f", {which}"


def has_commit(area: JournalArea, offset: int, data: bytes | memoryview) -> bool:
    """Does a request's data hold a jbd2 commit block (at the file system's block boundaries)?"""
    bs = area.block_size
    pos = (-(offset - area.fs_offset)) % bs
    for _ in range(MAX_DECODED_BLOCKS):
        if pos + 12 > len(data):
            return False
        found = header(data, pos)
        if found is not None and found[0] == COMMIT:
            return True
        pos += bs
    return False


def _blocks(n: int, logged: int) -> str:
    return f"{n} logged block{'s' if n != 1 else ''}" if logged else f"{n} block{'s' if n != 1 else ''}"


@dataclass
class JournalBlock:
    """One block of a scanned journal that is not free: what it is and which transaction."""

    block: int  # journal block number
    what: str  # descriptor, commit, revoke, superblock, logged
    sequence: int | None = None
    target: int | None = None  # a logged copy: the file-system block it is a copy of
    detail: str = ""


def scan(area: JournalArea, read_blocks: Callable[[int, int], bytes], chunk: int = 1024) -> list[JournalBlock]:
    """Every descriptor, commit and revoke block in the journal and the logged copies each descriptor announces.

    `read_blocks(n, count)` returns journal blocks n .. n+count-1. The whole log is looked at, old
    transactions too (they stay on the disk until overwritten), so the map shows what the
    journal holds; only the first 4 bytes of a block that is not a header are looked at.
    """
    bs = area.block_size
    last = area.maxlen - area.fast_commit_blocks
    found: list[JournalBlock] = []
    buf = b""
    buf_first = 0
    n = area.first
    while n < last:
        if not buf_first <= n < buf_first + len(buf) // bs:
            buf_first = n
            buf = read_blocks(n, min(chunk, last - n))
        pos = (n - buf_first) * bs
        got = header(buf, pos)
        if got is None:
            n += 1
            continue
        blocktype, sequence = got
        if blocktype == DESCRIPTOR:
            targets = descriptor_tags(area, buf, pos)
            found.append(JournalBlock(n, "descriptor", sequence, detail=f"{len(targets)} blocks"))
            for k, target in enumerate(targets):
                copy = n + 1 + k
                if copy >= last:  # the log wraps around to its first block
                    copy = area.first + (copy - last)
                found.append(JournalBlock(copy, "logged", sequence, target=target))
            n += 1 + len(targets)
            continue
        if blocktype == REVOKE:
            found.append(JournalBlock(n, "revoke", sequence, detail=f"{revoke_count(area, buf, pos)} blocks"))
        elif blocktype == COMMIT:
            found.append(JournalBlock(n, "commit", sequence))
        n += 1
    return found
