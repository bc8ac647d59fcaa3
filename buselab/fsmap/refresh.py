"""When to rebuild a map: after writes to its metadata have settled, and not too often.

A pure timer (the caller passes the clock): `note(now)` for each write that `needs_refresh`,
`due(now)` to ask whether to rebuild, `done(now)` after rebuilding. mkfs or a busy mount
writes metadata in bursts; rebuilding once `quiet` seconds pass without such a write, or at
most `max_wait` seconds after the first one, keeps the map current without re-reading the
disk on every write.
"""

from __future__ import annotations


class RefreshTimer:
    def __init__(self, quiet: float = 0.5, max_wait: float = 3.0) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: float | None = None  # the first unanswered metadata write
        self._last = 0.0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def note(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def due(self, now: float) -> bool:
        if self._first is None:
            return False
        return now - self._last >= self.quiet or now - self._first >= self.max_wait

    def done(self, started: float) -> None:
        """The map was rebuilt by reading the disk from `started` on: writes noted since then still count."""
        if self._first is not None and self._last > started:
            self._first = self._last
        else:
            self._first = None
