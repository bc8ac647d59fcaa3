"""error: fail requests with a chosen errno, at a rate, on a byte range, per operation.

    error                                   every request fails with EIO
    error:rate=0.1,errno=EIO,op=read        10% of reads fail with EIO
    error:range=0-1M,errno=ENOSPC,op=write  writes touching the first MiB fail with ENOSPC
    error:rate=5%,op=read+write,seed=1      reproducible: a seeded random generator

Keys: rate (0..1 or N%, default 1 = always), errno (EPERM EIO ENOMEM EINVAL
ENOSPC EOVERFLOW ENOTSUP ESHUTDOWN, default EIO), op (read write flush trim
zero cache extents all, joined with +, default all), range (START-END or
START+LENGTH in bytes, END not included; FLUSH has no range, so a range never
fails a FLUSH), seed.
"""

from __future__ import annotations

import random
from typing import Any

from ...errors import UserError
from ...protocol import constants as c
from ..base import BackendError
from ..spec import OPS, parse_errno, parse_ops, parse_range, parse_rate
from .base import Filter


class ErrorFilter(Filter):
    name = "error"

    def __init__(
        self,
        *,
        rate: float = 1.0,
        errno: int = c.EIO,
        ops: frozenset[str] = frozenset(OPS),
        byte_range: tuple[int, int] | None = None,
        seed: int | None = None,
        inner=None,
    ) -> None:
        super().__init__(inner)
        self.rate = rate
        self.errno = errno
        self.ops = ops
        self.byte_range = byte_range
        self._random = random.Random(seed)
        self.injected = dict.fromkeys(OPS, 0)
        parts = []
        if rate != 1.0:
            parts.append(f"rate={rate:g}")
        parts.append(f"errno={c.ERRNO_NAMES[errno]}")
        if ops != frozenset(OPS):
            parts.append("op=" + "+".join(op for op in OPS if op in ops))
        if byte_range is not None:
            parts.append(f"range={byte_range[0]}-{byte_range[1]}")
        if seed is not None:
            parts.append(f"seed={seed}")
        self.spec = "error:" + ",".join(parts)

    @classmethod
    def from_params(cls, params: list[tuple[str, str]], size: int | None = None) -> ErrorFilter:
        kwargs: dict[str, Any] = {}
        ops: set[str] = set()
        for key, value in params:
            key = key.removeprefix("error-")
            if key in ("rate", "probability", "p"):
                kwargs["rate"] = parse_rate(value)
            elif key in ("errno", "error", "err"):
                kwargs["errno"] = parse_errno(value)
            elif key in ("op", "ops"):
                ops |= parse_ops(value)
            elif key == "range":
                kwargs["byte_range"] = parse_range(value, size)
            elif key == "seed":
                try:
                    kwargs["seed"] = int(value)
                except ValueError:
                    raise UserError(f"bad seed {value!r}: use a whole number") from None
            elif key == "":
                # error:EIO and error:0.1 are both natural to type.
                try:
                    kwargs["errno"] = parse_errno(value)
                except UserError:
                    kwargs["rate"] = parse_rate(value)
            else:
                raise UserError(
                    f"error does not know {key!r}: use rate=, errno=, op=, range= or seed=, "
                    "e.g. error:rate=0.1,errno=EIO,op=read"
                )
        if ops:
            kwargs["ops"] = frozenset(ops)
        return cls(**kwargs)

    def _fail(self, op: str, offset: int = -1, length: int = 0) -> None:
        if op not in self.ops:
            return
        if self.byte_range is not None:
            if offset < 0:
                return
            start, end = self.byte_range
            if offset >= end or offset + length <= start:
                return
        if self.rate < 1.0 and self._random.random() >= self.rate:
            return
        self.injected[op] += 1
        raise BackendError(self.errno, f"injected {c.ERRNO_NAMES[self.errno]} by the error filter")

    def stats(self) -> dict[str, Any]:
        return {"injected": sum(self.injected.values()), "by_op": {k: v for k, v in self.injected.items() if v}}

    def read(self, offset, length):
        self._fail("read", offset, length)
        return self.inner.read(offset, length)

    def write(self, offset, data, fua=False):
        self._fail("write", offset, len(data))
        self.inner.write(offset, data, fua)

    def flush(self):
        self._fail("flush")
        self.inner.flush()

    def trim(self, offset, length, fua=False):
        self._fail("trim", offset, length)
        self.inner.trim(offset, length, fua)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        self._fail("zero", offset, length)
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset, length):
        self._fail("cache", offset, length)
        self.inner.cache(offset, length)

    def extents(self, offset, length):
        self._fail("extents", offset, length)
        return self.inner.extents(offset, length)
