"""MBR and GPT partition tables: where the partitions are, and where the tables themselves are.

MBR: four 16-byte entries at byte 446 of sector 0, signature 55 AA at 510; an extended
partition (type 05, 0F or 85) holds a chain of EBRs, each with one logical partition and a link
to the next. GPT (UEFI spec, chapter 5): a protective MBR (type EE), the header at LBA 1, the
entry array (usually at LBA 2, 128 entries of 128 bytes), and their backups at the end of the
disk: the entries just before the backup header in the last LBA.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass, field

from .layouts import GPT_ENTRY, GPT_HEADER, MBR_ENTRY
from .limits import Limits
from .model import P_TABLE, Partition, Region
from .source import Disk

GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}
MBR_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Ext'd (LBA)",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xEE: "GPT",
    0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}
EXTENDED = (0x05, 0x0F, 0x85)
GPT_SIGNATURE = b"EFI PART"
P_EXTENDED = -2  # below the logical partitions it holds (-1), above the unpartitioned rest of the disk (-3)


@dataclass
class Table:
    kind: str  # "GPT" or "MBR"
    sector_size: int
    partitions: list[Partition] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _mbr_entries(sector: bytes) -> list:
    return [MBR_ENTRY.parse(sector, 446 + 16 * k) for k in range(4)]


def has_mbr_signature(sector: bytes) -> bool:
    return len(sector) >= 512 and sector[510:512] == b"\x55\xaa"


def parse(disk: Disk, limits: Limits) -> Table | None:
    """The disk's partition table, or None if it has none (a file system on the whole disk, or nothing)."""
    head = disk.read(0, 512)
    for sector_size in (512, 4096):
        if disk.read(sector_size, 8) == GPT_SIGNATURE:
            return _gpt(disk, sector_size, limits)
    if not has_mbr_signature(head):
        return None
    entries = _mbr_entries(head)
    if any(e.status not in (0, 0x80) for e in entries):
        return None  # a boot sector's code, not a table
    used = [e for e in entries if e.type and e.sectors]
    if not used or any(e.lba_start * 512 >= disk.size for e in used):
        return None
    return _mbr(disk, head, limits)


def _mbr(disk: Disk, head: bytes, limits: Limits) -> Table:
    table = Table("MBR", 512)
    table.regions.append(Region(0, 512, "partition-table", "MBR (partition table)", P_TABLE))
    entries = _mbr_entries(head)
    for k, e in enumerate(entries):
        if not e.type or not e.sectors:
            continue
        name = MBR_TYPES.get(e.type, f"type 0x{e.type:02x}")
        start, size = e.lba_start * 512, e.sectors * 512
        if e.type in EXTENDED:
            table.regions.append(
                Region(
                    start, size, "free", f"extended partition {k + 1} (holds logical partitions)", 0, partition=k + 1
                )
            )
            _logical(disk, table, e.lba_start, limits)
        else:
            table.partitions.append(Partition(k + 1, start, size, name))
    return table


def _logical(disk: Disk, table: Table, ext_start: int, limits: Limits) -> None:
    """The EBR chain of an extended partition: logical partitions 5, 6, ..."""
    ebr = ext_start
    number = 5
    seen = set()
    while ebr not in seen and number < 5 + limits.max_partitions:
        seen.add(ebr)
        sector = disk.read(ebr * 512, 512)
        if not has_mbr_signature(sector):
            table.notes.append(f"the EBR at sector {ebr} has no signature")
            return
        table.regions.append(
            Region(ebr * 512, 512, "partition-table", f"EBR of logical partition {number}", P_TABLE, partition=number)
        )
        first, link = _mbr_entries(sector)[:2]
        if first.type and first.sectors:
            start = (ebr + first.lba_start) * 512
            name = MBR_TYPES.get(first.type, f"type 0x{first.type:02x}")
            table.partitions.append(Partition(number, start, first.sectors * 512, name))
            number += 1
        if not link.type or not link.sectors:
            return
        ebr = ext_start + link.lba_start


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def _gpt(disk: Disk, ss: int, limits: Limits) -> Table:
    table = Table("GPT", ss)
    table.regions.append(Region(0, ss, "partition-table", "protective MBR", P_TABLE))
    raw = disk.read(ss, ss)
    h = GPT_HEADER.parse(raw)
    check = bytearray(raw[: h.header_size])
    check[16:20] = b"\0\0\0\0"
    if h.header_size < 92 or zlib.crc32(check) != h.header_crc:
        table.notes.append("the primary GPT header's checksum does not match")
    table.regions.append(Region(ss, ss, "partition-table", "GPT header (primary)", P_TABLE))
    entry_size = h.entry_size if 128 <= h.entry_size <= 4096 and h.entry_size % 8 == 0 else 128
    if entry_size != h.entry_size:
        table.notes.append(f"the GPT header's entry size ({h.entry_size}) is not valid: 128 assumed")
    count = min(h.num_entries, 4096)
    array_bytes = entry_size * count
    table.regions.append(
        Region(h.entries_lba * ss, array_bytes, "partition-table", "GPT partition entries (primary)", P_TABLE)
    )
    backup_lba = h.backup_lba if 0 < h.backup_lba * ss < disk.size else disk.size // ss - 1
    table.regions.append(Region(backup_lba * ss, ss, "partition-table", "GPT header (backup)", P_TABLE))
    backup_raw = disk.read(backup_lba * ss, ss)
    if backup_raw[:8] == GPT_SIGNATURE:
        b = GPT_HEADER.parse(backup_raw)
        backup_entries = b.entries_lba
    else:
        table.notes.append(f"no backup GPT header at LBA {backup_lba}")
        backup_entries = backup_lba - -(-array_bytes // ss)
    table.regions.append(
        Region(backup_entries * ss, array_bytes, "partition-table", "GPT partition entries (backup)", P_TABLE)
    )
    array = disk.read(h.entries_lba * ss, array_bytes)
    if zlib.crc32(array) != h.entries_crc:
        table.notes.append("the GPT partition entries' checksum does not match")
    disk_guid = _guid(h.disk_guid)
    table.info = {
        "disk_guid": disk_guid,
        "first_usable_lba": h.first_usable,
        "last_usable_lba": h.last_usable,
        "entries": count,
        "entry_size": entry_size,
        "entries_lba": h.entries_lba,
        "backup_lba": backup_lba,
    }
    for k in range(count):
        e = GPT_ENTRY.parse(array, k * entry_size)
        if e.type_guid == bytes(16):
            continue
        if len(table.partitions) >= limits.max_partitions:
            table.notes.append(f"more than {limits.max_partitions} partitions: the rest are not mapped")
            break
        type_guid = _guid(e.type_guid)
        name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0]
        start = e.first_lba * ss
        size = (e.last_lba - e.first_lba + 1) * ss
        table.partitions.append(Partition(k + 1, start, max(0, size), GPT_TYPES.get(type_guid, type_guid), name))
    return table
