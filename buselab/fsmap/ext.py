"""ext2, ext3 and ext4: where every structure of the file system lives, from its own bytes.

Reads the superblock, the group descriptors (their block bitmaps, inode bitmaps and inode
tables say where those are: flex_bg packs them into the first group of a flex group, and the
descriptors say so), the in-use part of each inode table (bg_itable_unused), each in-use
inode's extent tree or block map, the block bitmaps (free space) and the directory tree from
the root (paths, to a bound). Layout: the kernel's Documentation/filesystems/ext4/.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import jbd2
from .layouts import (
    DIRENT,
    EXT_GROUP_DESC,
    EXT_GROUP_DESC_HI,
    EXT_INODE,
    EXT_MAGIC,
    EXT_ORPHAN_FILE_AT,
    EXT_PRJ_QUOTA_AT,
    EXT_QUOTA_INODES,
    EXT_QUOTA_INODES_AT,
    EXT_SB_OFFSET,
    EXT_SUPERBLOCK,
    EXTENT_ENTRY,
    EXTENT_HEADER,
    EXTENT_INDEX,
    EXTENT_MAGIC,
)
from .limits import Limits
from .model import (
    P_CONTAINER,
    P_DATA,
    P_FILE_META,
    P_FREE,
    P_GROUP_META,
    P_JOURNAL,
    P_JOURNAL_BLOCK,
    P_SUPERBLOCK,
    Filesystem,
    Region,
)
from .source import Disk

COMPAT_HAS_JOURNAL, COMPAT_RESIZE_INODE, COMPAT_SPARSE_SUPER2 = 0x4, 0x10, 0x200
INCOMPAT_FILETYPE, INCOMPAT_RECOVER, INCOMPAT_JOURNAL_DEV, INCOMPAT_META_BG = 0x2, 0x4, 0x8, 0x10
INCOMPAT_EXTENTS, INCOMPAT_64BIT, INCOMPAT_MMP, INCOMPAT_FLEX_BG = 0x40, 0x80, 0x100, 0x200
INCOMPAT_INLINE_DATA = 0x8000
RO_COMPAT_SPARSE_SUPER, RO_COMPAT_HUGE_FILE, RO_COMPAT_GDT_CSUM = 0x1, 0x8, 0x10
RO_COMPAT_DIR_NLINK, RO_COMPAT_EXTRA_ISIZE, RO_COMPAT_BIGALLOC, RO_COMPAT_METADATA_CSUM = 0x20, 0x40, 0x200, 0x400
COMPAT_ORPHAN_FILE = 0x1000

FEATURE_NAMES = {
    ("compat", 0x1): "dir_prealloc",
    ("compat", 0x2): "imagic_inodes",
    ("compat", 0x4): "has_journal",
    ("compat", 0x8): "ext_attr",
    ("compat", 0x10): "resize_inode",
    ("compat", 0x20): "dir_index",
    ("compat", 0x200): "sparse_super2",
    ("compat", 0x400): "fast_commit",
    ("compat", 0x1000): "orphan_file",
    ("incompat", 0x1): "compression",
    ("incompat", 0x2): "filetype",
    ("incompat", 0x4): "needs_recovery",
    ("incompat", 0x8): "journal_dev",
    ("incompat", 0x10): "meta_bg",
    ("incompat", 0x40): "extent",
    ("incompat", 0x80): "64bit",
    ("incompat", 0x100): "mmp",
    ("incompat", 0x200): "flex_bg",
    ("incompat", 0x400): "ea_inode",
    ("incompat", 0x1000): "dirdata",
    ("incompat", 0x2000): "metadata_csum_seed",
    ("incompat", 0x4000): "large_dir",
    ("incompat", 0x8000): "inline_data",
    ("incompat", 0x10000): "encrypt",
    ("incompat", 0x20000): "casefold",
    ("ro_compat", 0x1): "sparse_super",
    ("ro_compat", 0x2): "large_file",
    ("ro_compat", 0x8): "huge_file",
    ("ro_compat", 0x10): "uninit_bg",
    ("ro_compat", 0x20): "dir_nlink",
    ("ro_compat", 0x40): "extra_isize",
    ("ro_compat", 0x100): "quota",
    ("ro_compat", 0x200): "bigalloc",
    ("ro_compat", 0x400): "metadata_csum",
    ("ro_compat", 0x1000): "read-only",
    ("ro_compat", 0x2000): "project",
    ("ro_compat", 0x8000): "verity",
    ("ro_compat", 0x10000): "orphan_present",
}

BG_INODE_UNINIT, BG_BLOCK_UNINIT, BG_INODE_ZEROED = 0x1, 0x2, 0x4
EXTENTS_FL, INLINE_DATA_FL = 0x80000, 0x10000000
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0xF000, 0x4000, 0x8000, 0xA000
ROOT_INO, RESIZE_INO, JOURNAL_INO = 2, 7, 8
SPECIAL_INODES = {1: "bad blocks inode", 5: "boot loader inode", 6: "undelete directory", 7: "resize inode"}


def probe(disk: Disk) -> bool:
    """Does this disk start with an ext2/3/4 superblock?"""
    if disk.size < EXT_SB_OFFSET + 1024:
        return False
    sb = EXT_SUPERBLOCK.parse(disk.read(EXT_SB_OFFSET, 1024))
    if sb.s_magic != EXT_MAGIC or sb.s_log_block_size > 6 or sb.s_feature_incompat & INCOMPAT_JOURNAL_DEV:
        return False
    bs = 1024 << sb.s_log_block_size
    ratio = 1
    if sb.s_feature_ro_compat & RO_COMPAT_BIGALLOC:
        if not sb.s_log_block_size <= sb.s_log_cluster_size <= sb.s_log_block_size + 16:
            return False
        ratio = 1 << (sb.s_log_cluster_size - sb.s_log_block_size)
    inode_size = sb.s_inode_size if sb.s_rev_level >= 1 else 128
    # The bounds mke2fs keeps (a bitmap is one block): anything else is not a file system we can map.
    return (
        256 <= sb.s_blocks_per_group <= 8 * bs * ratio
        and 1 <= sb.s_inodes_per_group <= 8 * bs
        and 128 <= inode_size <= bs
        and inode_size & (inode_size - 1) == 0
        and sb.s_blocks_count_lo > sb.s_first_data_block
    )


def fs_type(sb: Any) -> str:
    """ext4 if it uses anything ext3 cannot mount, ext3 if it has a journal, else ext2 (as blkid says)."""
    ext4_incompat = INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_MMP | INCOMPAT_INLINE_DATA
    ext4_ro = (
        RO_COMPAT_HUGE_FILE
        | RO_COMPAT_GDT_CSUM
        | RO_COMPAT_DIR_NLINK
        | RO_COMPAT_EXTRA_ISIZE
        | RO_COMPAT_BIGALLOC
        | RO_COMPAT_METADATA_CSUM
    )
    if sb.s_feature_incompat & ext4_incompat or sb.s_feature_ro_compat & ext4_ro:
        return "ext4"
    return "ext3" if sb.s_feature_compat & COMPAT_HAS_JOURNAL else "ext2"


def _is_power(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


@dataclass
class _Inode:
    ino: int
    mode: int
    size: int
    flags: int
    extents: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (logical, physical, count, unwritten)
    tree: list[int] = field(default_factory=list)  # extent-tree index/leaf blocks or indirect blocks
    xattr: int = 0

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR


class ExtParser:
    """Parses one ext file system on `disk` (offset 0 = the file system's start) into regions."""

    def __init__(self, disk: Disk, limits: Limits, *, scan_journal: bool = False) -> None:
        self.disk = disk
        self.limits = limits
        self.scan_journal = scan_journal
        self.regions: list[Region] = []
        self.notes: list[str] = []
        self.journal: jbd2.JournalArea | None = None
        self.replayed: jbd2.Replay | None = None  # set by build_map when it parses a replayed view
        raw = disk.read(EXT_SB_OFFSET, 1024)
        self.raw_sb = raw
        sb = self.sb = EXT_SUPERBLOCK.parse(raw)
        self.name = fs_type(sb)
        self.bs = 1024 << sb.s_log_block_size
        self.wide = bool(sb.s_feature_incompat & INCOMPAT_64BIT)
        self.blocks = sb.s_blocks_count_lo | ((sb.s_blocks_count_hi << 32) if self.wide else 0)
        self.first_data_block = sb.s_first_data_block
        self.bpg = sb.s_blocks_per_group
        self.ipg = sb.s_inodes_per_group
        self.inode_size = sb.s_inode_size if sb.s_rev_level >= 1 else 128
        self.first_ino = sb.s_first_ino if sb.s_rev_level >= 1 else 11
        self.desc_size = sb.s_desc_size if self.wide and sb.s_desc_size >= 64 else 32
        self.all_groups = max(0, -(-(self.blocks - self.first_data_block) // self.bpg))
        self.descs_per_block = self.bs // self.desc_size
        self.gdt_blocks = -(-self.all_groups // self.descs_per_block)
        # Groups that start on the disk, to a limit: a superblock that claims exabytes on a
        # small disk (damaged, or hostile) costs no more than the disk it is on.
        on_disk = max(1, -(-(min(self.blocks, disk.size // self.bs) - self.first_data_block) // self.bpg))
        self.groups = min(self.all_groups, on_disk, limits.max_groups)
        self._tree_budget = limits.max_tree_blocks
        self.csum = bool(sb.s_feature_ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
        self.meta_bg = bool(sb.s_feature_incompat & INCOMPAT_META_BG)
        self.itable_blocks = -(-self.ipg * self.inode_size // self.bs)
        bigalloc = sb.s_feature_ro_compat & RO_COMPAT_BIGALLOC
        self.cluster_ratio = 1 << (sb.s_log_cluster_size - sb.s_log_block_size) if bigalloc else 1
        self.descs: list[Any] = []
        self.inodes: dict[int, _Inode] = {}
        self.paths: dict[int, str] = {ROOT_INO: "/"}
        self.special: dict[int, str] = dict(SPECIAL_INODES)
        usr, grp = EXT_QUOTA_INODES.unpack_from(raw, EXT_QUOTA_INODES_AT)
        prj = int.from_bytes(raw[EXT_PRJ_QUOTA_AT : EXT_PRJ_QUOTA_AT + 4], "little")
        orphan = int.from_bytes(raw[EXT_ORPHAN_FILE_AT : EXT_ORPHAN_FILE_AT + 4], "little")
        for ino, what in ((usr, "user quota file"), (grp, "group quota file"), (prj, "project quota file")):
            if ino:
                self.special[ino] = what
        if orphan and sb.s_feature_compat & COMPAT_ORPHAN_FILE:
            self.special[orphan] = "orphan file"
        self.journal_ino = sb.s_journal_inum if sb.s_feature_compat & COMPAT_HAS_JOURNAL else 0
        if self.journal_ino:
            self.special[self.journal_ino] = "journal"

    # --- helpers ---------------------------------------------------------------------------

    def features(self) -> list[str]:
        sb = self.sb
        words = {"compat": sb.s_feature_compat, "incompat": sb.s_feature_incompat, "ro_compat": sb.s_feature_ro_compat}
        return [name for (word, bit), name in FEATURE_NAMES.items() if words[word] & bit]

    def has_super(self, group: int) -> bool:
        """Does this group hold a superblock backup (and descriptor copies)?"""
        sb = self.sb
        if group == 0:
            return True
        if sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
            return group in (sb.s_backup_bgs_0, sb.s_backup_bgs_1)
        if group <= 1 or not sb.s_feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if group % 2 == 0:
            return False
        return _is_power(group, 3) or _is_power(group, 5) or _is_power(group, 7)

    def group_start(self, group: int) -> int:
        return self.first_data_block + group * self.bpg

    def group_of(self, block: int) -> int:
        return max(0, (block - self.first_data_block) // self.bpg)

    def _add(self, block: int, count: int, kind: str, label: str, priority: int, **extra: Any) -> None:
        if count <= 0 or block >= self.blocks:
            return
        count = min(count, self.blocks - block)
        self.regions.append(
            Region(block * self.bs, count * self.bs, kind, label, priority, block=block, **extra)  # type: ignore[arg-type]
        )

    def _valid(self, block: int, count: int = 1) -> bool:
        return 0 < block and block + count <= self.blocks

    def read_blocks(self, block: int, count: int = 1) -> bytes:
        return self.disk.read(block * self.bs, count * self.bs)

    # --- journal recovery, in memory ------------------------------------------------------------

    def replay(self) -> tuple[jbd2.Replay, dict[int, tuple[int, bool]]] | None:
        """If the journal holds committed transactions not yet written in place: what recovery would write.

        Returns the plan and its patches (block -> offset of the copy on this disk, escaped);
        None for a clean journal. On a mounted ext3/ext4 the in-place metadata trails the
        journal by up to the write-back delay (30 s): replaying shows the state of the last commit.
        """
        if not self.journal_ino or self.ipg == 0:
            return None
        self._read_descriptors()
        group, index = divmod(self.journal_ino - 1, self.ipg)
        if group >= len(self.descs) or not self._valid(self.descs[group]["inode_table"]):
            return None
        at = self.descs[group]["inode_table"] * self.bs + index * self.inode_size
        raw = EXT_INODE.parse(self.disk.read(at, EXT_INODE.size))
        node = _Inode(self.journal_ino, raw.i_mode, raw.i_size_lo | raw.i_size_high << 32, raw.i_flags)
        self._map_blocks(node, raw)
        self.descs = []
        first = self._journal_disk_block(node, 0)
        if first is None:
            return None
        info = jbd2.parse_superblock(self.read_blocks(first))
        if info is None or info["start"] == 0:
            return None
        area = jbd2.JournalArea(
            0, self.bs, [], incompat=info["incompat"], first=info["first"], maxlen=info["blocks"],
            fast_commit_blocks=info["fast_commit_blocks"],
        )  # fmt: skip

        def read_block(n: int) -> bytes:
            where = self._journal_disk_block(node, n)
            return self.read_blocks(where) if where is not None else bytes(self.bs)

        plan = jbd2.replay_plan(area, read_block, info["start"], info["sequence"])
        patches = {}
        for target, (copy, escaped) in plan.blocks.items():
            where = self._journal_disk_block(node, copy)
            if where is not None and target < self.blocks:
                patches[target] = (where * self.bs, escaped)
        return plan, patches

    # --- the parse ---------------------------------------------------------------------------

    def parse(self) -> Filesystem:
        name = self.name
        fs = Filesystem(name, 0, self.blocks * self.bs, self.bs)
        if self.blocks * self.bs > self.disk.size:
            self.notes.append(
                f"the file system says it is {self.blocks * self.bs} bytes, the disk holds {self.disk.size}"
            )
        if self.groups < self.all_groups:
            self.notes.append(f"only groups 0-{self.groups - 1} of {self.all_groups} are mapped")
        self._read_descriptors()
        self._static_layout(fs)
        self._free_space()
        self._scan_inodes()
        self._walk_directories()
        self._inode_regions(fs)
        self._journal(fs)
        fs.info = self._info()
        fs.notes = self.notes
        return fs

    def _descriptor_block(self, index: int) -> int:
        """Where the primary copy of descriptor block `index` is (meta_bg moves the later ones)."""
        if not self.meta_bg or index < self.sb.s_first_meta_bg:
            return self.first_data_block + 1 + index
        group = index * self.descs_per_block
        return self.group_start(group) + (1 if self.has_super(group) else 0)

    def _read_descriptors(self) -> None:
        raw = bytearray()
        blocks = -(-self.groups // self.descs_per_block)
        if not self.meta_bg:
            raw += self.read_blocks(self.first_data_block + 1, blocks)
        else:
            for index in range(blocks):
                raw += self.read_blocks(self._descriptor_block(index))
        for g in range(self.groups):
            pos = g * self.desc_size
            d = EXT_GROUP_DESC.parse(raw, pos)
            bb, ib, it = d.bg_block_bitmap_lo, d.bg_inode_bitmap_lo, d.bg_inode_table_lo
            fb, fi, ud, unused = (
                d.bg_free_blocks_count_lo,
                d.bg_free_inodes_count_lo,
                d.bg_used_dirs_count_lo,
                d.bg_itable_unused_lo,
            )
            if self.desc_size >= 64:
                h = EXT_GROUP_DESC_HI.parse(raw, pos + 32)
                bb |= h.bg_block_bitmap_hi << 32
                ib |= h.bg_inode_bitmap_hi << 32
                it |= h.bg_inode_table_hi << 32
                fb |= h.bg_free_blocks_count_hi << 16
                fi |= h.bg_free_inodes_count_hi << 16
                ud |= h.bg_used_dirs_count_hi << 16
                unused |= h.bg_itable_unused_hi << 16
            self.descs.append(
                {
                    "block_bitmap": bb,
                    "inode_bitmap": ib,
                    "inode_table": it,
                    "free_blocks": fb,
                    "free_inodes": fi,
                    "used_dirs": ud,
                    "itable_unused": unused if self.csum else 0,
                    "flags": d.bg_flags if self.csum else 0,
                }
            )

    def _static_layout(self, fs: Filesystem) -> None:
        """Superblocks, descriptors, reserved GDT blocks, bitmaps and inode tables, group by group."""
        name, bs = self.name, self.bs
        self.regions.append(Region(0, 1024, "boot", f"{name} boot area (before the superblock)", P_SUPERBLOCK))
        # The primary superblock: bytes 1024-2047, and the rest of its block where blocks are bigger.
        self.regions.append(
            Region(
                EXT_SB_OFFSET, max(1024, bs - 1024), "superblock", f"{name} superblock (primary)", P_SUPERBLOCK, group=0
            )
        )
        reserved = self.sb.s_reserved_gdt_blocks if self.sb.s_feature_compat & COMPAT_RESIZE_INODE else 0
        old_gdt = min(self.gdt_blocks, self.sb.s_first_meta_bg) if self.meta_bg else self.gdt_blocks
        if old_gdt + reserved >= self.bpg:
            self.notes.append(f"{old_gdt} descriptor and {reserved} reserved GDT blocks do not fit in a group")
            old_gdt, reserved = min(old_gdt, self.bpg - 1), 0
        for g in range(self.groups):
            start = self.group_start(g)
            end = min(start + self.bpg, self.blocks)
            info: dict[str, Any] = {"group": g, "first_block": start, "last_block": end - 1}
            self._add(
                start, end - start, "unknown", f"{name} group {g}, in use (owner not mapped)", P_CONTAINER, group=g
            )
            where = "primary" if g == 0 else f"backup in group {g}"
            if self.has_super(g):
                info["superblock"] = start
                if g:
                    self._add(start, 1, "superblock", f"{name} superblock backup, group {g}", P_SUPERBLOCK, group=g)
                if old_gdt:
                    info["group_descriptors"] = [start + 1, start + old_gdt]
                    for k in range(old_gdt):
                        first = k * self.descs_per_block
                        last = min(self.all_groups, first + self.descs_per_block) - 1
                        self._add(
                            start + 1 + k,
                            1,
                            "group-desc",
                            f"{name} group descriptors {_groups(first, last)} ({where})",
                            P_GROUP_META,
                            group=g,
                        )
                if reserved:
                    info["reserved_gdt"] = [start + 1 + old_gdt, start + old_gdt + reserved]
                    self._add(
                        start + 1 + old_gdt,
                        reserved,
                        "group-desc",
                        f"{name} reserved GDT blocks ({where})",
                        P_GROUP_META,
                        group=g,
                    )
            if self.meta_bg:
                meta = g // self.descs_per_block
                first_in_meta = meta * self.descs_per_block
                if meta >= self.sb.s_first_meta_bg and g - first_in_meta in (0, 1, self.descs_per_block - 1):
                    at = start + (1 if self.has_super(g) else 0)
                    last = min(self.all_groups, first_in_meta + self.descs_per_block) - 1
                    copy = "primary" if g == first_in_meta else f"backup in group {g}"
                    info["group_descriptors"] = [at, at]
                    self._add(
                        at,
                        1,
                        "group-desc",
                        f"{name} group descriptors {_groups(first_in_meta, last)} (meta_bg, {copy})",
                        P_GROUP_META,
                        group=g,
                    )
            d = self.descs[g]
            for key, label in (("block_bitmap", "block bitmap"), ("inode_bitmap", "inode bitmap")):
                if self._valid(d[key]):
                    self._add(d[key], 1, "bitmap", f"{name} group {g} {label}", P_GROUP_META, group=g)
                else:
                    self.notes.append(f"group {g}: its {label} is at block {d[key]}, outside the file system")
            if self._valid(d["inode_table"], self.itable_blocks):
                self._add(
                    d["inode_table"],
                    self.itable_blocks,
                    "inode-table",
                    f"{name} group {g} inode table",
                    P_GROUP_META,
                    group=g,
                )
            else:
                self.notes.append(f"group {g}: its inode table is at block {d['inode_table']}, outside the file system")
            info["block_bitmap"] = d["block_bitmap"]
            info["inode_bitmap"] = d["inode_bitmap"]
            info["inode_table"] = [d["inode_table"], d["inode_table"] + self.itable_blocks - 1]
            info["flags"] = [
                flag
                for bit, flag in ((BG_INODE_UNINIT, "INODE_UNINIT"), (BG_BLOCK_UNINIT, "BLOCK_UNINIT"))
                if d["flags"] & bit
            ] + (["ITABLE_ZEROED"] if d["flags"] & BG_INODE_ZEROED else [])
            info["free_blocks"] = d["free_blocks"]
            info["free_inodes"] = d["free_inodes"]
            info["directories"] = d["used_dirs"]
            info["itable_unused"] = d["itable_unused"]
            fs.groups.append(info)
        if self.sb.s_feature_incompat & INCOMPAT_MMP and self._valid(self.sb.s_mmp_block):
            self._add(self.sb.s_mmp_block, 1, "superblock", f"{name} MMP block", P_SUPERBLOCK)

    def _free_space(self) -> None:
        """Free blocks, from the block bitmaps; a BLOCK_UNINIT group is free but for its own metadata."""
        want: list[int] = []
        for g, d in enumerate(self.descs):
            if d["flags"] & BG_BLOCK_UNINIT:
                start = self.group_start(g)
                self._add(
                    start, min(self.bpg, self.blocks - start), "free", f"{self.name} group {g} free blocks", P_FREE
                )
            elif self._valid(d["block_bitmap"]):
                want.append(g)
        bitmaps = self._read_many([self.descs[g]["block_bitmap"] for g in want])
        clusters = self.sb.s_clusters_per_group or self.bpg
        for g in want:
            bitmap = bitmaps[self.descs[g]["block_bitmap"]]
            start = self.group_start(g)
            in_group = min(self.bpg, self.blocks - start)
            for first, end in _zero_runs(bitmap, min(clusters, len(bitmap) * 8)):
                b0 = start + first * self.cluster_ratio
                b1 = min(start + in_group, start + end * self.cluster_ratio)
                if b1 > b0:
                    self._add(b0, b1 - b0, "free", f"{self.name} group {g} free blocks", P_FREE, group=g)

    def _read_many(self, blocks: list[int]) -> dict[int, bytes]:
        """Single blocks, read in runs where they are next to each other (flex_bg puts them so)."""
        out: dict[int, bytes] = {}
        ordered = sorted(set(blocks))
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1 and j - i < 1023:
                j += 1
            raw = self.read_blocks(ordered[i], j - i + 1)
            for k in range(i, j + 1):
                pos = (k - i) * self.bs
                out[ordered[k]] = raw[pos : pos + self.bs]
            i = j + 1
        return out

    # --- inodes ----------------------------------------------------------------------------

    def _scan_inodes(self) -> None:
        """Every in-use inode: its extents (or block map), its tree blocks and its xattr block."""
        budget = self.limits.max_inodes
        isz = self.inode_size
        for g, d in enumerate(self.descs):
            if self.csum and d["flags"] & BG_INODE_UNINIT:
                continue
            used = self.ipg - min(d["itable_unused"], self.ipg)
            if used <= 0 or not self._valid(d["inode_table"], self.itable_blocks):
                continue
            if budget <= 0:
                self.notes.append(
                    f"stopped reading inodes at group {g}: the limit of {self.limits.max_inodes} inodes was reached"
                )
                break
            used = min(used, budget)
            budget -= used
            table = self.disk.read(d["inode_table"] * self.bs, used * isz)
            base = g * self.ipg + 1
            for k in range(used):
                pos = k * isz
                if table[pos : pos + 2] == b"\0\0" and base + k >= self.first_ino:
                    continue  # mode 0: never used
                ino = base + k
                raw = EXT_INODE.parse(table, pos)
                special = ino < self.first_ino
                if not special and (raw.i_links_count == 0 or raw.i_dtime):
                    continue  # deleted
                if special and (ino not in self.special and ino != ROOT_INO or raw.i_mode == 0 and not raw.i_blocks_lo):
                    continue  # a reserved inode that is not used (the undelete directory, an empty bad-blocks list)
                node = _Inode(ino, raw.i_mode, raw.i_size_lo | raw.i_size_high << 32, raw.i_flags)
                node.xattr = raw.i_file_acl_lo | raw.i_file_acl_high << 32
                self._map_blocks(node, raw)
                self.inodes[ino] = node

    def _map_blocks(self, node: _Inode, raw: Any) -> None:
        kind = node.mode & S_IFMT
        if node.flags & INLINE_DATA_FL:
            return
        if kind not in (S_IFREG, S_IFDIR, S_IFLNK) and node.ino not in self.special:
            return  # devices, fifos and sockets keep other things in i_block
        if node.flags & EXTENTS_FL:
            self._extent_node(node, raw.i_block, depth_left=5)
        elif kind == S_IFLNK and node.size < 60 and not raw.i_blocks_lo:
            return  # a fast symlink: the target is in i_block itself
        elif node.ino == RESIZE_INO:
            dind = int.from_bytes(raw.i_block[52:56], "little")
            if self._valid(dind):
                node.tree.append(dind)  # its other blocks are the reserved GDT blocks, mapped as such
        else:
            self._block_map(node, raw.i_block)

    def _extent_node(self, node: _Inode, buf: bytes, depth_left: int) -> None:
        if len(buf) < 12:
            return
        h = EXTENT_HEADER.parse(buf)
        if h.eh_magic != EXTENT_MAGIC or depth_left <= 0:
            return
        count = min(h.eh_entries, (len(buf) - 12) // 12)
        for k in range(count):
            pos = 12 + 12 * k
            if h.eh_depth == 0:
                logical, length, hi, lo = EXTENT_ENTRY.unpack_from(buf, pos)
                unwritten = length > 32768
                length = length - 32768 if unwritten else length
                physical = lo | hi << 32
                if self._valid(physical, length):
                    node.extents.append((logical, physical, length, unwritten))
            else:
                _, lo, hi = EXTENT_INDEX.unpack_from(buf, pos)
                child = lo | hi << 32
                if self._valid(child) and self._tree_budget > 0:
                    self._tree_budget -= 1
                    node.tree.append(child)
                    self._extent_node(node, self.read_blocks(child), depth_left - 1)

    def _block_map(self, node: _Inode, i_block: bytes) -> None:
        """ext2/ext3's direct, indirect, double and triple indirect block pointers."""
        per = self.bs // 4
        want = -(-node.size // self.bs) if node.size else 0
        want = min(want, self.blocks)
        pointers = [int.from_bytes(i_block[4 * k : 4 * k + 4], "little") for k in range(15)]
        logical = 0
        for p in pointers[:12]:
            if logical >= want:
                return
            if self._valid(p):
                self._extend(node, logical, p)
            logical += 1
        for level, p in ((1, pointers[12]), (2, pointers[13]), (3, pointers[14])):
            span = per**level
            if logical >= want:
                return
            if self._valid(p):
                self._indirect(node, p, level, logical, want)
            logical += span

    def _indirect(self, node: _Inode, block: int, level: int, logical: int, want: int) -> None:
        if self._tree_budget <= 0:
            return
        self._tree_budget -= 1
        node.tree.append(block)
        raw = self.read_blocks(block)
        per = self.bs // 4
        span = per ** (level - 1)
        for k in range(per):
            if logical >= want:
                return
            p = int.from_bytes(raw[4 * k : 4 * k + 4], "little")
            if self._valid(p):
                if level == 1:
                    self._extend(node, logical, p)
                else:
                    self._indirect(node, p, level - 1, logical, want)
            logical += span

    @staticmethod
    def _extend(node: _Inode, logical: int, physical: int) -> None:
        if node.extents:
            lo, ph, n, uw = node.extents[-1]
            if lo + n == logical and ph + n == physical:
                node.extents[-1] = (lo, ph, n + 1, uw)
                return
        node.extents.append((logical, physical, 1, False))

    # --- directories -----------------------------------------------------------------------

    def _walk_directories(self) -> None:
        """Paths: breadth first from the root, to the limits on directories and entries."""
        filetype = bool(self.sb.s_feature_incompat & INCOMPAT_FILETYPE)
        queue = deque([ROOT_INO])
        seen = {ROOT_INO}
        dirs = entries = dir_bytes = 0
        limits = self.limits
        while queue:
            ino = queue.popleft()
            node = self.inodes.get(ino)
            if node is None or not node.is_dir:
                continue
            dirs += 1
            if dirs > limits.max_dirs or entries > limits.max_entries:
                self.notes.append(
                    f"paths: stopped after {dirs - 1} directories and {entries} entries (limits); files past them"
                    " are shown by inode number only"
                )
                return
            parent = self.paths[ino]
            depth = parent.count("/")
            for _, physical, count, unwritten in node.extents:
                if unwritten or entries > limits.max_entries:
                    continue
                if dir_bytes > limits.max_dir_bytes:
                    self.notes.append(f"paths: stopped after reading {dir_bytes} bytes of directories (limit)")
                    return
                raw = self.read_blocks(physical, min(count, 1024))
                dir_bytes += len(raw)
                for name, child in _dirents(raw, self.bs, filetype):
                    entries += 1
                    if child in self.paths or child > self.ipg * self.all_groups:
                        continue
                    self.paths[child] = (parent.rstrip("/") + "/" + name) if parent != "/" else "/" + name
                    if child not in seen and depth < limits.max_depth:
                        seen.add(child)
                        queue.append(child)

    # --- regions of inodes ---------------------------------------------------------------------

    def describe_inode(self, ino: int) -> str:
        path = self.paths.get(ino)
        return f"inode {ino}, {path}" if path else f"inode {ino}"

    def _inode_regions(self, fs: Filesystem) -> None:
        name = self.name
        for ino, node in self.inodes.items():
            if ino == self.journal_ino:
                continue  # the journal: _journal()
            path = self.paths.get(ino)
            who = self.describe_inode(ino)
            if ino in self.special:
                kind, label, prio = "data", f"{name} {self.special[ino]} ({who})", P_DATA
            elif node.is_dir:
                kind, label, prio = "directory", f"{name} directory ({who})", P_FILE_META
            else:
                kind, label, prio = "data", f"file data ({who})", P_DATA
            for _, physical, count, unwritten in node.extents:
                text = label if not unwritten or kind != "data" else f"{label}, unwritten (preallocated)"
                self._add(physical, count, kind, text, prio, inode=ino, path=path)
            tree = "extent tree" if node.flags & EXTENTS_FL else "indirect block"
            if ino == RESIZE_INO:
                tree = "resize inode block map"
            for block in node.tree:
                self._add(block, 1, "extent-tree", f"{name} {tree} ({who})", P_FILE_META, inode=ino, path=path)
            if node.xattr and self._valid(node.xattr):
                self._add(node.xattr, 1, "data", f"{name} xattr block ({who})", P_FILE_META, inode=ino, path=path)
            if len(fs.files) < self.limits.max_files_listed:
                fs.files.append(
                    {
                        "inode": ino,
                        "path": path,
                        "type": _type_name(node.mode, ino, self.special),
                        "size": node.size,
                        "extents": [[lo, ph, n] for lo, ph, n, _ in node.extents],
                        "tree_blocks": list(node.tree),
                    }
                )
        if len(self.inodes) > self.limits.max_files_listed:
            self.notes.append(
                f"files: {len(self.inodes)} inodes mapped, the first {self.limits.max_files_listed} listed"
            )

    # --- the journal -------------------------------------------------------------------------------

    def _journal(self, fs: Filesystem) -> None:
        if not self.journal_ino:
            if self.sb.s_feature_compat & COMPAT_HAS_JOURNAL:
                self.notes.append("the journal is on another device (external journal)")
            return
        node = self.inodes.get(self.journal_ino)
        if node is None or not node.extents:
            self.notes.append(f"journal inode {self.journal_ino} has no blocks")
            return
        name = self.name
        extents = []
        for logical, physical, count, _ in node.extents:
            self._add(
                physical, count, "journal", f"{name} journal (inode {self.journal_ino})", P_JOURNAL, inode=node.ino
            )
            extents.append((physical * self.bs, count * self.bs, logical))
        for block in node.tree:
            self._add(block, 1, "extent-tree", f"{name} extent tree (journal, inode {node.ino})", P_FILE_META)
        area = jbd2.JournalArea(0, self.bs, sorted(extents))
        first_disk = self._journal_disk_block(node, 0)
        info = jbd2.parse_superblock(self.read_blocks(first_disk)) if first_disk is not None else None
        journal_info: dict[str, Any] = {
            "inode": node.ino,
            "extents": [[lo, ph, n] for lo, ph, n, _ in node.extents],
            "size": sum(n for _, _, n, _ in node.extents) * self.bs,
        }
        if info is None:
            self.notes.append("the journal's first block is not a jbd2 superblock")
            fs.info["journal"] = journal_info
            self.journal_info = journal_info
            return
        journal_info.update(info)
        if self.replayed is not None:
            journal_info["replayed_transactions"] = self.replayed.transactions
            journal_info["replayed_blocks"] = len(self.replayed.blocks)
        area.incompat = info["incompat"]
        area.first = info["first"]
        area.maxlen = info["blocks"]
        area.fast_commit_blocks = info["fast_commit_blocks"]
        state = "empty" if info["start"] == 0 else f"starts at block {info['start']}"
        assert first_disk is not None
        self._add(
            first_disk,
            1,
            "journal",
            f"jbd2 superblock (v{info['version']}), log {state}, sequence {info['sequence']}",
            P_JOURNAL_BLOCK,
            inode=node.ino,
        )
        if area.fast_commit_blocks:
            for n in range(area.maxlen - area.fast_commit_blocks, area.maxlen):
                at = self._journal_disk_block(node, n)
                if at is not None:
                    self._add(at, 1, "journal", "jbd2 fast-commit area", P_JOURNAL_BLOCK, inode=node.ino)
        self.journal = area
        self.journal_info = journal_info
        if self.scan_journal:
            self._scan_journal(node, area, journal_info)

    def _journal_disk_block(self, node: _Inode, n: int) -> int | None:
        for logical, physical, count, _ in node.extents:
            if logical <= n < logical + count:
                return physical + n - logical
        return None

    def _scan_journal(self, node: _Inode, area: jbd2.JournalArea, journal_info: dict[str, Any]) -> None:
        if journal_info["size"] > self.limits.max_journal_scan:
            self.notes.append(
                f"the journal ({journal_info['size']} bytes) is bigger than the scan limit; its blocks are not decoded"
            )
            return

        def read_blocks(n: int, count: int) -> bytes:
            parts = []
            k = n
            while k < n + count:
                at = self._journal_disk_block(node, k)
                run = 1
                if at is None:
                    parts.append(bytes(self.bs))
                else:
                    while k + run < n + count and self._journal_disk_block(node, k + run) == at + run:
                        run += 1
                    parts.append(self.read_blocks(at, run))
                k += run
            return b"".join(parts)

        found = jbd2.scan(area, read_blocks)
        self.journal_blocks = [(b, self._journal_disk_block(node, b.block)) for b in found]
        transactions = sorted({b.sequence for b in found if b.what == "commit" and b.sequence is not None})
        journal_info["transactions"] = len(transactions)
        if transactions:
            journal_info["transaction_range"] = [transactions[0], transactions[-1]]
        for block, at in self.journal_blocks:
            if at is None:
                continue
            if block.what == "logged":
                continue  # labelled once the rest of the map can say what the target block is (build.py)
            detail = f" ({block.detail})" if block.detail else ""
            self._add(
                at,
                1,
                "journal",
                f"jbd2 {block.what}, transaction {block.sequence}{detail}",
                P_JOURNAL_BLOCK,
                transaction=block.sequence,
                inode=node.ino,
            )

    def _info(self) -> dict[str, Any]:
        sb = self.sb
        volume = sb.s_volume_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        uuid = sb.s_uuid.hex()
        info: dict[str, Any] = {
            "volume_name": volume,
            "uuid": f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
            "block_size": self.bs,
            "blocks": self.blocks,
            "first_data_block": self.first_data_block,
            "blocks_per_group": self.bpg,
            "inodes_per_group": self.ipg,
            "inode_size": self.inode_size,
            "inodes": sb.s_inodes_count,
            "groups": self.all_groups,
            "inode_table_blocks": self.itable_blocks,
            "descriptor_size": self.desc_size,
            "reserved_gdt_blocks": sb.s_reserved_gdt_blocks if sb.s_feature_compat & COMPAT_RESIZE_INODE else 0,
            "flex_bg_size": (1 << sb.s_log_groups_per_flex) if sb.s_feature_incompat & INCOMPAT_FLEX_BG else 0,
            "features": self.features(),
            "free_blocks": sb.s_free_blocks_count_lo | ((sb.s_free_blocks_count_hi << 32) if self.wide else 0),
            "free_inodes": sb.s_free_inodes_count,
            "state": "clean" if sb.s_state & 1 else "not clean",
            "needs_recovery": bool(sb.s_feature_incompat & INCOMPAT_RECOVER),
            "inodes_mapped": len(self.inodes),
            "paths_found": len(self.paths),
        }
        if sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
            info["backup_groups"] = [g for g in (sb.s_backup_bgs_0, sb.s_backup_bgs_1) if g]
        journal = getattr(self, "journal_info", None)
        if journal is not None:
            info["journal"] = journal
        return info


def _groups(first: int, last: int) -> str:
    return f"of group {first}" if first == last else f"of groups {first}-{last}"


def _type_name(mode: int, ino: int, special: dict[int, str]) -> str:
    if ino in special:
        return special[ino]
    return {S_IFDIR: "directory", S_IFREG: "file", S_IFLNK: "symlink"}.get(mode & S_IFMT, "other")


def _dirents(raw: bytes, bs: int, filetype: bool) -> list[tuple[str, int]]:
    """(name, inode) of the live entries in directory blocks, '.' and '..' left out."""
    out: list[tuple[str, int]] = []
    for base in range(0, len(raw), bs):
        pos = base
        end = base + bs
        while pos + 8 <= end:
            ino, rec_len, name_len, ftype = DIRENT.unpack_from(raw, pos)
            if rec_len < 8 or pos + rec_len > end:
                break
            if not filetype:
                name_len |= ftype << 8
            if ino and 0 < name_len <= rec_len - 8:
                name = raw[pos + 8 : pos + 8 + name_len]
                if name not in (b".", b".."):
                    out.append((name.decode("utf-8", "replace"), ino))
            pos += rec_len
    return out


def _zero_runs(bitmap: bytes, bits: int) -> list[tuple[int, int]]:
    """[start, end) runs of 0 bits among the first `bits` of a little-endian bitmap (bit 0 = byte 0's low bit)."""
    if not bits:
        return []
    value = int.from_bytes(bitmap[: (bits + 7) // 8], "little")
    full = (1 << bits) - 1
    value &= full
    if value == full:
        return []
    if value == 0:
        return [(0, bits)]
    runs: list[tuple[int, int]] = []
    inverted = ~value & full
    pos = 0
    while pos < bits:
        rest = inverted >> pos
        if not rest:
            break
        start = pos + ((rest & -rest).bit_length() - 1)
        ones = value >> start
        end = bits if not ones else start + ((ones & -ones).bit_length() - 1)
        runs.append((start, end))
        pos = end
    return runs
