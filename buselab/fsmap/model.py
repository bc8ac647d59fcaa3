"""What a map is made of: regions with labels, and the flat interval list that answers lookups.

A parser emits `Region`s that may nest (a partition holds a file system, a group holds its
bitmaps, the journal holds its superblock): each carries a `priority`, and `flatten` paints
them in priority order into non-overlapping segments, so the most specific structure is what a
byte belongs to. `FsMap.label` is then two bisects over plain lists.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from .jbd2 import JournalArea, describe_blocks, has_commit

Read = Callable[[int, int], bytes]
"""read(offset, length) -> exactly `length` bytes of the disk (a backend, an image file, an NBD client)."""

KINDS = (
    "superblock",
    "group-desc",
    "bitmap",
    "inode-table",
    "journal",
    "directory",
    "extent-tree",
    "data",
    "partition-table",
    "fat",
    "boot",
    "free",
    "unknown",
)
"""The fixed vocabulary of `Region.kind` / `Label.kind`: colours and `struct=KIND` filters use it."""

# Which label names a request that covers several structures: the most telling one.
_SIGNIFICANCE = {
    kind: rank
    for rank, kind in enumerate(
        (
            "unknown",
            "free",
            "data",
            "boot",
            "extent-tree",
            "directory",
            "fat",
            "inode-table",
            "bitmap",
            "journal",
            "group-desc",
            "partition-table",
            "superblock",
        )
    )
}

# Kinds whose bytes say where other things are: a write to one of them can change the map.
REFRESH_KINDS = frozenset(
    {"superblock", "group-desc", "bitmap", "inode-table", "directory", "extent-tree", "partition-table", "fat", "boot"}
)
PROBE_BYTES = 64 * 1024  # where a new partition table or file system would show itself first


class Label(NamedTuple):
    """What a request touches: `text` of the most telling structure, its `kind`, and how many more it spans."""

    text: str
    kind: str
    more: int = 0

    def __str__(self) -> str:
        return f"{self.text} (+{self.more} more)" if self.more else self.text


@dataclass(frozen=True, slots=True)
class Region:
    """One structure on the disk: bytes [offset, offset+length), what it is and what kind."""

    offset: int
    length: int
    kind: str
    label: str
    priority: int = 0
    group: int | None = None  # ext block group, where it belongs to one
    inode: int | None = None  # ext inode that owns it (data, directory, extent tree)
    path: str | None = None  # the file's path, where the walk found it
    block: int | None = None  # first file-system block (ext) or cluster (FAT), relative to the file system
    transaction: int | None = None  # jbd2 transaction id
    partition: int | None = None  # partition number, on a partitioned disk

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"offset": self.offset, "length": self.length, "kind": self.kind, "label": self.label}
        for key in ("group", "inode", "path", "block", "transaction", "partition"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


# Priorities: a higher one paints over a lower one where they overlap.
P_CONTAINER = 0  # a whole partition or file system, "in use, not mapped"
P_FREE = 1
P_DATA = 2
P_FILE_META = 3  # directories, extent trees, indirect blocks
P_JOURNAL = 4
P_JOURNAL_BLOCK = 5  # a decoded jbd2 block inside the journal
P_GROUP_META = 6  # bitmaps, inode tables, descriptors
P_SUPERBLOCK = 7
P_TABLE = 8  # partition tables


@dataclass
class Filesystem:
    """A file system found on the disk, with what `buselab layout` prints about it."""

    type: str  # ext2, ext3, ext4, vfat
    offset: int
    size: int
    block_size: int
    partition: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # type-specific, JSON-ready
    groups: list[dict[str, Any]] = field(default_factory=list)  # ext: one dict per block group
    files: list[dict[str, Any]] = field(default_factory=list)  # inodes or FAT files found, with their extents
    notes: list[str] = field(default_factory=list)  # limits reached, damage seen


@dataclass
class Partition:
    number: int
    offset: int
    size: int
    type: str  # "Linux filesystem", "EFI System", "0x83", ...
    name: str = ""
    contents: str = "unrecognised"  # ext4, vfat, ...


def flatten(regions: Iterable[Region]) -> list[Region]:
    """Non-overlapping regions, sorted, where each byte belongs to the highest-priority region over it.

    A sweep over the boundaries with a heap of the regions open at each point: O(n log n), where
    painting into a list would be quadratic for a file system with many files.
    """
    items = [r for r in regions if r.length > 0]
    if not items:
        return []
    events: list[tuple[int, int, int]] = []  # (position, 0 = end before 1 = start, index)
    for i, r in enumerate(items):
        events.append((r.offset, 1, i))
        events.append((r.end, 0, i))
    events.sort()
    heap: list[tuple[int, int]] = []  # (-priority, -index): the top is the highest, then the latest
    open_: set[int] = set()
    out: list[Region] = []
    k = 0
    n = len(events)
    while k < n:
        pos = events[k][0]
        while k < n and events[k][0] == pos:
            _, starting, i = events[k]
            if starting:
                open_.add(i)
                heapq.heappush(heap, (-items[i].priority, -i))
            else:
                open_.discard(i)
            k += 1
        while heap and -heap[0][1] not in open_:
            heapq.heappop(heap)
        if not heap or k >= n:
            continue
        top = items[-heap[0][1]]
        nxt = events[k][0]
        if out and out[-1].end == pos and _same(out[-1], top):
            out[-1] = replace(out[-1], length=nxt - out[-1].offset)
        elif top.offset == pos and top.end == nxt:
            out.append(top)
        else:
            out.append(replace(top, offset=pos, length=nxt - pos))
    return out


def _same(a: Region, b: Region) -> bool:
    return a.label == b.label and a.kind == b.kind and a.inode == b.inode and a.group == b.group


class FsMap:
    """The map of one disk: flat segments for lookups, and what was found for printing.

    Build one with `buselab.fsmap.build_map(read, size)`; it holds no reference to `read`.
    """

    def __init__(
        self,
        size: int,
        regions: list[Region],
        *,
        table: str | None = None,
        partitions: list[Partition] | None = None,
        filesystems: list[Filesystem] | None = None,
        journals: list[JournalArea] | None = None,
        probes: list[tuple[int, int]] | None = None,
        notes: list[str] | None = None,
        refresh_kinds: frozenset[str] = REFRESH_KINDS,
        watch_commits: bool = False,
    ) -> None:
        self.size = size
        self.watch_commits = watch_commits  # built with the journal replayed: a new commit changes the map
        self.regions = flatten(regions)
        self.table = table  # "GPT", "MBR" or None
        self.partitions = partitions or []
        self.filesystems = filesystems or []
        self.journals = journals or []
        self.notes = notes or []
        self.table_info: dict[str, Any] = {}  # GPT: disk GUID, entry array, backup header; sector size
        self.bytes_read = 0  # what building it read from the disk, and in how many calls
        self.reads = 0
        self._starts = [r.offset for r in self.regions]
        self._ends = [r.end for r in self.regions]
        self._labels = [Label(r.label, r.kind) for r in self.regions]
        self._gap = Label("not mapped", "unknown")
        watched = [(r.offset, r.end) for r in self.regions if r.kind in refresh_kinds]
        watched += [(start, start + length) for start, length in (probes if probes is not None else [(0, PROBE_BYTES)])]
        self._watch_starts, self._watch_ends = _merge(watched)
        self._journal_ranges = sorted(
            (start, start + length, area) for area in self.journals for start, length, _ in area.extents
        )

    # --- lookups (cheap: called for every request, off the serve path) -------------------

    def label(self, offset: int, length: int = 1, data: bytes | memoryview | None = None) -> Label:
        """The structure that [offset, offset+length) touches; with `data`, jbd2 blocks are decoded from it.

        A request over several structures is named by the most telling one (a superblock before
        the padding around it, an inode table before file data) with `more` = how many others.
        """
        i = bisect_right(self._starts, offset) - 1
        if i < 0 or self._ends[i] <= offset:
            if i + 1 >= len(self._starts) or self._starts[i + 1] >= offset + max(length, 1):
                return self._gap
            i += 1  # starts in a gap, runs into a region
        last = bisect_left(self._starts, offset + max(length, 1)) - 1
        best = self._labels[i]
        if last > i:
            rank = _SIGNIFICANCE
            for j in range(i + 1, min(last, i + 16) + 1):
                candidate = self._labels[j]
                if rank[candidate.kind] > rank[best.kind]:
                    best = candidate
            best = Label(best.text, best.kind, last - i)
        if data is not None and best.kind == "journal" and self._journal_ranges:
            decoded = self._decode_journal(offset, data)
            if decoded is not None:
                return Label(decoded, "journal", best.more)
        return best

    def lookup_table(self) -> tuple[list[int], list[int], list[Label], list[int], Label]:
        """What `label` looks requests up in, for a compiled copy of it (the trace writer's): the
        regions' starts, ends and labels, how telling each label's kind is, and a gap's label."""
        rank = _SIGNIFICANCE
        return self._starts, self._ends, self._labels, [rank[label.kind] for label in self._labels], self._gap

    def region_at(self, offset: int) -> Region | None:
        """The region holding byte `offset` (for an inspector: group, inode, path, block), or None."""
        i = bisect_right(self._starts, offset) - 1
        if i < 0 or self._ends[i] <= offset:
            return None
        return self.regions[i]

    def regions_in(self, offset: int, length: int) -> list[Region]:
        """Every region [offset, offset+length) touches, in order."""
        i = max(0, bisect_right(self._starts, offset) - 1)
        last = bisect_left(self._starts, offset + max(length, 1))
        return [r for r in self.regions[i:last] if r.end > offset]

    def needs_refresh(self, offset: int, length: int, data: bytes | memoryview | None = None) -> bool:
        """Does a write to [offset, offset+length) touch bytes the map was read from?

        Superblocks, descriptors, bitmaps, inode tables, directories, extent trees, partition
        tables, FATs, boot sectors, and the first 64 KiB of a disk or partition whose contents
        are not recognised (where a new file system would appear). For a map built with the journal replayed, also a write into
        the journal that holds a commit block (any write into the journal when `data` is not
        given). The caller re-builds the map, debounced (RefreshTimer), when it says so.
        """
        i = bisect_right(self._watch_starts, offset + max(length, 1) - 1) - 1
        if i >= 0 and self._watch_ends[i] > offset:
            return True
        if not self.watch_commits or not self._journal_ranges:
            return False
        k = bisect_right(self._journal_ranges, (offset + max(length, 1) - 1, float("inf"))) - 1
        if k < 0 or self._journal_ranges[k][1] <= offset:
            return False
        return data is None or has_commit(self._journal_ranges[k][2], offset, data)

    # --- jbd2 ---------------------------------------------------------------------------

    def _decode_journal(self, offset: int, data: bytes | memoryview) -> str | None:
        k = bisect_right(self._journal_ranges, (offset, float("inf"))) - 1
        if k < 0 or self._journal_ranges[k][1] <= offset:
            return None
        area = self._journal_ranges[k][2]
        return describe_blocks(area, offset, data)

    # --- for printing ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "size": self.size,
            "table": self.table,
            "table_info": self.table_info,
            "partitions": [asdict(p) for p in self.partitions],
            "filesystems": [asdict(f) for f in self.filesystems],
            "regions": [r.to_json() for r in self.regions],
            "notes": list(self.notes),
        }


def _merge(intervals: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(intervals):
        if starts and start <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends
