"""What a disk holds, from its own bytes: partition tables and file systems as a map of regions.

    fsmap = build_map(read, size)          # read(offset, length) -> bytes
    fsmap.label(offset, length)            # Label("ext4 group 3 inode bitmap", "bitmap")
    fsmap.label(offset, length, data)      # journal blocks decoded: "jbd2 commit, transaction 57"
    fsmap.needs_refresh(offset, length)    # a write there changes the map: build it again

Pure: bytes in, structures out; no threads, nothing of the engine. docs/LAYOUT.md describes the
regions, labels and kinds, and why the layouts are declared over `struct`.
"""

from .build import build_map
from .limits import Limits
from .model import KINDS, REFRESH_KINDS, Filesystem, FsMap, Label, Partition, Region
from .refresh import RefreshTimer

__all__ = [
    "KINDS",
    "REFRESH_KINDS",
    "Filesystem",
    "FsMap",
    "Label",
    "Limits",
    "Partition",
    "RefreshTimer",
    "Region",
    "build_map",
]
