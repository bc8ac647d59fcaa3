"""readonly: writes, trims and zeroing fail with EPERM; reads and flushes go through.

Clients that connected before the filter was added keep the flags they were
given, so they still send writes and see EPERM: that is the demonstration.
The export is not advertised read-only either, so a client that connects
while the filter is on behaves the same way.
"""

from __future__ import annotations

from typing import Any

from ...errors import UserError
from ...protocol import constants as c
from ..base import BackendError
from .base import Filter


class ReadonlyFilter(Filter):
    name = "readonly"

    def __init__(self, inner=None) -> None:
        super().__init__(inner)
        self.refused = 0

    @classmethod
    def from_params(cls, params: list[tuple[str, str]], size: int | None = None) -> ReadonlyFilter:
        if params:
            raise UserError("readonly takes no parameters")
        return cls()

    def _refuse(self) -> None:
        self.refused += 1
        raise BackendError(c.EPERM, "the readonly filter refuses writes")

    def stats(self) -> dict[str, Any]:
        return {"refused": self.refused}

    def write(self, offset, data, fua=False):
        self._refuse()

    def trim(self, offset, length, fua=False):
        self._refuse()

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        self._refuse()
