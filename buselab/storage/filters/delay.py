"""delay: fixed or random latency per operation, like nbdkit's delay filter.

    delay:5ms                     every operation waits 5 ms
    delay:read=5ms,write=10ms     per operation (read write flush trim zero cache extents all)
    delay:random=1ms-20ms         every operation waits a uniform random 1..20 ms
    delay:write=1ms-50ms          ranges work per operation too

The wait happens on the thread serving the request, before the layer below
runs. Each connection's thread runs its requests one after another, so the
delays of one connection add up (a kernel device with one connection and a
5 ms delay does at most 200 requests a second, whatever the queue depth);
requests on different connections overlap. nbdkit's delay filter overlaps
a connection's requests too (its threads run them in parallel).
"""

from __future__ import annotations

import random
import time
from typing import Any

from ...errors import UserError
from ..spec import OPS, parse_duration_range, parse_op
from .base import Filter

Delay = tuple[float, float]  # (low, high) seconds; low == high is fixed


class DelayFilter(Filter):
    name = "delay"

    def __init__(self, delays: dict[str, Delay], inner=None) -> None:
        super().__init__(inner)
        self.delays = {op: d for op, d in delays.items() if d[1] > 0}
        self.waited = 0.0  # seconds, all threads together (approximate, for display)
        self.spec = "delay:" + ",".join(f"{op}={_fmt(d)}" for op, d in self.delays.items()) if self.delays else "delay"

    @classmethod
    def from_params(cls, params: list[tuple[str, str]], size: int | None = None) -> DelayFilter:
        delays: dict[str, Delay] = {}
        for key, value in params:
            key = key.removeprefix("delay-")
            if key in ("", "all", "random", "ms"):
                if key == "ms":  # delay:ms=5 names its unit in the key
                    value = "-".join(
                        part + "ms" if part.replace(".", "", 1).isdigit() else part for part in value.split("-")
                    )
                d = parse_duration_range(value)
                for op in OPS:
                    delays[op] = d
            else:
                try:
                    op = parse_op(key)
                except UserError:
                    raise UserError(
                        f"delay does not know {key!r}: use read=, write=, flush=, trim=, zero=, cache=, "
                        "extents=, all= or random=, e.g. delay:read=5ms or delay:random=1ms-20ms"
                    ) from None
                delays[op] = parse_duration_range(value)
        if not delays:
            raise UserError("delay needs a latency, e.g. delay:5ms, delay:read=5ms,write=10ms or delay:random=1ms-20ms")
        return cls(delays)

    def _wait(self, op: str) -> None:
        d = self.delays.get(op)
        if d is not None:
            low, high = d
            seconds = low if low == high else random.uniform(low, high)
            time.sleep(seconds)
            self.waited += seconds

    def stats(self) -> dict[str, Any]:
        return {"waited_seconds": round(self.waited, 3)}

    def read(self, offset, length):
        self._wait("read")
        return self.inner.read(offset, length)

    def write(self, offset, data, fua=False):
        self._wait("write")
        self.inner.write(offset, data, fua)

    def flush(self):
        self._wait("flush")
        self.inner.flush()

    def trim(self, offset, length, fua=False):
        self._wait("trim")
        self.inner.trim(offset, length, fua)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        self._wait("zero")
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset, length):
        self._wait("cache")
        self.inner.cache(offset, length)

    def extents(self, offset, length):
        self._wait("extents")
        return self.inner.extents(offset, length)


def _fmt(d: Delay) -> str:
    low, high = d
    one = lambda s: f"{s * 1e3:g}ms"  # noqa: E731
    return one(low) if low == high else f"{one(low)}-{one(high)}"
