"""Parsing the small values that filter specs, breakpoints and ctl take.

Every parser raises `SpecError` (a UserError) with one line that names the bad
text and says what would be accepted, so a typo on the CLI or the control
socket never ends in a traceback. The message says nothing about where the
text came from (--filter, ctl, the lab): the front end that took it adds that.
"""

from __future__ import annotations

import re

from ..errors import UserError
from ..protocol import constants as c
from ..sizes import parse_size


class SpecError(UserError):
    """A value in a spec (a size, a duration, an errno, a range ...) that makes no sense."""


# Backend operations a filter can act on, by the name specs use.
OPS = ("read", "write", "flush", "trim", "zero", "cache", "extents")
_OP_ALIASES = {
    "pread": "read",
    "pwrite": "write",
    "write_zeroes": "zero",
    "write-zeroes": "zero",
    "zeroes": "zero",
    "discard": "trim",
    "block_status": "extents",
    "block-status": "extents",
}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str) -> float:
    """'5ms' -> 0.005 seconds; units us (or µs), ms, s.

    A number needs its unit ('5' could be 5 ms or 5 s): only 0 goes without.
    """
    if str(text).strip().startswith("-"):
        raise SpecError(f"bad duration {text!r}: must not be negative")
    match = _DURATION_RE.match(str(text))
    if not match:
        raise SpecError(f"bad duration {text!r}: use a number with a unit, like 500us, 5ms or 1s")
    number, unit = match.groups()
    if unit is None:
        if float(number) == 0:
            return 0.0
        raise SpecError(f"bad duration {text!r}: give a unit (us, ms or s), like {number.strip()}ms")
    return float(number) * _DURATION_UNITS[unit.lower()]


def parse_duration_range(text: str) -> tuple[float, float]:
    """'5ms' -> (0.005, 0.005); '1ms-20ms' -> (0.001, 0.02): a uniform random choice."""
    if str(text).strip().startswith("-"):
        raise SpecError(f"bad duration {text!r}: must not be negative")
    low, sep, high = str(text).partition("-")
    if not sep:
        value = parse_duration(low)
        return value, value
    lo, hi = parse_duration(low), parse_duration(high)
    if hi < lo:
        raise SpecError(f"bad duration range {text!r}: the second value must not be smaller than the first")
    return lo, hi


def parse_op(text: str) -> str:
    name = text.strip().lower()
    name = _OP_ALIASES.get(name, name)
    if name not in OPS:
        raise SpecError(f"unknown operation {text!r}: choose from {', '.join(OPS)} or all")
    return name


def parse_ops(text: str) -> frozenset[str]:
    """'read', 'read+write', 'read|trim', 'all' -> a set of op names."""
    names = [part for part in re.split(r"[+|/ ]", text) if part]
    if not names:
        raise SpecError("an empty op: choose from " + ", ".join(OPS) + " or all")
    if any(name.lower() == "all" for name in names):
        return frozenset(OPS)
    return frozenset(parse_op(name) for name in names)


def parse_errno(text: str | int) -> int:
    """'EIO', 'eio', '5' -> 5: only errors NBD can carry on the wire."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        name = str(text).strip().upper()
        if name.isdigit():
            value = int(name)
        else:
            if not name.startswith("E"):
                name = "E" + name
            value = c.ERRNO_BY_NAME.get(name, -1)
    if value not in c.ERRNO_NAMES or value == 0:
        choices = ", ".join(c.ERRNO_BY_NAME)
        raise SpecError(f"bad errno {text!r}: NBD can send {choices}")
    return value


def parse_offset(text: str | int) -> int:
    """A byte offset: '0', '1M', '4096'."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise SpecError(f"bad offset {text}: it cannot be negative")
        return text
    text = str(text).strip()
    if text in ("0", ""):
        return 0
    try:
        return int(text, 0)
    except ValueError:
        pass
    return parse_size(text)


