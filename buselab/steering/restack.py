"""Changing the storage under a running disk: filters added, removed and toggled,
the base backend switched (its contents copied across), a cache's power cut
and power on, a cow overlay's commit and discard.

A power cut is a crash: the cache filters throw away what no FLUSH sent down
and go dark (every request fails with EIO) until `poweron`. The writes thrown
away are matched to the requests telemetry recorded (`PowerCut.requests`), so
the lab can mark them lost.

A switch that copies the disk into a file refuses to copy over data: a file
that holds some, or any block device, needs `overwrite=True`; the refusal
says what is there (`existing_data`, `disk_signature`).

Every change happens inside `engine.quiesce()`, so no request is inside a layer
while the stack moves; a quiesce that times out becomes one SteeringError line
and nothing changed. Every change is an event in the telemetry, so the lab's
stream shows it. Backends and filters are made by `storage.registry`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

from ..engine.engine import Engine
from ..protocol import constants as c
from ..sizes import human_bytes, parse_size
from ..storage import registry
from ..storage.backends.cow import CowBackend
from ..storage.base import Backend, BackendError
from ..storage.filters.base import Filter
from ..storage.filters.cache import CacheFilter, LostWrite
from ..storage.stack import Layer, Stack
from .errors import SteeringError
from .results import (
    CowCommitResult,
    CowDiscardResult,
    ExistingData,
    FilterInfo,
    PowercutResult,
    PoweronResult,
    Removed,
    SwitchProgress,
    SwitchResult,
)

log = logging.getLogger("buselab")

_COPY_CHUNK = 1 << 20
_RETIRE_AFTER = 2.0  # seconds: replies may still be sending from an old backend's buffers


SIGNATURE_BYTES = 4096  # how much of a target disk_signature looks at

_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT4_INCOMPAT = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg: what mkfs.ext4 sets and ext3 cannot mount


def disk_signature(head: bytes) -> str:
    """What the first bytes of a disk (SIGNATURE_BYTES of them) say it holds, in a few words.

    'ext4 file system', 'GPT partition table', 'MBR partition table',
    'FAT32 file system', ... or 'data' when nothing is recognised.
    """

    def at(offset: int, magic: bytes) -> bool:
        return head[offset : offset + len(magic)] == magic

    def u32(offset: int) -> int:
        return struct.unpack_from("<I", head, offset)[0] if len(head) >= offset + 4 else 0

    if at(0, b"LUKS\xba\xbe"):
        return "LUKS encrypted volume"
    if at(0, b"XFSB"):
        return "XFS file system"
    if at(1080, b"\x53\xef"):  # the ext2/3/4 superblock (at 1024) magic 0xEF53, little-endian
        if u32(1024 + 0x60) & _EXT4_INCOMPAT:
            return "ext4 file system"
        return "ext3 file system" if u32(1024 + 0x5C) & _EXT_COMPAT_HAS_JOURNAL else "ext2 file system"
    if at(4086, b"SWAPSPACE2") or at(4086, b"SWAP-SPACE"):
        return "Linux swap"
    if at(512, b"EFI PART"):  # before MBR: a GPT disk has a protective MBR too
        return "GPT partition table"
    if at(3, b"NTFS    "):
        return "NTFS file system"
    if at(3, b"EXFAT   "):
        return "exFAT file system"
    if at(510, b"\x55\xaa"):
        for offset in (82, 54):  # the FAT32 and the FAT12/16 boot sector's file system type
            if at(offset, b"FAT"):
                kind = head[offset : offset + 8].decode("ascii", "replace").strip()
                return f"{kind if kind[3:].isdigit() else 'FAT'} file system"
        return "MBR partition table"
    return "data"


def existing_data(path: str) -> ExistingData | None:
    """What copying a disk into `path` would overwrite, or None when nothing would be lost.

    Nothing: `path` is missing, an empty file, or a sparse file without any
    data yet (as `truncate -s` makes one). Anything else: a file that holds
    data, or a block device, whatever it holds. Something that is neither (a
    directory) is None here: opening it refuses it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    block = stat.S_ISBLK(st.st_mode)
    if not block and not (stat.S_ISREG(st.st_mode) and st.st_size > 0):
        return None
    what = "block device" if block else "file"
    size: int | None = None if block else st.st_size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return ExistingData(path, what, size, f"unreadable: {exc.strerror}")
    try:
        if block:
            size = os.lseek(fd, 0, os.SEEK_END)
        elif not _holds_data(fd):
            return None
        signature = disk_signature(os.pread(fd, SIGNATURE_BYTES, 0))
    except OSError as exc:
        signature = f"unreadable: {exc.strerror}"
    finally:
        os.close(fd)
    return ExistingData(path, what, size, signature)


