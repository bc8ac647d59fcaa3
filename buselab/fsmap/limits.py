"""Bounds on what building a map may read and keep, so a huge or hostile disk costs a bounded time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_inodes: int = 1_000_000  # inode-table slots read (bg_itable_unused skips the never used); past it, "in use"
    max_groups: int = 1 << 20  # block groups mapped (a 128 TiB ext4 of 4 KiB blocks has 2**20)
    max_dirs: int = 20_000  # directories read to find paths
    max_entries: int = 1_000_000  # directory entries read to find paths
    max_depth: int = 64  # directory levels below the root
    max_tree_blocks: int = 1_000_000  # extent-tree and indirect blocks read, for all inodes together
    max_dir_bytes: int = 256 << 20  # directory blocks read to find paths
    max_files_listed: int = 100_000  # files kept in Filesystem.files (the regions keep them all)
    max_journal_scan: int = 256 << 20  # journals bigger than this are not scanned block by block
    max_fat_bytes: int = 64 << 20  # FATs bigger than this are not read (clusters show as "in use")
    max_partitions: int = 128
