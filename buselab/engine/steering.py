"""Steering: what the lab's keys and `buselab ctl` do to a running engine.

One `Steering` per engine (`Steering.attach(engine, session)`) owns:

- the gate's controls: pause, resume, step (release the oldest held request,
  or fail it with an errno, or run it late), waiting for requests to be held;
- breakpoints: a request that matches one (op, FUA, byte or block range,
  payload pattern) halts the gate and is itself held;
- the active stack: filters over a base backend, added, removed and toggled
  live, and the base itself switched live (ram, file, cow, null, plugin) with
  its contents copied across;
- actions on the stack: a power cut of the write-back cache, cow commit and
  discard.

Every method that changes the stack does it inside `engine.quiesce()`, so no
request is in a backend while the stack changes; every change is written to
`telemetry.events`, so the lab's stream shows it. Input that makes no sense
raises `SteeringError` (a UserError) with one line and changes nothing. All
results are plain JSON-able dicts, which is what the control socket sends.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, BackendError
from ..backends.cow import CowBackend
from ..errors import UserError
from ..filters import CacheFilter, Filter, parse_filter_spec
from ..filters.spec import parse_errno, parse_offset, parse_pattern, parse_range, split_spec
from ..protocol import constants as c
from ..protocol.transmission import Request
from ..sizes import human_bytes, parse_size

if TYPE_CHECKING:
    from ..session import Session
    from .engine import Engine
    from .gate import HeldRequest

log = logging.getLogger("buselab")

BACKEND_CHOICES = ("ram", "file", "cow", "null", "plugin")
STEP_ACTIONS = ("release", "fail", "delay")
MAX_DELAY_MS = 3_600_000
_COPY_CHUNK = 1 << 20
_RETIRE_AFTER = 2.0  # seconds: replies may still be sending from an old backend's buffers
_attach_lock = threading.Lock()


class SteeringError(UserError):
    """A steering command that makes no sense; the message is one line and nothing changed."""


# -- breakpoints ------------------------------------------------------------------

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
    "blocks=A-B [bs=4096], pattern=HEX|le16:0xEF53|text:WORD [at=OFFSET], or a preset: ext4-sb"
)


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
    enabled: bool = True
    hits: int = 0
    _search: Callable | None = field(default=None, repr=False, compare=False)

    def matches(self, req: Request) -> bool:
        if self.cmds is not None and req.cmd not in self.cmds:
            return False
        if self.fua and not req.flags & c.CMD_FLAG_FUA:
            return False
        if self.start is not None and (req.offset >= self.end or req.offset + req.length <= self.start):  # type: ignore[operator]
            return False
        pattern = self.pattern
        if pattern is not None:
            payload = req.payload
            if payload is None:
                return False
            if self.at is not None:
                rel = self.at - req.offset
                if rel < 0 or rel + len(pattern) > len(payload):
                    return False
                return payload[rel : rel + len(pattern)] == pattern
            if self._search is None:
                self._search = re.compile(re.escape(pattern)).search
            return self._search(payload) is not None  # searches the buffer in place, no copy
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "spec": self.spec, "enabled": self.enabled, "hits": self.hits}


def parse_breakpoint(spec: str, size: int | None = None, bp_id: int = 0) -> Breakpoint:
    """'op=flush', 'op=write+fua', 'range=0-1M', 'blocks=0-7', 'pattern=53ef,at=1080', 'ext4-sb', 'flush'."""
    text = str(spec).strip()
    if not text:
        raise SteeringError(f"an empty breakpoint: give {BREAKPOINT_HELP}")
    # split_spec wants NAME[:params]; a breakpoint is only params.
    _, params = split_spec("break:" + text)
    expanded: list[tuple[str, str]] = []
    for key, value in params:
        if key == "" and value.lower() in _PRESETS:
            expanded.extend(split_spec("break:" + _PRESETS[value.lower()])[1])
        elif key == "" and (value.lower() in _BREAK_OPS or value.lower() == "fua"):
            expanded.append(("op", value))
        else:
            expanded.append((key, value))
    cmds: set[int] = set()
    fua = False
    byte_range = block_range = pattern = at = None
    block_size = 4096
    for key, value in expanded:
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
                    raise SteeringError(f"unknown op {name!r} in breakpoint {text!r}: use {BREAKPOINT_HELP}")
        elif key == "fua":
            fua = _yes(value)
        elif key in ("range", "bytes"):
            byte_range = value
        elif key in ("blocks", "block"):
            block_range = value
        elif key in ("bs", "block_size", "block-size"):
            try:
                block_size = parse_size(value)
            except UserError as exc:
                raise SteeringError(str(exc)) from None
        elif key == "pattern":
            pattern = parse_pattern(value)
        elif key in ("at", "offset"):
            at = parse_offset(value)
        else:
            raise SteeringError(f"breakpoints do not know {key or value!r}: use {BREAKPOINT_HELP}")
    bp = Breakpoint(id=bp_id, spec=text, fua=fua)
    if byte_range is not None and block_range is not None:
        raise SteeringError("give range= (bytes) or blocks=, not both")
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
                raise SteeringError(f"at={at} puts the pattern past the end of the {size}-byte disk")
            bp.at = at
    elif at is not None:
        raise SteeringError("at= places a pattern: give pattern= too (or use range= for a byte range)")
    bp.cmds = frozenset(cmds) if cmds else None
    if bp.cmds is None and not bp.fua and bp.start is None and bp.pattern is None:
        raise SteeringError(f"breakpoint {text!r} has no condition: give {BREAKPOINT_HELP}")
    return bp


def _yes(value: str) -> bool:
    from ..filters.spec import parse_bool

    try:
        return parse_bool(value)
    except UserError as exc:
        raise SteeringError(str(exc)) from None


def describe_request(req: Request) -> dict[str, Any]:
    flags = [name for bit, name in ((c.CMD_FLAG_FUA, "FUA"), (c.CMD_FLAG_NO_HOLE, "NO_HOLE")) if req.flags & bit]
    return {"op": req.name, "offset": req.offset, "length": req.length, "flags": flags, "handle": req.handle}


def describe_held(item: HeldRequest, now: float | None = None) -> dict[str, Any]:
    info = describe_request(item.req)
    info["conn"] = getattr(item.replier, "number", 0)
    info["waited"] = round((now or time.monotonic()) - item.held_since, 3)
    bp = item.breakpoint
    info["breakpoint"] = bp.id if isinstance(bp, Breakpoint) else None
    return info


# -- copying a disk ------------------------------------------------------------------


def copy_contents(src: Backend, dst: Backend, *, fresh: bool, progress: dict | None = None) -> int:
    """Copy every byte of `src` into `dst` (same size or bigger); returns bytes of data copied.

    Holes (when `src` can tell them) are skipped on a `fresh` target, which
    reads as zeros already, and zeroed on any other.
    """
    size = src.size
    extents = src.extents(0, size) if src.caps.extents else [(size, 0)]
    pos = 0
    copied = 0
    for length, flags in extents:
        end = min(pos + length, size)
        if flags & c.STATE_ZERO:
            if not fresh:
                dst.write_zeroes(pos, end - pos, may_trim=True, fast=False)
        else:
            while pos < end:
                n = min(_COPY_CHUNK, end - pos)
                dst.write(pos, src.read(pos, n))
                pos += n
                copied += n
                if progress is not None:
                    progress["copied"] = copied
        pos = end
        if progress is not None:
            progress["position"] = pos
    dst.flush()
    return copied


# -- steering --------------------------------------------------------------------------


class Steering:
    def __init__(self, engine: Engine, session: Session | None = None) -> None:
        self.engine = engine
        self.session = session
        self._lock = threading.RLock()  # one change to the stack at a time
        self.base: Backend = engine.backend
        self.filters: list[Filter] = []  # bottom first
        self._adopt(engine.backend)
        self.breakpoints: dict[int, Breakpoint] = {}
        self._armed: tuple[Breakpoint, ...] = ()
        self._bp_ids = itertools.count(1)
        self._filter_ids = itertools.count(1)
        self.last_break: dict[str, Any] | None = None  # the request that last hit a breakpoint
        self.last_step: dict[str, Any] | None = None  # the request last stepped, for the inspector
        self.last_stepped: HeldRequest | None = None  # ... and the request itself (payload included)
        self.switching: dict[str, Any] | None = None  # progress of a switch while it copies

    @classmethod
    def attach(cls, engine: Engine, session: Session | None = None) -> Steering:
        """The engine's steering, made on first use."""
        with _attach_lock:
            steering = engine.steering
            if steering is None:
                steering = engine.steering = cls(engine, session)
            elif session is not None and steering.session is None:
                steering.session = session
            return steering

    # -- helpers ---------------------------------------------------------------------
    def _adopt(self, top: Backend) -> None:
        filters = []
        while isinstance(top, Filter):
            filters.insert(0, top)
            top = top.inner
        self.base = top
        self.filters = filters

    def _sync(self) -> None:
        """Someone set engine.backend without us: take the stack as it is."""
        if self.engine.backend is not self._top():
            self._adopt(self.engine.backend)

    def _top(self) -> Backend:
        top = self.base
        for f in self.filters:
            if f.enabled:
                top = f
        return top

    def _rewire(self) -> None:
        top = self.base
        for f in self.filters:
            f.inner = top  # a disabled filter still knows what is below it
            if f.enabled:
                top = f
        self.engine.backend = top

    def _event(self, message: str) -> None:
        self.engine.telemetry.event(message)
        log.info("%s", message)

    def _change(self, what: str):
        """Context: quiesce the engine, turning a timeout into one clear line."""
        return _Quiesce(self.engine, what)

    @property
    def gate(self):
        return self.engine.gate

    # -- pause, resume, step ---------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """The user's pause (or a breakpoint's): requests that arrive are held."""
        return self.engine.gate.halted

    def pause(self) -> dict[str, Any]:
        was = self.gate.halted
        self.gate.pause()
        if not was:
            self._event("paused: new requests are held")
        return {"paused": True, "held": len(self.gate.held())}

    def resume(self) -> dict[str, Any]:
        was = self.gate.halted
        released = self.gate.resume()
        if was or released:
            self._event(f"resumed: released {released} held request{'s' if released != 1 else ''}")
        return {"paused": False, "released": released}

    def held(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [describe_held(item, now) for item in self.gate.held()]

    def oldest_wait(self) -> float:
        """Seconds the oldest held request has waited (for the header)."""
        return self.gate.oldest_wait()

    def step(
        self,
        action: str = "release",
        *,
        errno: int | str | None = None,
        delay_ms: float | None = None,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Release the oldest held request; or fail it with `errno`; or run it `delay_ms` late.

        `wait` seconds: wait that long for a request to be held if none is yet.
        """
        action = (action or "release").lower()
        if action not in STEP_ACTIONS:
            raise SteeringError(f"unknown step action {action!r}: choose one of {', '.join(STEP_ACTIONS)}")
        gate_action: tuple[str, float] | None = None
        if action == "fail":
            gate_action = ("fail", parse_errno(errno if errno is not None else "EIO"))
        elif action == "delay":
            try:
                ms = float(delay_ms) if delay_ms is not None else -1.0
            except (TypeError, ValueError):
                raise SteeringError(f"bad delay {delay_ms!r}: give milliseconds, e.g. 500") from None
            if not 0 < ms <= MAX_DELAY_MS:
                raise SteeringError(f"bad delay {delay_ms!r}: give milliseconds between 1 and {MAX_DELAY_MS}")
            gate_action = ("delay", ms / 1000)
        elif errno is not None or delay_ms is not None:
            raise SteeringError("errno goes with step --fail, a delay with step --delay")
        self._wait_for_held(1, _seconds(wait, "wait"), strict=False)
        if not self.gate.halted and not self.gate.held():
            raise SteeringError("not paused: pause first (or set a breakpoint), then step")
        item = self.gate.step(gate_action)
        if item is None:
            raise SteeringError("nothing is held: no request has arrived since the pause (try step --wait 5)")
        self.last_stepped = item
        info = describe_held(item)
        info["action"] = action
        if gate_action is not None:
            info["errno" if action == "fail" else "delay_ms"] = (
                c.ERRNO_NAMES[int(gate_action[1])] if action == "fail" else gate_action[1] * 1000
            )
        info["still_held"] = len(self.gate.held())
        self.last_step = info
        how = {
            "release": "",
            "fail": f", failed with {info.get('errno')}",
            "delay": f", delayed {info.get('delay_ms', 0):g} ms",
        }[action]
        self._event(f"stepped {info['op']} {info['offset']}+{info['length']}{how}")
        return info

    def wait_held(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least `count` requests are held; the held list, or SteeringError on timeout."""
        try:
            count = int(count)
        except (TypeError, ValueError):
            raise SteeringError(f"bad count {count!r}: give a whole number") from None
        if count < 1:
            raise SteeringError("count must be at least 1")
        self._wait_for_held(count, _seconds(timeout, "timeout"), strict=True)
        return self.held()

    def _wait_for_held(self, count: int, timeout: float, *, strict: bool) -> None:
        deadline = time.monotonic() + timeout
        while len(self.gate.held()) < count:
            if time.monotonic() >= deadline:
                if strict:
                    n = len(self.gate.held())
                    raise SteeringError(f"{n} request{'s' if n != 1 else ''} held after {timeout:g} s, not {count}")
                return
            time.sleep(0.005)

    # -- breakpoints ---------------------------------------------------------------------
    def add_breakpoint(self, spec: str) -> dict[str, Any]:
        with self._lock:
            bp = parse_breakpoint(spec, self.engine.size)
            bp.id = next(self._bp_ids)
            self.breakpoints[bp.id] = bp
            self._arm()
        self._event(f"breakpoint {bp.id} set: {bp.spec}")
        return bp.to_dict()

    def list_breakpoints(self) -> list[dict[str, Any]]:
        return [bp.to_dict() for bp in self.breakpoints.values()]

    def remove_breakpoint(self, ref: int | str) -> dict[str, Any]:
        with self._lock:
            if str(ref).lower() == "all":
                removed = list(self.breakpoints.values())
                self.breakpoints.clear()
            else:
                removed = [self.breakpoints.pop(self._find_breakpoint(ref).id)]
            self._arm()
        for bp in removed:
            self._event(f"breakpoint {bp.id} removed: {bp.spec}")
        return {"removed": [bp.id for bp in removed]}

    def set_breakpoint_enabled(self, ref: int | str, enabled: bool) -> dict[str, Any]:
        with self._lock:
            bp = self._find_breakpoint(ref)
            bp.enabled = bool(enabled)
            self._arm()
        self._event(f"breakpoint {bp.id} {'enabled' if enabled else 'disabled'}: {bp.spec}")
        return bp.to_dict()

    def toggle_breakpoint(self, ref: int | str) -> dict[str, Any]:
        return self.set_breakpoint_enabled(ref, not self._find_breakpoint(ref).enabled)

    def _find_breakpoint(self, ref: int | str) -> Breakpoint:
        try:
            bp = self.breakpoints.get(int(ref))
        except (TypeError, ValueError):
            bp = None
        if bp is None:
            have = ", ".join(str(i) for i in self.breakpoints) or "none"
            raise SteeringError(f"no breakpoint {ref!r} (breakpoints: {have})")
        return bp

    def _arm(self) -> None:
        self._armed = tuple(bp for bp in self.breakpoints.values() if bp.enabled)
        self.gate.set_matcher(self._match if self._armed else None)

    def _match(self, req: Request) -> Breakpoint | None:
        """Called by the gate on the connection's thread for every request while armed."""
        for bp in self._armed:
            try:
                hit = bp.enabled and bp.matches(req)
            except Exception:  # noqa: BLE001 - a breakpoint must never break serving
                hit = False
            if hit:
                bp.hits += 1
                info = describe_request(req)
                info.update(breakpoint=bp.id, spec=bp.spec, time=time.time())
                self.last_break = info
                self.engine.telemetry.event(
                    f"breakpoint {bp.id} ({bp.spec}) hit by {req.name} {req.offset}+{req.length}: paused"
                )
                return bp
        return None

    # -- filters ---------------------------------------------------------------------------
    def add_filter(self, spec: str | Filter, position: int | None = None) -> Filter:
        """Stack a filter (a spec or a made filter) on top, or at `position` (0 = lowest)."""
        with self._lock:
            self._sync()
            new = _parse_live_filter(spec, self.engine.size) if isinstance(spec, str) else spec
            if position is None:
                index = len(self.filters)
            else:
                try:
                    index = int(position)
                except (TypeError, ValueError):
                    raise SteeringError(f"bad position {position!r}: 0 is lowest") from None
                if not 0 <= index <= len(self.filters):
                    raise SteeringError(f"bad position {index}: choose 0 (lowest) to {len(self.filters)} (top)")
            new.id = next(self._filter_ids)
            with self._change(f"add filter {new.spec}"):
                self.filters.insert(index, new)
                self._rewire()
        self._event(f"filter {new.id} added: {new.spec}")
        return new

    def remove_filter(self, ref: int | str) -> Filter:
        with self._lock:
            self._sync()
            f = self._find_filter(ref)
            with self._change(f"remove filter {f.spec}"):
                if f.enabled:
                    f.detach()  # a cache writes back before it goes
                self.filters.remove(f)
                self._rewire()
        self._event(f"filter {f.id} removed: {f.spec}")
        return f

    def remove_all_filters(self) -> list[Filter]:
        """`filter rm all`: every filter, top first, each as `remove_filter` would (a cache writes back)."""
        with self._lock:
            self._sync()
            return [self.remove_filter(f.id) for f in reversed(list(self.filters))]

    def set_filter_enabled(self, ref: int | str, enabled: bool) -> Filter:
        with self._lock:
            self._sync()
            f = self._find_filter(ref)
            if f.enabled != bool(enabled):
                with self._change(f"{'enable' if enabled else 'disable'} filter {f.spec}"):
                    if f.enabled:
                        f.detach()
                    f.enabled = bool(enabled)
                    self._rewire()
        self._event(f"filter {f.id} {'enabled' if enabled else 'disabled'}: {f.spec}")
        return f

    def toggle_filter(self, ref: int | str) -> Filter:
        with self._lock:
            return self.set_filter_enabled(ref, not self._find_filter(ref).enabled)

    def list_filters(self) -> list[dict[str, Any]]:
        """Bottom (nearest the backend) first."""
        return [
            {"id": f.id, "name": f.name, "spec": f.spec, "enabled": f.enabled, "stats": f.stats()}
            for f in list(self.filters)
        ]

    def _find_filter(self, ref: int | str) -> Filter:
        text = str(ref).strip()
        if text.isdigit():
            found = [f for f in self.filters if f.id == int(text)]
        else:
            found = [f for f in reversed(self.filters) if f.name == text.lower() or f.spec == text]
        if not found:
            have = ", ".join(f"{f.id}:{f.spec}" for f in self.filters) or "none"
            raise SteeringError(f"no filter {text!r} (filters: {have})")
        return found[0]

    # -- backends ------------------------------------------------------------------------
    def switch_backend(
        self,
        kind: str,
        path: str | None = None,
        *,
        size: int | str | None = None,
        copy: bool = True,
    ) -> dict[str, Any]:
        """Replace the base backend live, under the filters; by default copy the disk into it.

        `kind`: ram, file (alias lo), null, plugin (path FILE[:CLASS]), cow (over
        the current backend, or over `path`). A target smaller than the disk is
        refused; so is copying into null (which keeps nothing).
        """
        kind = str(kind or "").strip().lower()
        kind = "file" if kind == "lo" else kind
        if kind not in BACKEND_CHOICES:
            raise SteeringError(f"unknown backend {kind!r}: choose one of {', '.join(BACKEND_CHOICES)}")
        if size is not None and not isinstance(size, int):
            size = parse_size(str(size))
        with self._lock:
            self._sync()
            old = self.base
            current = self.engine.size
            if kind == "cow" and not path:
                return self._cow_over_current(old, size)
            if kind == "null" and copy:
                raise SteeringError(
                    "null keeps no data: switching to it would lose the disk's contents; add --no-copy if you mean it"
                )
            new, created = self._open_target(kind, path, size, current, old)
            started = time.monotonic()
            try:
                if new.size < current:
                    raise SteeringError(
                        f"the new {kind} backend is {human_bytes(new.size)} ({new.size} bytes), smaller than the "
                        f"disk's {human_bytes(current)}: the data would not fit; nothing changed"
                    )
                if new.readonly:
                    raise SteeringError(f"{new.describe()} is read-only: it cannot hold a live disk")
                copied = 0
                with self._change(f"switch to {kind}"):
                    if copy:
                        self.switching = {"to": new.describe(), "copied": 0, "position": 0, "total": current}
                        try:
                            copied = copy_contents(old, new, fresh=created, progress=self.switching)
                        except (OSError, BackendError) as exc:
                            raise SteeringError(
                                f"copying the disk into {new.describe()} failed ({exc}); nothing changed"
                            ) from None
                        finally:
                            self.switching = None
                    self.base = new
                    self._rewire()
                    if new.size != current:
                        self.engine.telemetry.resize(new.size)
            except BaseException:
                _close_quietly(new)
                if created and path:
                    _unlink_quietly(path)
                raise
        seconds = time.monotonic() - started
        self._retire(old)
        how = f"copied {human_bytes(copied)} in {seconds:.2f} s" if copy else "contents not copied"
        self._event(f"switched backend: {old.describe()} -> {new.describe()} ({how})")
        return {
            "from": old.describe(),
            "to": new.describe(),
            "kind": kind,
            "size": new.size,
            "copied_bytes": copied,
            "seconds": round(seconds, 3),
        }

    def _cow_over_current(self, old: Backend, size: int | None) -> dict[str, Any]:
        if isinstance(old, CowBackend):
            raise SteeringError("the backend is cow already: commit or discard its changes, or switch to another")
        if size is not None and size != old.size:
            raise SteeringError("a cow overlay over the current backend keeps its size: drop --size")
        with self._change("switch to cow"):
            self.base = CowBackend(old)
            self._rewire()
        self._event(f"switched backend: copy-on-write overlay over {old.describe()} (changes kept in memory)")
        return {"from": old.describe(), "to": self.base.describe(), "kind": "cow", "size": old.size, "copied_bytes": 0}

    def _open_target(
        self, kind: str, path: str | None, size: int | None, current: int, old: Backend
    ) -> tuple[Backend, bool]:
        """The new backend, and whether it starts out all zeros (fresh)."""
        if kind == "ram":
            from ..backends.ram import RamBackend

            return RamBackend(size or current), True
        if kind == "null":
            from ..backends.null import NullBackend

            return NullBackend(size or current), True
        if not path:
            raise SteeringError(f"switch {kind} needs a PATH" + (" (FILE[:CLASS])" if kind == "plugin" else ""))
        if kind == "plugin":
            from ..backends.plugin import PluginBackend

            return PluginBackend(path, size), False
        if kind == "cow":
            return CowBackend.over_file(path), False
        from ..backends.file import FileBackend

        old_path = getattr(old, "path", None)
        if old_path and os.path.exists(path) and os.path.exists(old_path) and os.path.samefile(path, old_path):
            raise SteeringError(f"{path} is the file being served already")
        exists = os.path.exists(path)
        return FileBackend(path, size or (None if exists else current)), not exists

    def _retire(self, old: Backend) -> None:
        """Close an old backend once replies still being sent from its buffers have gone."""

        def close() -> None:
            try:
                old.close()
            except Exception as exc:  # noqa: BLE001 - it is out of service anyway
                log.debug("closing the old backend: %s", exc)

        timer = threading.Timer(_RETIRE_AFTER, close)
        timer.daemon = True
        timer.start()

    # -- actions ------------------------------------------------------------------------
    def powercut(self) -> dict[str, Any]:
        """Throw away every write the cache filter(s) hold that no FLUSH has sent down."""
        with self._lock:
            self._sync()
            caches = [f for f in self.filters if isinstance(f, CacheFilter) and f.enabled]
            if not caches:
                raise SteeringError(
                    "no cache filter to lose writes from: add one with `filter add cache` "
                    "(without it every acknowledged write is already in the backend)"
                )
            with self._change("power cut"):
                lost = sum(f.powercut() for f in caches)
        self._event(f"POWER CUT: {human_bytes(lost)} of writes since the last FLUSH lost")
        return {"lost_bytes": lost}

    def _cow(self) -> CowBackend:
        self._sync()
        if not isinstance(self.base, CowBackend):
            raise SteeringError(
                f"the backend is {self.base.kind}, not cow: `switch cow` puts a copy-on-write overlay over it"
            )
        return self.base

    def cow_commit(self) -> dict[str, Any]:
        with self._lock:
            cow = self._cow()
            with self._change("cow commit"):
                written = cow.commit()
        self._event(f"cow commit: {human_bytes(written)} of changes written into {cow.base.describe()}")
        return {"committed_bytes": written}

    def cow_discard(self) -> dict[str, Any]:
        with self._lock:
            cow = self._cow()
            with self._change("cow discard"):
                dropped = cow.discard()
        self._event(f"cow discard: {human_bytes(dropped)} of changes thrown away")
        return {"discarded_bytes": dropped}

    # -- the whole picture ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        engine = self.engine
        self._sync()
        held = self.held()
        base = self.base
        info: dict[str, Any] = {
            "backend": base.describe(),
            "kind": base.kind,
            "size": engine.size,
            "paused": self.paused,
            "held": held,
            "oldest_wait": round(self.oldest_wait(), 3),
            "filters": self.list_filters(),
            "breakpoints": self.list_breakpoints(),
            "last_break": self.last_break,
            "last_step": self.last_step,
            "switching": dict(self.switching) if self.switching else None,
            "requests": engine.telemetry.snapshot().total_requests,
            "connections": len(engine.telemetry.connections),
        }
        if isinstance(base, CowBackend):
            info["cow_changed_bytes"] = base.changed_bytes()
        session = self.session
        if session is not None:
            info["where"] = session.where
            control = getattr(session, "control", None)
            info["control"] = getattr(control, "path", None)
            info["control_error"] = getattr(control, "error", None)
        return info

    def events(self, after: float = 0.0, limit: int = 50) -> list[dict[str, Any]]:
        events = [(t, m) for t, m in list(self.engine.telemetry.events) if t > after]
        return [{"time": t, "message": m} for t, m in events[-max(1, int(limit)) :]]


class _Quiesce:
    """engine.quiesce() whose timeout becomes a SteeringError (and nothing changed)."""

    def __init__(self, engine: Engine, what: str) -> None:
        self._cm = engine.quiesce()
        self._what = what

    def __enter__(self) -> None:
        try:
            self._cm.__enter__()
        except TimeoutError:
            raise SteeringError(
                f"cannot {self._what}: requests in the backend did not finish in time; nothing changed"
            ) from None

    def __exit__(self, *exc: object) -> bool | None:
        return self._cm.__exit__(*exc)


def _parse_live_filter(spec: str, size: int) -> Filter:
    """parse_filter_spec for a filter added live (ctl, the lab): no --filter in the message.

    parse_filter_spec words its errors for the command line ("... (in --filter SPEC)");
    a filter added through `buselab ctl filter add` or the lab never went through --filter.
    """
    try:
        return parse_filter_spec(spec, size)
    except UserError as exc:
        message = str(exc)
        suffix = f" (in --filter {spec})"
        if message.endswith(suffix):
            message = f"{message[: -len(suffix)]} (in filter {spec})"
        raise SteeringError(message) from None


def _seconds(value: object, what: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SteeringError(f"bad {what} {value!r}: give seconds") from None
    if not 0 <= seconds <= 3600:
        raise SteeringError(f"bad {what} {value!r}: give 0 to 3600 seconds")
    return seconds


def _close_quietly(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:  # noqa: BLE001
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
