"""Parsing sizes such as 512K, 128M, 1G, 1T and printing sizes, rates and latencies for humans."""

from __future__ import annotations

import re
from fractions import Fraction

import humanize

from .errors import UserError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'128M' -> 134217728. Binary units; a bare number is bytes."""
    match = _SIZE_RE.match(str(text))
    if not match and str(text).strip().startswith("-"):
        raise UserError(f"bad size {text!r}: a size cannot be negative")
    if not match:
        raise UserError(f"bad size {text!r}: use a number with an optional unit, like 512K, 128M, 1G or 1T")
    number, unit = match.groups()
    value = Fraction(number) * _UNITS[unit.upper()]  # exact: no float rounding of big sizes
    if value.denominator != 1:
        raise UserError(f"bad size {text!r}: it is not a whole number of bytes")
    if value <= 0:
        raise UserError(f"bad size {text!r}: a disk needs at least one byte")
    return int(value)


def human_bytes(n: float) -> str:
    return humanize.naturalsize(n, binary=True, format="%.1f")


def human_rate(bytes_per_second: float) -> str:
    """Always MB/s (decimal, like fio and the lab's graphs), with a precision that suits the value."""
    mb = bytes_per_second / 1e6
    if mb >= 100:
        return f"{mb:.0f} MB/s"
    if mb >= 10:
        return f"{mb:.1f} MB/s"
    return f"{mb:.2f} MB/s"


def latency_text(seconds: float) -> str:
    """A latency in a unit that suits it, three significant figures: 8.10 µs, 250 µs, 25.1 ms, 1.20 s.

    The one spelling of a latency: the lab, `ctl status`, the headless line and `stats` use it.
    """
    us = seconds * 1e6
    if us < 999.5:
        return f"{us:.0f} µs" if us >= 99.95 else f"{us:.1f} µs" if us >= 9.995 else f"{us:.2f} µs"
    ms = us / 1000
    if ms < 999.5:
        return f"{ms:.0f} ms" if ms >= 99.95 else f"{ms:.1f} ms" if ms >= 9.995 else f"{ms:.2f} ms"
    return f"{ms / 1000:.2f} s"