_EXTENT_CALLS = 4096  # block status replies walked before an export counts as holding data


def export_data(backend: Backend, name: str) -> ExistingData | None:
    """What copying a disk into another server's export would overwrite, or None when it is all zeros.

    The export's block status says where it holds data (nbdkit and qemu-nbd report it, so a
    fresh `nbdkit memory` export is switched to without asking). An export without block
    status cannot be asked cheaply: it counts as holding data, as a block device does.
    """
    size = backend.size
    if size == 0:
        return None
    if backend.caps.extents:
        offset = 0
        for _ in range(_EXTENT_CALLS):
            if offset >= size:
                return None
            runs = backend.extents(offset, min(size - offset, 1 << 30))
            if any(not flags & c.STATE_ZERO for _, flags in runs):
                break
            offset += sum(length for length, _ in runs) or size
    try:
        signature = disk_signature(bytes(backend.read(0, min(SIGNATURE_BYTES, size))))
    except (OSError, BackendError) as exc:
        signature = f"unreadable: {exc}"
    if not backend.caps.extents:
        signature += "; no block status to tell whether it holds data"
    return ExistingData(name, "NBD export", size, signature)


def _holds_data(fd: int) -> bool:
    """False only when the file system says the file has no data at all (all holes)."""
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno != errno.ENXIO  # ENXIO: no data past 0; anything else: cannot tell, so assume data
    return True


@dataclass(frozen=True)
class PowerCut:
    """One power cut, as the lab marks it: the requests it threw away and the bytes they wrote."""

    time: float  # wall clock
    requests: frozenset[int]  # numbers (seq) of the lost requests telemetry still holds
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of every lost write


_LOST_CMDS = frozenset({c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES})
_CLOCK_SLACK = 2e-6  # seconds: wall times of records are perf_counter + an offset, rounded


def lost_requests(records: list[tuple], lost: list[LostWrite], clock_offset: float) -> list[int]:
    """The numbers of the recorded requests whose writes `lost` names, in the order recorded.

    A lost write is the request with its offset and length that was being served
    (between arrival and reply) when the cache took it. `records` are telemetry's
    ring tuples (RequestRecord's fields).
    """
    if not lost:
        return []
    taken: dict[tuple[int, int], list[float]] = {}
    for write in lost:
        taken.setdefault((write.offset, write.length), []).append(write.at)
    seqs = []
    for seq, wall, cmd, flags, offset, length, latency, error, *_ in records:
        times = taken.get((offset, length))
        if times is None or error or cmd not in _LOST_CMDS or flags & c.CMD_FLAG_FUA:
            continue
        start = wall - clock_offset
        if any(start - _CLOCK_SLACK <= at <= start + latency + _CLOCK_SLACK for at in times):
            seqs.append(seq)
    return seqs


def filter_info(layer: Layer) -> FilterInfo:
    return FilterInfo(id=layer.id, name=layer.name, spec=layer.spec, enabled=layer.enabled, stats=layer.filter.stats())


def copy_contents(src: Backend, dst: Backend, *, fresh: bool, progress: SwitchProgress | None = None) -> int:
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
                    progress.copied = copied
        pos = end
        if progress is not None:
            progress.position = pos
    dst.flush()
    return copied


