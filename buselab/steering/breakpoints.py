"""Breakpoints: a request that matches one halts the gate and is itself held.

    op=flush  op=write+fua  range=0-1M  blocks=4-7 [bs=4096]  pattern=53ef,at=1080  ext4-sb
    struct=journal  struct=inode-table,op=write  struct=bitmap+group-desc

Pure: parsing a spec into a `Breakpoint`, matching a request against it, and a
`BreakpointTable` that numbers them and gives the gate one matcher for the
enabled ones. No threads, no engine: steering arms the gate with `matcher()`.

`struct=KIND` names a kind of structure from the disk's map (buselab.fsmap.KINDS: superblock,
group-desc, bitmap, inode-table, journal, directory, extent-tree, data, partition-table, fat,
boot, free, unknown). A request matches when it touches a region of that kind. Kinds may be
given loosely: a few other names (jbd2, gdt, sb, inodes, dir, gpt, mbr, ...) and any
unambiguous start of a kind (`inode`, `dir`, `ext`). The table knows the map through
`current_map`, a function the session hands it (the Labeller's map: steering sits above the
engine and cannot reach the session); a struct breakpoint looks the request up in that map
(bisect, about a microsecond) when it arrives, before it runs. Without a struct breakpoint
armed nothing is looked up.

The same language filters the lab's stream (`parse_match(spec, what="filter")`): a
`Breakpoint` also matches a finished request's record (`matches_record`), whose payload
is the first KiB telemetry kept.
A spec that makes no sense raises `BreakpointError` with one line saying why
and what is accepted; the front end that took the spec says where it came from.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..fsmap import KINDS
from ..protocol import constants as c
from ..protocol.transmission import Request
from ..sizes import parse_size
from ..storage.spec import SpecError, parse_bool, parse_offset, parse_pattern, parse_range, split_spec
from .results import BreakHit, BreakpointInfo

if TYPE_CHECKING:
    from ..engine.telemetry import RequestRecord
    from ..fsmap import FsMap


class BreakpointError(SpecError):
    """A breakpoint spec that makes no sense, or a breakpoint that is not there."""


_BREAK_OPS = {
    "read": c.CMD_READ,
    "write": c.CMD_WRITE,
    "flush": c.CMD_FLUSH,
    "trim": c.CMD_TRIM,
    "discard": c.CMD_TRIM,
    "zero": c.CMD_WRITE_ZEROES,
    "write_zeroes": c.CMD_WRITE_ZEROES,
    "write-zeroes": c.CMD_WRITE_ZEROES,
    "cache": c.CMD_CACHE,
    "block_status": c.CMD_BLOCK_STATUS,
    "block-status": c.CMD_BLOCK_STATUS,
    "extents": c.CMD_BLOCK_STATUS,
}
EXT4_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the primary superblock
_PRESETS = {
    "ext4-sb": f"op=write,pattern=le16:0xEF53,at={EXT4_MAGIC_OFFSET}",
    "ext4-superblock": f"op=write,pattern=le16:0xEF53,at={EXT4_MAGIC_OFFSET}",
}
BREAKPOINT_HELP = (
    "op=OP[+OP] (read write flush trim zero cache block_status, or fua), fua=yes, range=START-END (bytes), "
    "blocks=A-B [bs=4096], pattern=HEX|le16:0xEF53|text:WORD [at=OFFSET], struct=KIND[+KIND], or a preset: ext4-sb"
)
# Other names for the map's kinds (KINDS), as people say them.
STRUCT_ALIASES = {
    "jbd2": "journal",
    "jbd": "journal",
    "sb": "superblock",
    "super": "superblock",
    "gdt": "group-desc",
    "descriptors": "group-desc",
    "group-descriptors": "group-desc",
    "bitmaps": "bitmap",
    "inodes": "inode-table",
    "itable": "inode-table",
    "dir": "directory",
    "dirs": "directory",
    "extents": "extent-tree",
    "gpt": "partition-table",
    "mbr": "partition-table",
    "partitions": "partition-table",
    "boot-sector": "boot",
    "file-data": "data",
}


def parse_kinds(value: str) -> frozenset[str]:
    """'journal', 'jbd2', 'inode+bitmap': kinds of the disk map; any unambiguous start of one will do."""
    kinds: set[str] = set()
    for word in (w.strip().lower().replace("_", "-") for w in value.replace("|", "+").split("+")):
        if not word:
            continue
        if word in KINDS:
            kinds.add(word)
        elif word in STRUCT_ALIASES:
            kinds.add(STRUCT_ALIASES[word])
        else:
            starts = [kind for kind in KINDS if kind.startswith(word)]
            if len(starts) != 1:
                why = f"{word!r} could be {' or '.join(starts)}" if starts else f"unknown structure {word!r}"
                raise BreakpointError(f"{why}: struct= takes {', '.join(KINDS)} (or jbd2, gdt, sb, dir, gpt, mbr)")
            kinds.add(starts[0])
    if not kinds:
        raise BreakpointError(f"struct= needs a kind: {', '.join(KINDS)}")
    return frozenset(kinds)


def touches(fsmap: FsMap, offset: int, length: int, kinds: frozenset[str]) -> bool:
    """Does [offset, offset+length) touch a region of one of `kinds` in the disk's map?"""
    label = fsmap.label(offset, length)
    if label.kind in kinds:
        return True
    if not label.more:  # one structure (the usual request): its label said it
        return False
    # Over several: the label names the most telling one; look at each (a bounded walk).
    regions = fsmap.regions_in(offset, length)[:64]
    if any(region.kind in kinds for region in regions):
        return True
    return "unknown" in kinds and _covers_gap(regions, offset, length)  # bytes no region holds


