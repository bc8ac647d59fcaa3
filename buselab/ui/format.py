"""How the lab writes requests down: op names and colours, sizes, flags, hexdumps.

Plain functions over plain values, so the widgets stay about layout and the
formatting can be tested without a terminal.
"""

from __future__ import annotations

import time

from ..protocol import constants as c
from ..sizes import human_bytes, human_rate, latency_text  # noqa: F401  (fmt.latency_text)

# One colour per op, used by the stream, the heatmap legend and the graphs.
OP_COLOURS: dict[int, str] = {
    c.CMD_READ: "#4fb3ff",
    c.CMD_WRITE: "#ff9e3d",
    c.CMD_FLUSH: "#f2d857",
    c.CMD_TRIM: "#c792ea",
    c.CMD_WRITE_ZEROES: "#e0745a",
    c.CMD_CACHE: "#7fd1b9",
    c.CMD_BLOCK_STATUS: "#9aa5b1",
    c.CMD_DISC: "#9aa5b1",
}
READ_COLOUR = OP_COLOURS[c.CMD_READ]
WRITE_COLOUR = OP_COLOURS[c.CMD_WRITE]
TRIM_COLOUR = OP_COLOURS[c.CMD_TRIM]
ERROR_COLOUR = "#ff5f5f"
HELD_COLOUR = "#ffd75f"
DIM_COLOUR = "#7a8391"
EVENT_COLOUR = "#7fd1b9"  # the engine's events in the stream (pause, switch, filter, ...)
REC_COLOUR = "#ff5f87"

# Five columns keep the stream narrow; the inspector gives the protocol's name.
OP_SHORT: dict[int, str] = {
    c.CMD_READ: "READ",
    c.CMD_WRITE: "WRITE",
    c.CMD_FLUSH: "FLUSH",
    c.CMD_TRIM: "TRIM",
    c.CMD_WRITE_ZEROES: "ZERO",
    c.CMD_CACHE: "CACHE",
    c.CMD_BLOCK_STATUS: "BSTAT",
    c.CMD_DISC: "DISC",
}

FLAG_NAMES = (
    (c.CMD_FLAG_FUA, "FUA"),
    (c.CMD_FLAG_NO_HOLE, "NO_HOLE"),
    (c.CMD_FLAG_DF, "DF"),
    (c.CMD_FLAG_REQ_ONE, "REQ_ONE"),
    (c.CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
)
FLAG_SHORT = {"FUA": "FUA", "NO_HOLE": "NOHOLE", "DF": "DF", "REQ_ONE": "ONE", "FAST_ZERO": "FAST"}

# Ops whose offset and length mean a byte range (FLUSH's are always zero).
RANGED_OPS = frozenset({c.CMD_READ, c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_CACHE, c.CMD_BLOCK_STATUS})


def op_short(cmd: int) -> str:
    return OP_SHORT.get(cmd, f"CMD{cmd}")


def op_name(cmd: int) -> str:
    return c.CMD_NAMES.get(cmd, f"CMD{cmd}")


def flag_names(flags: int) -> list[str]:
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    unknown = flags & ~c.KNOWN_CMD_FLAGS
    if unknown:
        names.append(f"{unknown:#x}")
    return names


def flags_short(flags: int) -> str:
    return ",".join(FLAG_SHORT.get(name, name) for name in flag_names(flags))


def errno_name(error: int) -> str:
    return c.ERRNO_NAMES.get(error, f"E{error}")


def compact_size(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 1536 -> '1.5K', 512 -> '512': fits 6 columns."""
    if n < 1024:
        return str(n)
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            if value == int(value):
                return f"{int(value)}{unit}"
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)  # pragma: no cover


def iec_size(n: int) -> str:
    """32768 -> '32 KiB', 1536 -> '1.5 KiB', 512 -> '512 B'."""
    compact = compact_size(n)
    if compact[-1].isdigit():
        return f"{compact} B"
    return f"{compact[:-1]} {compact[-1]}iB"


def exact_bytes(n: int) -> str:
    """'4 KiB' when that is exact, else '1,234 B (1.2 KiB)'."""
    if n < 1024:
        return f"{n:,} B"
    compact = compact_size(n)
    if "." not in compact:
        return f"{compact[:-1]} {compact[-1]}iB"
    return f"{n:,} B ({human_bytes(n)})"


_SECOND_CACHE: dict[int, str] = {}


def _hms(second: int) -> str:
    # localtime() is slow (glibc looks at the time zone each call) and every
    # row of the stream needs one: remember the last few seconds.
    text = _SECOND_CACHE.get(second)
    if text is None:
        if len(_SECOND_CACHE) > 64:
            _SECOND_CACHE.clear()
        text = _SECOND_CACHE[second] = time.strftime("%H:%M:%S", time.localtime(second))
    return text


def clock_text(wall: float, *, micro: bool = False) -> str:
    """HH:MM:SS.mmm (local time) of an epoch time."""
    second = int(wall)
    frac = wall - second
    if micro:
        return f"{_hms(second)}.{int(frac * 1e6):06d}"
    return f"{_hms(second)}.{int(frac * 1e3):03d}"


def duration_text(seconds: float) -> str:
    """0:01:23 style uptime."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


rate_text = human_rate  # the lab and the headless line say rates the same way


def count_text(n: float) -> str:
    """12,345 / 1.2M: counts that stay short."""
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def hexdump(data: bytes, *, base: int = 0, width: int = 16, squeeze: bool = True) -> list[str]:
    """Lines like `hexdump -C`: offset, hex bytes in two groups, ASCII; repeats become '*'."""
    lines: list[str] = []
    previous: bytes | None = None
    squeezing = False
    for pos in range(0, len(data), width):
        chunk = data[pos : pos + width]
        if squeeze and chunk == previous and len(chunk) == width:
            if not squeezing:
                lines.append("*")
                squeezing = True
            continue
        squeezing = False
        previous = chunk
        half = width // 2
        left = " ".join(f"{b:02x}" for b in chunk[:half])
        right = " ".join(f"{b:02x}" for b in chunk[half:])
        hexes = f"{left:<{half * 3 - 1}}  {right:<{half * 3 - 1}}"
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + pos:08x}  {hexes}  |{text}|")
    if squeezing:
        lines.append(f"{base + len(data):08x}")
    return lines
