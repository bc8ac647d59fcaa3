"""The heatmap's structure view: each cell coloured by the structure that fills most of it.

Pure functions of the disk's map (buselab.fsmap), no Textual: the heatmap asks
`structure_cells` once per map and geometry (a map is replaced whole, never
changed, so its identity says when to ask again), never per request or frame.

Every colour is one of xterm's 256 (its 6x6x6 cube or its grey ramp), so a
256-colour terminal shows exactly what a truecolor one does, and none is an
index the heat view gives its read (blue), write (orange to yellow) or trim
(violet) heat, the lost red or the cursor: in this view those keep their
meaning in the stream and the graphs. Each kind has a resting colour and a
brighter one for cells touched in the last seconds, so I/O stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..fsmap import KINDS, FsMap

RGB = tuple[int, int, int]

# kind -> (resting, touched lately); the xterm index of each in the comment.
STRUCTURE_COLOURS: dict[str, tuple[RGB, RGB]] = {
    "superblock": ((175, 95, 95), (255, 175, 175)),  # 131 217
    "group-desc": ((175, 135, 95), (255, 215, 175)),  # 137 223
    "bitmap": ((95, 135, 0), (175, 215, 0)),  # 64 148
    "inode-table": ((0, 95, 0), (0, 215, 95)),  # 22 41
    "journal": ((0, 95, 95), (0, 215, 215)),  # 23 44
    "directory": ((135, 0, 95), (255, 95, 175)),  # 89 205
    "extent-tree": ((0, 135, 95), (95, 255, 175)),  # 29 85
    "data": ((95, 95, 135), (175, 175, 215)),  # 60 146
    "partition-table": ((95, 0, 0), (215, 95, 95)),  # 52 167
    "fat": ((135, 135, 0), (215, 215, 135)),  # 100 186
    "boot": ((135, 95, 135), (215, 175, 215)),  # 96 182
    "free": ((78, 78, 78), (138, 138, 138)),  # 239 245: lighter than untouched, the panel and "unknown"
    "unknown": ((58, 58, 58), (118, 118, 118)),  # 237 243
}
assert tuple(STRUCTURE_COLOURS) == KINDS, "a colour for every kind of the map, in its order"

# Which kind a cell shows when two fill it equally: the more telling (KINDS lists those first).
_TELLING = {kind: len(KINDS) - rank for rank, kind in enumerate(KINDS)}
RECENT = 0.05  # decayed touches above which a cell counts as touched lately


@dataclass(frozen=True)
class StructureCells:
    """What `structure_cells` worked out for one map and one geometry."""

    kinds: list[str]  # the dominant kind of each display cell
    disk_bytes: dict[str, int]  # bytes of each kind on the whole disk (gaps count as "unknown")
    size: int

    def share(self, kind: str) -> float:
        return self.disk_bytes.get(kind, 0) / self.size if self.size else 0.0

    def legend_kinds(self) -> list[str]:
        """The kinds some cell shows, the biggest share of the disk first."""
        shown = set(self.kinds)
        return sorted(shown, key=lambda kind: (-self.disk_bytes.get(kind, 0), KINDS.index(kind)))


def structure_cells(fsmap: FsMap | None, size: int, cell_bytes: int, cells: int) -> StructureCells:
    """The kind filling most of each of `cells` cells of `cell_bytes` bytes, from the map's regions.

    O(regions + cells): the map's regions are sorted and do not overlap, and a region is split
    only at the cell boundaries it crosses. Bytes no region covers are "unknown" (the map says
    "not mapped" there), as is the whole disk when there is no map yet.
    """
    per_cell: list[dict[str, int]] = [{} for _ in range(cells)]
    disk: dict[str, int] = {}
    limit = min(size, cells * cell_bytes)

    def add(kind: str, start: int, end: int) -> None:
        end = min(end, limit)
        if end <= start:
            return
        disk[kind] = disk.get(kind, 0) + end - start
        i = start // cell_bytes
        while start < end:
            stop = min((i + 1) * cell_bytes, end)
            counts = per_cell[i]
            counts[kind] = counts.get(kind, 0) + stop - start
            start = stop
            i += 1

    pos = 0
    for region in fsmap.regions if fsmap is not None else ():
        if region.offset >= limit:
            break
        if region.offset > pos:
            add("unknown", pos, region.offset)
        add(region.kind, max(region.offset, pos), region.end)
        pos = max(pos, region.end)
    add("unknown", pos, limit)
    telling = _TELLING
    kinds = [
        max(counts.items(), key=lambda kv: (kv[1], telling[kv[0]]))[0] if counts else "unknown" for counts in per_cell
    ]
    return StructureCells(kinds, disk, size)


def structure_colour(kind: str, recent: float) -> RGB:
    """A cell's colour: its kind's, brighter when it was touched in the last seconds."""
    resting, touched = STRUCTURE_COLOURS.get(kind, STRUCTURE_COLOURS["unknown"])
    return touched if recent >= RECENT else resting


def knows_something(fsmap: FsMap | None) -> bool:
    """Does the map know what the disk holds (a partition table or a file system)?"""
    return fsmap is not None and bool(fsmap.filesystems or fsmap.table)