def _covers_gap(regions: list, offset: int, length: int) -> bool:
    """Does [offset, offset+length) include bytes none of `regions` holds (the map: "not mapped")?"""
    pos = offset
    for region in regions:
        if region.offset > pos:
            return True
        pos = max(pos, region.end)
    return pos < offset + length


@dataclass
class Breakpoint:
    id: int
    spec: str
    cmds: frozenset[int] | None = None  # None: any command
    fua: bool = False  # only requests with the FUA flag
    start: int | None = None  # byte range [start, end) the request must touch
    end: int | None = None
    pattern: bytes | None = None  # WRITE payload bytes to look for
    at: int | None = None  # ... at this device offset (None: anywhere in the payload)
    kinds: frozenset[str] | None = None  # structures of the disk's map the request must touch
    enabled: bool = True
    hits: int = 0
    _search: Callable | None = field(default=None, repr=False, compare=False)

    def matches(self, req: Request, fsmap: FsMap | None = None) -> bool:
        """Does an arriving request hit this? `fsmap`: the disk's map, for struct= (None: no map yet)."""
        cmds = self.cmds
        if cmds is not None and req.cmd not in cmds:
            return False  # the usual miss, answered before the call (this runs on serving threads)
        return self.test(req.cmd, req.flags, req.offset, req.length, req.payload, fsmap)

    def matches_record(self, record: RequestRecord, fsmap: FsMap | None = None) -> bool:
        """Does a finished request pass this (as a stream filter)? Its payload is the first KiB kept."""
        return self.test(record.cmd, record.flags, record.offset, record.length, record.preview, fsmap)

    def test(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | memoryview | None,
        fsmap: FsMap | None = None,
    ) -> bool:
        if self.cmds is not None and cmd not in self.cmds:
            return False
        if self.fua and not flags & c.CMD_FLAG_FUA:
            return False
        if self.start is not None and (offset >= self.end or offset + length <= self.start):  # type: ignore[operator]
            return False
        kinds = self.kinds
        if kinds is not None and (fsmap is None or cmd not in _RANGED or not touches(fsmap, offset, length, kinds)):
            return False
        pattern = self.pattern
        if pattern is not None:
            if payload is None:
                return False
            if self.at is not None:
                rel = self.at - offset
                if rel < 0 or rel + len(pattern) > len(payload):
                    return False
                return payload[rel : rel + len(pattern)] == pattern
            if self._search is None:
                self._search = re.compile(re.escape(pattern)).search
            return self._search(payload) is not None  # searches the buffer in place, no copy
        return True

    def match_range(self, req: Request) -> tuple[int, int] | None:
        """Where on the disk [start, end) the pattern matched in `req`'s payload (the lab
        opens its hexdump there); None for a breakpoint without a pattern, or no match."""
        pattern, payload = self.pattern, req.payload
        if pattern is None or payload is None:
            return None
        if self.at is not None:
            rel = self.at - req.offset
            found = rel >= 0 and payload[rel : rel + len(pattern)] == pattern
        else:
            rel = bytes(payload).find(pattern)
            found = rel >= 0
        return (req.offset + rel, req.offset + rel + len(pattern)) if found else None

    def info(self) -> BreakpointInfo:
        return BreakpointInfo(id=self.id, spec=self.spec, enabled=self.enabled, hits=self.hits)


