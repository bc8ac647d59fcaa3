"""Sorted, disjoint half-open ranges, merged as they are added.

The cow overlay keeps its zeroed block runs in one (a TRIM of the whole disk is one range), and
the labeller the bytes written after a request. A writer that goes forward keeps a single range,
so adding and asking stay cheap: two bisections and a slice.
"""

from __future__ import annotations

import bisect


class Ranges:
    """[start, end) ranges; `starts` and `ends` are sorted and in step (the lists are changed in place)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def add(self, start: int, end: int) -> None:
        """Cover [start, end); ranges it overlaps or touches merge with it."""
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, start)  # the first range that ends at or after start
        j = bisect.bisect_right(starts, end)  # past the last range that begins by end
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    def overlaps(self, start: int, end: int) -> bool:
        """Does any range share a point with [start, end)?"""
        i = bisect.bisect_right(self.ends, start)  # the first range that ends after start
        return i < len(self.starts) and self.starts[i] < end

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()
