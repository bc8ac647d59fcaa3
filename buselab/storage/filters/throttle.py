"""throttle: cap bandwidth (MB/s) and operations per second, like nbdkit's rate filter.

    throttle:mbps=10            reads and writes together move at most 10 MB/s (10,000,000 bytes)
    throttle:rate=10M           the same in binary units: 10 MiB/s
    throttle:iops=500           at most 500 requests a second, of any kind
    throttle:mbps=10,iops=500   both
    throttle:iops=100,burst=0   no burst credit: strictly evenly spaced

Each cap is a virtual clock that a request moves forward by its cost (bytes /
rate, or 1 / iops); a request waits until the clock reaches it. Up to `burst`
seconds of unused capacity (default 0.1 s) may be spent at once after a pause.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ...errors import UserError
from ...sizes import parse_size
from ..spec import parse_duration
from .base import Filter


class _Clock:
    def __init__(self, per_second: float, burst: float) -> None:
        self.per_second = per_second
        self.burst = burst
        self.next = 0.0

    def reserve(self, cost: float, now: float) -> float:
        """Reserve `cost` units; how long the caller must wait first."""
        start = max(self.next, now - self.burst)
        self.next = start + cost / self.per_second
        return start - now


class ThrottleFilter(Filter):
    name = "throttle"

    def __init__(
        self, *, bytes_per_second: float | None = None, iops: float | None = None, burst: float = 0.1, inner=None
    ) -> None:
        super().__init__(inner)
        if not bytes_per_second and not iops:
            raise UserError("throttle needs a cap: mbps=, rate= or iops=, e.g. throttle:mbps=10,iops=500")
        self._lock = threading.Lock()
        self._bytes = _Clock(bytes_per_second, burst) if bytes_per_second else None
        self._ops = _Clock(iops, burst) if iops else None
        self.bytes_per_second = bytes_per_second
        self.iops = iops
        self.waited = 0.0
        parts = []
        if bytes_per_second:
            parts.append(f"mbps={bytes_per_second / 1e6:g}")
        if iops:
            parts.append(f"iops={iops:g}")
        if burst != 0.1:
            parts.append(f"burst={burst * 1e3:g}ms")
        self.spec = "throttle:" + ",".join(parts)

    @classmethod
    def from_params(cls, params: list[tuple[str, str]], size: int | None = None) -> ThrottleFilter:
        kwargs: dict[str, Any] = {}
        for key, value in params:
            key = key.removeprefix("rate-").removeprefix("throttle-")
            try:
                if key in ("mbps", "mb/s", "mbs"):
                    kwargs["bytes_per_second"] = _positive(float(value), key) * 1e6
                elif key in ("rate", "bps", "bytes", ""):
                    kwargs["bytes_per_second"] = float(parse_size(value))
                elif key == "iops":
                    kwargs["iops"] = _positive(float(value), key)
                elif key == "burst":
                    kwargs["burst"] = parse_duration(value)
                else:
                    raise UserError(
                        f"throttle does not know {key!r}: use mbps=, rate=, iops= or burst=, "
                        "e.g. throttle:mbps=10,iops=500"
                    )
            except ValueError:
                raise UserError(f"bad {key}={value!r}: it needs a number") from None
        return cls(**kwargs)

    def _throttle(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            wait = 0.0
            if self._ops is not None:
                wait = self._ops.reserve(1, now)
            if self._bytes is not None and nbytes:
                wait = max(wait, self._bytes.reserve(nbytes, now))
        if wait > 0:
            time.sleep(wait)
            self.waited += wait

    def stats(self) -> dict[str, Any]:
        return {"waited_seconds": round(self.waited, 3)}

    def read(self, offset, length):
        self._throttle(length)
        return self.inner.read(offset, length)

    def write(self, offset, data, fua=False):
        self._throttle(len(data))
        self.inner.write(offset, data, fua)

    def flush(self):
        self._throttle(0)
        self.inner.flush()

    def trim(self, offset, length, fua=False):
        self._throttle(0)
        self.inner.trim(offset, length, fua)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        self._throttle(0)
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset, length):
        self._throttle(0)
        self.inner.cache(offset, length)


def _positive(value: float, key: str) -> float:
    if value <= 0:
        raise UserError(f"{key} must be more than 0")
    return value