_RANGED = frozenset(
    {c.CMD_READ, c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_CACHE, c.CMD_BLOCK_STATUS}
)  # ops with a range on the disk: the only ones that touch a structure


def parse_breakpoint(spec: str, size: int | None = None, bp_id: int = 0) -> Breakpoint:
    """'op=flush', 'op=write+fua', 'range=0-1M', 'blocks=0-7', 'pattern=53ef,at=1080', 'ext4-sb', 'flush',
    'struct=journal', 'struct=inode-table,op=write'."""
    return parse_match(spec, size, bp_id)


def parse_match(spec: str, size: int | None = None, bp_id: int = 0, what: str = "breakpoint") -> Breakpoint:
    """A spec in the breakpoints' language, for a breakpoint or (`what="filter"`) the stream's filter."""
    text = str(spec).strip()
    if not text:
        raise BreakpointError(f"an empty {what}: give {BREAKPOINT_HELP}")
    # split_spec wants NAME[:params]; a breakpoint is only params.
    _, params = split_spec("break:" + text)
    expanded: list[tuple[str, str]] = []
    for key, value in params:
        if key == "" and value.lower() in _PRESETS:
            expanded.extend(split_spec("break:" + _PRESETS[value.lower()])[1])
        elif key == "" and (value.lower() in _BREAK_OPS or value.lower() == "fua"):
            expanded.append(("op", value))
        elif key == "" and (value.lower() in KINDS or value.lower() in STRUCT_ALIASES):
            expanded.append(("struct", value))  # `journal` alone: the structure
        else:
            expanded.append((key, value))
    cmds: set[int] = set()
    fua = False
    byte_range = block_range = pattern = at = None
    kinds: frozenset[str] | None = None
    block_size = 4096
    for key, value in expanded:  # a bad value's SpecError says which; BreakpointError is a SpecError
        if key in ("op", "ops", "cmd"):
            for name in (n for n in value.replace("|", "+").split("+") if n):
                name = name.strip().lower()
                if name == "fua":
                    fua = True
                elif name in ("all", "any"):
                    cmds.update(_BREAK_OPS.values())
                elif name in _BREAK_OPS:
                    cmds.add(_BREAK_OPS[name])
                else:
                    raise BreakpointError(f"unknown op {name!r} in {what} {text!r}: use {BREAKPOINT_HELP}")
        elif key == "fua":
            fua = parse_bool(value)
        elif key in ("range", "bytes"):
            byte_range = value
        elif key in ("blocks", "block"):
            block_range = value
        elif key in ("bs", "block_size", "block-size"):
            block_size = parse_size(value)
        elif key == "pattern":
            pattern = parse_pattern(value)
        elif key in ("at", "offset"):
            at = parse_offset(value)
        elif key in ("struct", "structure", "kind"):
            kinds = (kinds or frozenset()) | parse_kinds(value)
        else:
            raise BreakpointError(f"{what}s do not know {key or value!r}: use {BREAKPOINT_HELP}")
    bp = Breakpoint(id=bp_id, spec=text, fua=fua, kinds=kinds)
    if byte_range is not None and block_range is not None:
        raise BreakpointError("give range= (bytes) or blocks=, not both")
    if byte_range is not None:
        bp.start, bp.end = parse_range(byte_range, size)
    elif block_range is not None:
        bp.start, bp.end = parse_range(block_range, size, unit=block_size, what="block range")
    if pattern is not None:
        bp.pattern = pattern
        if not cmds:
            cmds = {c.CMD_WRITE}  # only a WRITE carries a payload when it arrives
        if at is not None:
            if size is not None and at + len(pattern) > size:
                raise BreakpointError(f"at={at} puts the pattern past the end of the {size}-byte disk")
            bp.at = at
    elif at is not None:
        raise BreakpointError("at= places a pattern: give pattern= too (or use range= for a byte range)")
    bp.cmds = frozenset(cmds) if cmds else None
    if bp.cmds is None and not bp.fua and bp.start is None and bp.pattern is None and bp.kinds is None:
        raise BreakpointError(f"{what} {text!r} has no condition: give {BREAKPOINT_HELP}")
    return bp