class Restacker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stack: Stack = engine.stack
        self._lock = threading.RLock()  # one change to the stack at a time
        self.switching: SwitchProgress | None = None  # a switch copying the disk, while it does
        self.last_cut: PowerCut | None = None  # the last power cut (the lab marks its lost requests)

    @property
    def base(self) -> Backend:
        return self.stack.base

    @property
    def layers(self) -> list[Layer]:
        """Bottom (nearest the backend) first."""
        return list(self.stack.layers)

    def _event(self, message: str) -> None:
        self.engine.telemetry.event(message)
        log.info("%s", message)

    def _quiesced(self, what: str) -> _Quiesce:
        return _Quiesce(self.engine, what)

    # -- filters ---------------------------------------------------------------------------
    def add_filter(self, spec: str | Filter, position: int | str | None = None) -> FilterInfo:
        """Stack a filter (a spec, or a made filter) on top, or at `position` (0 = lowest).

        A bad spec raises `registry.FilterSpecError`, whose front end words where it came from.
        A cache added while the power is off is off too: the disk stays dark until poweron.
        """
        with self._lock:
            new = registry.parse_filter_spec(spec, self.engine.size) if isinstance(spec, str) else spec
            index = None if position is None else self.stack._position(position)
            with self._quiesced(f"add filter {new.spec}"):
                if isinstance(new, CacheFilter) and self.powered_off:
                    new.power_off()
                layer = self.stack.add(new, index)
        self._event(f"filter {layer.id} added: {layer.spec}")
        return filter_info(layer)

    def remove_filter(self, ref: int | str) -> FilterInfo:
        with self._lock:
            layer = self.stack.find(ref)
            with self._quiesced(f"remove filter {layer.spec}"):
                if layer.enabled:
                    layer.filter.detach()  # a cache writes back before it goes
                self.stack.remove(layer)
        self._event(f"filter {layer.id} removed: {layer.spec}")
        return filter_info(layer)

    def remove_all_filters(self) -> Removed:
        """`filter rm all`: every filter, top first, each as `remove_filter` would (a cache writes back)."""
        with self._lock:
            return Removed([self.remove_filter(layer.id).id for layer in reversed(self.stack.layers)])

    def set_filter_enabled(self, ref: int | str, enabled: bool) -> FilterInfo:
        with self._lock:
            layer = self.stack.find(ref)
            if layer.enabled != bool(enabled):
                with self._quiesced(f"{'enable' if enabled else 'disable'} filter {layer.spec}"):
                    if layer.enabled:
                        layer.filter.detach()
                    self.stack.set_enabled(layer, bool(enabled))
        self._event(f"filter {layer.id} {'enabled' if enabled else 'disabled'}: {layer.spec}")
        return filter_info(layer)

    def toggle_filter(self, ref: int | str) -> FilterInfo:
        with self._lock:
            return self.set_filter_enabled(ref, not self.stack.find(ref).enabled)

    def list_filters(self) -> list[FilterInfo]:
        """Bottom (nearest the backend) first."""
        return [filter_info(layer) for layer in list(self.stack.layers)]

    # -- the base backend ------------------------------------------------------------------
    def switch_backend(
        self,
        kind: str,
        path: str | None = None,
        *,
        size: int | str | None = None,
        copy: bool = True,
        overwrite: bool = False,
    ) -> SwitchResult:
        """Replace the base backend live, under the filters; by default copy the disk into it.

        `kind`: ram, file (alias lo), null, plugin (path FILE[:CLASS]), cow (over
        the current backend, or over `path`). A target smaller than the disk is
        refused; so is copying into null (which keeps nothing), and copying into
        a file that holds data or into a block device, unless `overwrite`.
        An empty file is made the disk's size.
        """
        kind = registry.switch_kind(kind)
        if size is not None and not isinstance(size, int):
            size = parse_size(str(size))
        with self._lock:
            old = self.stack.base
            current = self.engine.size
            if kind == "cow" and not path:
                return self._cow_over_current(old, size)
            if kind == "null" and copy:
                raise SteeringError(
                    "null keeps no data: switching to it would lose the disk's contents; add --no-copy if you mean it"
                )
            existing = None
            emptied = None
            if kind == "file" and path:
                if copy and not overwrite:
                    existing = existing_data(path)
                if size is None and _empty_file(path):
                    size = current  # as a missing file would be made (and emptied again if the switch fails)
                    emptied = path
            new, created = registry.open_switch_target(kind, path, size, current, old)
            started = time.monotonic()
            try:
                if kind == "nbd" and copy and not overwrite:  # what the export holds: ask it, now it is open
                    existing = export_data(new, path or "")
                if new.size < current:
                    raise SteeringError(
                        f"the new {kind} backend is {human_bytes(new.size)} ({new.size} bytes), smaller than the "
                        f"disk's {human_bytes(current)}: the data would not fit; nothing changed"
                    )
                if new.readonly:
                    raise SteeringError(f"{new.describe()} is read-only: it cannot hold a live disk")
                if existing is not None:
                    raise SteeringError(existing.refusal())
                copied = 0
                with self._quiesced(f"switch to {kind}"):
                    if copy:
                        self.switching = SwitchProgress(to=new.describe(), total=current)
                        try:
                            copied = copy_contents(old, new, fresh=created, progress=self.switching)
                        except (OSError, BackendError) as exc:
                            raise SteeringError(
                                f"copying the disk into {new.describe()} failed ({exc}); nothing changed"
                            ) from None
                        finally:
                            self.switching = None
                    self.stack.replace_base(new)
                    if new.size != current:
                        self.engine.telemetry.resize(new.size)
            except BaseException:
                _close_quietly(new)
                if created and path:
                    _unlink_quietly(path)
                elif emptied:
                    _truncate_quietly(emptied)
                raise
        seconds = time.monotonic() - started
        self._retire(old)
        how = f"copied {human_bytes(copied)} in {seconds:.2f} s" if copy else "contents not copied"
        if new.size != current:
            how += f"; the disk grew from {human_bytes(current)} to {human_bytes(new.size)} for new clients"
        self._event(f"switched backend: {old.describe()} -> {new.describe()} ({how})")
        return SwitchResult(
            from_=old.describe(),
            to=new.describe(),
            kind=kind,
            size=new.size,
            copied_bytes=copied,
            seconds=round(seconds, 3),
            grew_from=current if new.size != current else None,
        )

    def _cow_over_current(self, old: Backend, size: int | None) -> SwitchResult:
        if isinstance(old, CowBackend):
            raise SteeringError("the backend is cow already: commit or discard its changes, or switch to another")
        if size is not None and size != old.size:
            raise SteeringError("a cow overlay over the current backend keeps its size: drop --size")
        with self._quiesced("switch to cow"):
            new = registry.overlay(old)
            self.stack.replace_base(new)
        self._event(f"switched backend: copy-on-write overlay over {old.describe()} (changes kept in memory)")
        return SwitchResult(from_=old.describe(), to=new.describe(), kind="cow", size=old.size, copied_bytes=0)

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
    @property
    def powered_off(self) -> bool:
        """A power cut happened and no poweron since: every request fails with EIO."""
        return any(f.powered_off for f in self._caches())

    def _caches(self) -> list[CacheFilter]:
        return self.stack.enabled(CacheFilter)  # type: ignore[return-value]

    def powercut(self) -> PowercutResult:
        """A crash: throw away every write the cache filter(s) hold that no FLUSH has sent
        down, and fail every request with EIO from now on, until `poweron`."""
        with self._lock:
            caches = self._caches()
            if not caches:
                raise SteeringError(
                    "no cache filter to lose writes from: add one with `filter add cache` "
                    "(without it every acknowledged write is already in the backend)"
                )
            if self.powered_off:
                raise SteeringError("the power is off already: `poweron` first")
            with self._quiesced("power cut"):
                lost = 0
                writes: list[LostWrite] = []
                count = 0
                for cache in caches:
                    lost += cache.powercut()
                    writes += cache.last_lost
                    count += cache.last_lost_count
                    cache.power_off()
            telemetry = self.engine.telemetry
            telemetry.settle()  # every request the cache took is recorded by now
            seqs = lost_requests(list(telemetry.ring), writes, telemetry.clock_offset)
            self.last_cut = PowerCut(time.time(), frozenset(seqs), [(w.offset, w.length) for w in writes])
        writes_text = f"{count:,} write{'s' if count != 1 else ''}"
        self._event(
            f"POWER CUT: {human_bytes(lost)} of writes since the last FLUSH lost ({writes_text}); "
            "every request fails with EIO until poweron"
        )
        return PowercutResult(lost_bytes=lost, lost_writes=count, lost_requests=seqs)

    def poweron(self) -> PoweronResult:
        """The power back after a power cut: the cache filters serve again, empty (what was
        lost stays lost), as a disk does when it boots after a crash."""
        with self._lock:
            off = [f for f in self._caches() if f.powered_off]
            if not off:
                raise SteeringError("the power is on: nothing to switch on (`powercut` cuts it, with a cache filter)")
            seconds, refused = 0.0, 0
            for cache in off:
                was_off, failed = cache.power_on()
                seconds = max(seconds, was_off)
                refused += failed
        self._event(
            f"POWER ON after {seconds:.1f} s off ({refused:,} request{'s' if refused != 1 else ''} failed meanwhile): "
            "serving again"
        )
        return PoweronResult(off_seconds=round(seconds, 3), refused=refused)

    def _cow(self) -> CowBackend:
        base = self.stack.base
        if not isinstance(base, CowBackend):
            raise SteeringError(
                f"the backend is {base.kind}, not cow: `switch cow` puts a copy-on-write overlay over it"
            )
        return base

    def cow_commit(self) -> CowCommitResult:
        with self._lock:
            cow = self._cow()
            with self._quiesced("cow commit"):
                written = cow.commit()
        self._event(f"cow commit: {human_bytes(written)} of changes written into {cow.base.describe()}")
        return CowCommitResult(committed_bytes=written)

    def cow_discard(self) -> CowDiscardResult:
        with self._lock:
            cow = self._cow()
            with self._quiesced("cow discard"):
                dropped = cow.discard()
        self._event(f"cow discard: {human_bytes(dropped)} of changes thrown away")
        return CowDiscardResult(discarded_bytes=dropped)

    def cow_changed_bytes(self) -> int | None:
        base = self.stack.base
        return base.changed_bytes() if isinstance(base, CowBackend) else None


def _empty_file(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _close_quietly(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:  # noqa: BLE001
        pass


def _truncate_quietly(path: str) -> None:
    try:
        os.truncate(path, 0)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
        return self._cm.__exit__(*exc)  # type: ignore[arg-type]
