"""FAT12, FAT16 and FAT32 (vfat): boot sector, FATs, root directory, clusters and whose they are.

The layout follows Microsoft's FAT specification: reserved sectors (the boot sector first;
on FAT32 also FSInfo and a backup boot sector, usually at sector 6), then the FATs, then on
FAT12/16 a fixed root directory, then the data area in clusters numbered from 2. Which of the
three it is depends only on the number of clusters (< 4085 FAT12, < 65525 FAT16).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from .layouts import FAT_BPB, FAT_DIRENT
from .limits import Limits
from .model import P_CONTAINER, P_DATA, P_FILE_META, P_FREE, P_GROUP_META, P_SUPERBLOCK, Filesystem, Region
from .source import Disk

ATTR_DIRECTORY, ATTR_VOLUME_ID, ATTR_LFN = 0x10, 0x08, 0x0F


def probe(disk: Disk) -> bool:
    """Does this disk start with a FAT boot sector (a BIOS parameter block that adds up)?"""
    if disk.size < 1024:
        return False
    head = disk.read(0, 512)
    if head[510:512] != b"\x55\xaa" or head[0] not in (0xEB, 0xE9):
        return False
    b = FAT_BPB.parse(head)
    if b.bytes_per_sector not in (512, 1024, 2048, 4096):
        return False
    spc = b.sectors_per_cluster
    if spc == 0 or spc & (spc - 1) or b.reserved_sectors == 0 or not 1 <= b.num_fats <= 4:
        return False
    if b.media != 0xF0 and b.media < 0xF8:
        return False
    total = b.total_sectors_16 or b.total_sectors_32
    fat_size = b.fat_size_16 or b.fat_size_32
    return bool(total and fat_size) and b.reserved_sectors + b.num_fats * fat_size < total


class FatParser:
    def __init__(self, disk: Disk, limits: Limits) -> None:
        self.disk = disk
        self.limits = limits
        self.regions: list[Region] = []
        self.notes: list[str] = []
        b = self.bpb = FAT_BPB.parse(disk.read(0, 512))
        self.bps = b.bytes_per_sector
        self.spc = b.sectors_per_cluster
        self.cluster_bytes = self.bps * self.spc
        self.total = b.total_sectors_16 or b.total_sectors_32
        self.fat_sectors = b.fat_size_16 or b.fat_size_32
        self.root_sectors = -(-b.root_entries * 32 // self.bps)
        self.fat_start = b.reserved_sectors
        self.root_start = self.fat_start + b.num_fats * self.fat_sectors
        self.data_start = self.root_start + self.root_sectors
        self.clusters = max(0, (self.total - self.data_start) // self.spc)
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        self.fat: list[int] | memoryview | None = None
        self.paths: dict[int, str] = {}

    def cluster_offset(self, cluster: int) -> int:
        return (self.data_start + (cluster - 2) * self.spc) * self.bps

    def _add(self, offset: int, length: int, kind: str, label: str, priority: int, **extra: Any) -> None:
        self.regions.append(Region(offset, length, kind, label, priority, **extra))  # type: ignore[arg-type]

    def parse(self) -> Filesystem:
        b, bps = self.bpb, self.bps
        fs = Filesystem("vfat", 0, self.total * bps, self.cluster_bytes)
        self._add(0, bps, "boot", "vfat boot sector", P_SUPERBLOCK)
        if self.fat_start > 1:
            self._add(bps, (self.fat_start - 1) * bps, "boot", "vfat reserved sectors", P_CONTAINER)
        if self.bits == 32:
            if 0 < b.fsinfo_sector < self.fat_start:
                self._add(b.fsinfo_sector * bps, bps, "boot", "vfat FSInfo sector", P_SUPERBLOCK)
            if 0 < b.backup_boot_sector < self.fat_start:
                n = min(3, self.fat_start - b.backup_boot_sector)
                self._add(b.backup_boot_sector * bps, n * bps, "boot", "vfat backup boot sector", P_SUPERBLOCK)
        for k in range(b.num_fats):
            start = (self.fat_start + k * self.fat_sectors) * bps
            self._add(start, self.fat_sectors * bps, "fat", f"vfat FAT #{k + 1}", P_GROUP_META)
        if self.root_sectors:
            self._add(
                self.root_start * bps, self.root_sectors * bps, "directory", "vfat root directory (/)", P_GROUP_META
            )
        data_bytes = self.clusters * self.cluster_bytes
        self._add(self.data_start * bps, data_bytes, "unknown", "vfat cluster in use (owner not mapped)", P_CONTAINER)
        self._read_fat()
        if self.fat is not None:
            self._free_clusters()
            self._walk(fs)
        fs.info = {
            "fat_type": f"FAT{self.bits}",
            "bytes_per_sector": bps,
            "sectors_per_cluster": self.spc,
            "cluster_size": self.cluster_bytes,
            "reserved_sectors": self.fat_start,
            "fats": b.num_fats,
            "fat_sectors": self.fat_sectors,
            "root_entries": b.root_entries,
            "root_dir_sector": self.root_start if self.root_sectors else None,
            "root_cluster": b.root_cluster if self.bits == 32 else None,
            "data_sector": self.data_start,
            "clusters": self.clusters,
            "total_sectors": self.total,
            "fsinfo_sector": b.fsinfo_sector if self.bits == 32 else None,
            "backup_boot_sector": b.backup_boot_sector if self.bits == 32 else None,
            "free_clusters": self.free if self.fat is not None else None,
            "volume_label": self._volume_label(),
        }
        fs.notes = self.notes
        return fs

    def _volume_label(self) -> str:
        raw = self.disk.read(0, 512)
        at = 0x47 if self.bits == 32 else 0x2B
        return raw[at : at + 11].decode("latin-1").strip()

    def _read_fat(self) -> None:
        size = self.fat_sectors * self.bps
        if size > self.limits.max_fat_bytes:
            self.notes.append(f"the FAT is {size} bytes, more than the limit: clusters are not mapped to files")
            return
        n = self.clusters + 2
        width = {12: 0, 16: 2, 32: 4}[self.bits]
        raw = self.disk.read(self.fat_start * self.bps, min(size, n * width if width else (n * 3 + 1) // 2))
        self.fat_raw = raw
        if width:
            raw = raw[: n * width]
            raw += bytes(n * width - len(raw))
            self.fat = memoryview(raw).cast("I" if width == 4 else "H")
        else:
            out = []
            for c in range(n):
                pos = c * 3 // 2
                pair = raw[pos] | raw[pos + 1] << 8 if pos + 1 < len(raw) else 0
                out.append(pair >> 4 if c & 1 else pair & 0xFFF)
            self.fat = out

    @property
    def _mask(self) -> int:
        return {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[self.bits]

    def _free_clusters(self) -> None:
        """Runs of free (0) and bad clusters: found with a regex over the FAT's bytes, not entry by entry."""
        fat = self.fat
        assert fat is not None
        self.free = 0
        last = self.clusters + 2
        bad = self._mask - 8
        if self.bits == 12:
            entries = list(fat)
            runs = _runs_in_list(entries, 0, last)
            bad_runs = _runs_in_list(entries, bad, last)
        else:
            width = self.bits // 8
            raw = fat.tobytes()
            runs = _runs_of(raw, bytes(width), width, last)
            bad_runs = _runs_of(raw, (bad).to_bytes(width, "little"), width, last)
        for c, end in runs:
            self.free += end - c
            self._add(
                self.cluster_offset(c), (end - c) * self.cluster_bytes, "free", "vfat free clusters", P_FREE, block=c
            )
        for c, end in bad_runs:
            self._add(
                self.cluster_offset(c), (end - c) * self.cluster_bytes, "unknown", "vfat bad cluster", P_FREE, block=c
            )

    def chain(self, first: int) -> list[tuple[int, int]]:
        """(first cluster, count) runs of a cluster chain; a loop or a bad link ends it."""
        fat = self.fat
        assert fat is not None
        runs: list[tuple[int, int]] = []
        c = first
        seen = 0
        last = self.clusters + 2
        mask = self._mask
        while 2 <= c < last and seen < self.clusters:
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((c, 1))
            seen += 1
            c = fat[c] & mask
        return runs

    def _walk(self, fs: Filesystem) -> None:
        """Breadth first from the root: every directory's clusters and every file's, with paths."""
        limits = self.limits
        b = self.bpb
        if self.bits == 32:
            root_runs = self.chain(b.root_cluster)
            for c, n in root_runs:
                self._add(
                    self.cluster_offset(c), n * self.cluster_bytes, "directory", "vfat directory (/)", P_FILE_META,
                    block=c, path="/",
                )  # fmt: skip
            root = self._read_runs(root_runs)
        else:
            root = self.disk.read(self.root_start * self.bps, self.root_sectors * self.bps)
        queue: deque[tuple[str, bytes, int]] = deque([("/", root, 0)])
        dirs = entries = 0
        visited = {b.root_cluster} if self.bits == 32 else set()
        while queue:
            parent, raw, depth = queue.popleft()
            dirs += 1
            if dirs > limits.max_dirs:
                self.notes.append(f"paths: stopped after {limits.max_dirs} directories")
                return
            for name, attr, first, size in _entries(raw):
                entries += 1
                path = ("/" if parent == "/" else parent + "/") + name
                is_dir = bool(attr & ATTR_DIRECTORY)
                runs = self.chain(first) if first >= 2 else []
                if not is_dir and size:
                    keep = -(-size // self.cluster_bytes)  # a chain longer than the file: the rest is lost
                    trimmed: list[tuple[int, int]] = []
                    for c, n in runs:
                        if keep <= 0:
                            break
                        trimmed.append((c, min(n, keep)))
                        keep -= n
                    runs = trimmed
                kind = "directory" if is_dir else "data"
                label = f"vfat directory ({path})" if is_dir else f"file data ({path})"
                for c, n in runs:
                    self._add(
                        self.cluster_offset(c), n * self.cluster_bytes, kind, label, P_FILE_META if is_dir else P_DATA,
                        block=c, path=path,
                    )  # fmt: skip
                if len(fs.files) < limits.max_files_listed:
                    fs.files.append(
                        {
                            "path": path,
                            "type": "directory" if is_dir else "file",
                            "size": size,
                            "first_cluster": first,
                            "extents": [[c, n] for c, n in runs],
                        }
                    )
                if is_dir and first >= 2 and first not in visited and depth < limits.max_depth:
                    visited.add(first)
                    queue.append((path, self._read_runs(runs), depth + 1))
            if entries > limits.max_entries:
                self.notes.append(f"paths: stopped after {entries} directory entries")
                return

    def _read_runs(self, runs: list[tuple[int, int]]) -> bytes:
        return b"".join(self.disk.read(self.cluster_offset(c), n * self.cluster_bytes) for c, n in runs)


def _runs_of(raw: bytes, entry: bytes, width: int, last: int) -> list[tuple[int, int]]:
    """[first, end) runs of clusters (2 .. last-1) whose FAT entry is `entry`, in a FAT of `width`-byte entries."""
    runs: list[tuple[int, int]] = []
    if entry == bytes(width):
        # Runs of zero bytes at least an entry long, trimmed to entry boundaries: a regex over a
        # single repeated byte runs at C speed (a repeated group is 20 times slower).
        for m in re.finditer(b"\\x00{%d,}" % width, raw[: last * width]):
            start = max(2, -(-m.start() // width))
            end = m.end() // width
            if end > start:
                runs.append((start, end))
        return runs
    pos = raw.find(entry, 2 * width, last * width)
    while pos >= 0:
        if pos % width:
            pos = raw.find(entry, pos + 1, last * width)
            continue
        end = pos
        while end < last * width and raw[end : end + width] == entry:
            end += width
        runs.append((pos // width, end // width))
        pos = raw.find(entry, end, last * width)
    return runs


def _runs_in_list(entries: list[int], value: int, last: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    c = 2
    while c < last:
        if entries[c] == value:
            end = c
            while end < last and entries[end] == value:
                end += 1
            runs.append((c, end))
            c = end
        else:
            c += 1
    return runs


def _entries(raw: bytes) -> list[tuple[str, int, int, int]]:
    """(name, attributes, first cluster, size) of a directory's live entries, long names assembled."""
    out: list[tuple[str, int, int, int]] = []
    lfn: list[tuple[int, str]] = []
    for pos in range(0, len(raw) - 31, 32):
        first_byte = raw[pos]
        if first_byte == 0:
            break
        if first_byte == 0xE5:
            lfn = []
            continue
        attr = raw[pos + 11]
        if attr & 0x3F == ATTR_LFN:
            seq = first_byte & 0x1F
            piece = raw[pos + 1 : pos + 11] + raw[pos + 14 : pos + 26] + raw[pos + 28 : pos + 32]
            text = piece.decode("utf-16-le", "replace").split("\0", 1)[0].replace("\uffff", "")
            if first_byte & 0x40:
                lfn = []
            lfn.append((seq, text))
            continue
        if attr & ATTR_VOLUME_ID:
            lfn = []
            continue
        name83, attr, ntres, _, _, _, _, hi, _, _, lo, size = FAT_DIRENT.unpack_from(raw, pos)
        if lfn:
            name = "".join(text for _, text in sorted(lfn))
        else:
            base = name83[:8].decode("latin-1").rstrip()
            ext = name83[8:].decode("latin-1").rstrip()
            if base.startswith("\x05"):
                base = "\xe5" + base[1:]
            if ntres & 0x08:
                base = base.lower()
            if ntres & 0x10:
                ext = ext.lower()
            name = f"{base}.{ext}" if ext else base
        lfn = []
        if name in (".", ".."):
            continue
        out.append((name, attr, lo | hi << 16, size))
    return out