def parse_range(text: str, size: int | None = None, *, unit: int = 1, what: str = "range") -> tuple[int, int]:
    """'0-1M' -> [0, 1 MiB); 'START+LENGTH'; a single 'N' is one unit; bytes unless `unit` says blocks.

    With `size`, a range that reaches past the end of the disk is refused.
    """
    text = str(text).strip()
    try:
        if "+" in text:
            start_text, _, length_text = text.partition("+")
            start = parse_offset(start_text) * unit
            end = start + parse_offset(length_text) * unit
        elif "-" in text:
            start_text, _, end_text = text.partition("-")
            start = parse_offset(start_text) * unit
            end = parse_offset(end_text) * unit
        else:
            start = parse_offset(text) * unit
            end = start + unit
    except UserError as exc:
        raise SpecError(f"bad {what} {text!r}: use START-END or START+LENGTH, like 0-1M ({exc})") from None
    if end <= start:
        raise SpecError(f"bad {what} {text!r}: it is empty (END must be past START; END is not included)")
    if size is not None and end > size:
        raise SpecError(f"{what} {text!r} ends at byte {end}, past the end of the {size}-byte disk")
    return start, end


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "yes", "y", "true", "on", ""):
        return True
    if value in ("0", "no", "n", "false", "off"):
        return False
    raise SpecError(f"bad yes/no value {text!r}: use yes or no")


def parse_rate(text: str) -> float:
    """'0.1', '10%' -> 0.1: a probability."""
    value_text = str(text).strip()
    try:
        value = float(value_text[:-1]) / 100 if value_text.endswith("%") else float(value_text)
    except ValueError:
        raise SpecError(f"bad rate {text!r}: use a fraction like 0.1 or a percentage like 10%") from None
    if not 0.0 <= value <= 1.0:
        raise SpecError(f"bad rate {text!r}: it must be between 0 and 1 (0% and 100%)")
    return value


def parse_pattern(text: str) -> bytes:
    """Bytes to look for: hex ('53ef', '53:ef', '0x53ef'), 'le16:0xEF53', 'be32:...', or 'text:...'.

    A plain hex string is the bytes in the order they are on disk; the ext4
    superblock magic 0xEF53 is stored little-endian, so it is '53ef' or 'le16:0xEF53'.
    """
    text = str(text).strip()
    kind, sep, rest = text.partition(":")
    kind_l = kind.lower()
    if sep and kind_l in ("text", "ascii", "str"):
        if not rest:
            raise SpecError("an empty text pattern")
        return rest.encode()
    if sep and re.fullmatch(r"[lb]e(8|16|32|64)", kind_l):
        bits = int(kind_l[2:])
        try:
            value = int(rest, 0)
        except ValueError:
            raise SpecError(f"bad pattern {text!r}: {kind} needs a number, like {kind}:0xEF53") from None
        if not 0 <= value < 1 << bits:
            raise SpecError(f"bad pattern {text!r}: {value:#x} does not fit in {bits} bits")
        return value.to_bytes(bits // 8, "little" if kind_l.startswith("le") else "big")
    hex_text = text[2:] if text.lower().startswith("0x") else text
    hex_text = hex_text.replace(":", "").replace(" ", "").replace("\\x", "")
    try:
        data = bytes.fromhex(hex_text)
    except ValueError:
        data = b""
    if not data:
        raise SpecError(f"bad pattern {text!r}: use hex bytes (53ef), le16:0xEF53, be32:0x..., or text:WORD")
    return data


def split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """'delay:read=5ms,write=10ms' -> ('delay', [('read', '5ms'), ('write', '10ms')]).

    A parameter without '=' is returned with key '' (e.g. 'delay:5ms').
    """
    spec = str(spec).strip()
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if not name:
        raise SpecError(f"bad spec {spec!r}: it needs a name, like delay:read=5ms")
    params: list[tuple[str, str]] = []
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if sep:
            params.append((key.strip().lower(), value.strip()))
        else:
            params.append(("", key.strip()))
    return name, params