class BreakpointTable:
    """The breakpoints set so far, numbered from 1, and the one that fired last.

    Changed from the UI and control threads (steering serialises the changes);
    `match` runs on serving threads and reads only the tuple of armed ones,
    which a change replaces whole.
    """

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size  # the disk's size now (it changes with a switch)
        self.by_id: dict[int, Breakpoint] = {}
        self._armed: tuple[Breakpoint, ...] = ()
        self._ids = itertools.count(1)
        self.last_hit: BreakHit | None = None
        self.on_hit: Callable[[Breakpoint, Request], None] = lambda bp, req: None
        # The disk's map now (the session hands over the Labeller's); asked per request only
        # while a struct= breakpoint is armed.
        self.current_map: Callable[[], FsMap | None] = lambda: None
        self._needs_map = False

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self):
        return iter(list(self.by_id.values()))

    @property
    def armed(self) -> int:
        return len(self._armed)

    def add(self, spec: str) -> Breakpoint:
        bp = parse_breakpoint(spec, self._size())
        bp.id = next(self._ids)
        self.by_id[bp.id] = bp
        self._arm()
        return bp

    def remove(self, ref: int | str) -> list[Breakpoint]:
        """One breakpoint by id, or `all` of them."""
        if str(ref).strip().lower() == "all":
            removed = list(self.by_id.values())
            self.by_id.clear()
        else:
            removed = [self.by_id.pop(self.find(ref).id)]
        self._arm()
        return removed

    def set_enabled(self, ref: int | str, enabled: bool) -> Breakpoint:
        bp = self.find(ref)
        bp.enabled = bool(enabled)
        self._arm()
        return bp

    def find(self, ref: int | str) -> Breakpoint:
        try:
            bp = self.by_id.get(int(ref))
        except (TypeError, ValueError):
            bp = None
        if bp is None:
            have = ", ".join(str(i) for i in self.by_id) or "none"
            raise BreakpointError(f"no breakpoint {ref!r} (breakpoints: {have})")
        return bp

    def infos(self) -> list[BreakpointInfo]:
        return [bp.info() for bp in list(self.by_id.values())]

    def matcher(self) -> Callable[[Request], Breakpoint | None] | None:
        """What the gate calls for every request while any breakpoint is armed; None when none is."""
        return self.match if self._armed else None

    def _arm(self) -> None:
        self._armed = tuple(bp for bp in self.by_id.values() if bp.enabled)
        self._needs_map = any(bp.kinds is not None for bp in self._armed)

    def match(self, req: Request) -> Breakpoint | None:
        """The first armed breakpoint `req` hits (counted and remembered), or None."""
        fsmap = self.current_map() if self._needs_map else None
        for bp in self._armed:
            try:
                hit = bp.enabled and bp.matches(req, fsmap)
            except Exception:  # noqa: BLE001 - a breakpoint must never break serving
                hit = False
            if hit:
                bp.hits += 1
                self.last_hit = BreakHit.of(req, breakpoint=bp.id, spec=bp.spec, time=time.time())
                self.on_hit(bp, req)
                return bp
        return None
