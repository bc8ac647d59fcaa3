"""`build_map(read, size)`: recognise what a disk holds and map it.

A file system on the whole disk comes first (a FAT boot sector has the MBR's 55 AA too), then a
partition table, whose partitions are each recognised in turn. Anything a parser does not
understand becomes a note and an "unknown" region, never an exception: the bytes are the
user's and may be half-written (the map is rebuilt while mkfs runs).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

from . import ext, fat, partitions
from .jbd2 import JournalArea
from .layouts import JBD2_MAGIC
from .limits import Limits
from .model import P_JOURNAL_BLOCK, PROBE_BYTES, Filesystem, FsMap, Partition, Region
from .source import Disk, PatchedDisk

P_PARTITION = -1
P_DISK = -3


class _Found:
    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.filesystems: list[Filesystem] = []
        self.journals: list[JournalArea] = []
        self.notes: list[str] = []


def build_map(
    read: Callable[[int, int], bytes],
    size: int,
    *,
    scan_journal: bool = False,
    replay_journal: bool = True,
    limits: Limits | None = None,
) -> FsMap:
    """The map of a disk of `size` bytes whose bytes `read(offset, length)` returns.

    `scan_journal` also decodes every block of ext3/ext4 journals (descriptor, commit and revoke
    blocks, and which block each logged copy is of): `buselab layout` does, a live map need not
    (`FsMap.label(offset, length, data)` decodes a request's own journal blocks).

    `replay_journal` maps an ext3/ext4 whose journal holds committed transactions as recovery
    would leave it (in memory: nothing is written), so a mounted file system's map follows its
    last commit rather than its in-place metadata, which trails by up to the write-back delay.
    """
    limits = limits or Limits()
    disk = Disk(read, size)
    found = _Found()
    # Where a new partition table or file system would first show, watched by needs_refresh()
    # where nothing is recognised yet (what is recognised watches its own boot sector, superblock
    # and table regions).
    probes: list[tuple[int, int]] = []
    table_kind = None
    table_info: dict = {}
    parts: list[Partition] = []
    if not _filesystem(disk, found, limits, scan_journal, replay_journal, prefix="", partition=None):
        table = partitions.parse(disk, limits)
        if table is None:
            probes.append((0, PROBE_BYTES))
            found.regions.append(Region(0, size, "unknown", "no partition table or file system recognised", P_DISK))
        else:
            table_kind = table.kind
            table_info = dict(table.info, sector_size=table.sector_size)
            found.notes += table.notes
            found.regions += table.regions
            found.regions.append(Region(0, size, "free", "unpartitioned space", P_DISK))
            for part in table.partitions:
                parts.append(part)
                if part.offset >= size:
                    found.notes.append(f"partition {part.number} starts past the end of the disk")
                    continue
                window = disk.window(part.offset, part.size)
                before = len(found.filesystems)
                _filesystem(
                    window,
                    found,
                    limits,
                    scan_journal,
                    replay_journal,
                    prefix=f"partition {part.number}",
                    partition=part,
                )
                if len(found.filesystems) > before:
                    part.contents = found.filesystems[-1].type
                    what = f"partition {part.number} ({part.contents}): outside the file system"
                    kind = "unknown"
                else:
                    what = f"partition {part.number} ({part.type}): contents not recognised"
                    kind = "unknown"
                    probes.append((part.offset, PROBE_BYTES))
                found.regions.append(
                    Region(
                        part.offset, min(part.size, size - part.offset), kind, what, P_PARTITION, partition=part.number
                    )
                )
    fsmap = FsMap(
        size,
        found.regions,
        table=table_kind,
        partitions=parts,
        filesystems=found.filesystems,
        journals=found.journals,
        probes=probes,
        notes=found.notes,
        watch_commits=replay_journal,
    )
    fsmap.table_info = table_info
    fsmap.bytes_read = disk.bytes_read
    fsmap.reads = disk.reads
    return fsmap


def _filesystem(
    disk: Disk,
    found: _Found,
    limits: Limits,
    scan_journal: bool,
    replay_journal: bool,
    *,
    prefix: str,
    partition: Partition | None,
) -> bool:
    """Recognise and map the file system at the start of `disk`; False if there is none we know."""
    try:
        if ext.probe(disk):
            parser: ext.ExtParser | fat.FatParser = ext.ExtParser(disk, limits, scan_journal=scan_journal)
            replay = parser.replay() if replay_journal else None
            if replay is not None:
                plan, patches = replay
                if patches:
                    patched = PatchedDisk(disk, parser.bs, patches, JBD2_MAGIC.to_bytes(4, "big"))
                    parser = ext.ExtParser(patched, limits, scan_journal=scan_journal)
                parser.replayed = plan
        elif fat.probe(disk):
            parser = fat.FatParser(disk, limits)
        else:
            return False
        fs = parser.parse()
    except (struct.error, ValueError, IndexError, OverflowError, ZeroDivisionError, RecursionError) as exc:
        # A parser met bytes that do not add up (a file system being written, or damaged).
        found.notes.append(f"{prefix or 'disk'}: could not map the file system: {type(exc).__name__}: {exc}")
        return False
    regions = parser.regions
    if isinstance(parser, ext.ExtParser):
        regions += _logged_copies(parser)
    base = disk.base
    number = partition.number if partition else None
    head = f"{prefix} ({fs.type}): " if prefix else ""
    fs.offset = base
    fs.partition = number
    fs.size = min(fs.size, disk.size)
    for r in regions:
        if r.offset >= disk.size:
            continue
        length = min(r.length, disk.size - r.offset)
        found.regions.append(replace(r, offset=base + r.offset, length=length, label=head + r.label, partition=number))
    found.filesystems.append(fs)
    found.notes += [f"{prefix or fs.type}: {note}" for note in fs.notes]
    if isinstance(parser, ext.ExtParser) and parser.journal is not None:
        area = parser.journal
        area.fs_offset = base
        area.prefix = head
        area.extents = [(base + start, length, first) for start, length, first in area.extents]
        area.info = fs.info.get("journal", {})
        found.journals.append(area)
    return True


def _logged_copies(parser: ext.ExtParser) -> list[Region]:
    """Label each logged copy in a scanned journal with the block it is a copy of and what that block is."""
    blocks = getattr(parser, "journal_blocks", None)
    if not blocks:
        return []
    lookup = FsMap(parser.blocks * parser.bs, parser.regions)
    out = []
    for block, at in blocks:
        if block.what != "logged" or at is None or block.target is None:
            continue
        what = lookup.label(block.target * parser.bs, parser.bs).text
        out.append(
            Region(
                at * parser.bs,
                parser.bs,
                "journal",
                f"jbd2 logged copy of block {block.target} ({what}), transaction {block.sequence}",
                P_JOURNAL_BLOCK,
                block=at,
                transaction=block.sequence,
                inode=parser.journal_ino,
            )
        )
    return out
