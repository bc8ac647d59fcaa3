"""Every request labelled with what it touches ("ext4 group 3 inode bitmap", "jbd2 commit, ...").

The serving threads never label anything: a Labeller thread wakes a few times a second,
takes the requests finished since its last pass from the telemetry ring, looks each one up in
the disk's map (buselab.fsmap, about a microsecond a lookup) and counts requests and bytes per
kind of structure. Writes that touch what the map was read from (a superblock, a descriptor,
a directory, a journal commit, the first 64 KiB of a disk that holds nothing known yet) make it
read the disk again, once they have settled (RefreshTimer), through the same stack the clients
see. A built map is never changed, only replaced, so readers need no lock.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict

from ..fsmap import FsMap, Label, RefreshTimer, build_map
from ..protocol import constants as c
from .engine import Engine
from .telemetry import RequestRecord

log = logging.getLogger("buselab")

PASS_INTERVAL = 0.25  # seconds between passes over the new records
LABELS_KEPT = 20000  # labels of the most recent requests (the telemetry ring's size)
_WRITES = (c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM)
_DATA_WRITES = (c.CMD_WRITE, c.CMD_WRITE_ZEROES)  # what fills free blocks (a TRIM empties them)
_VAGUE = ("unknown", "free")  # labels a later map may know better (see _relabel_unknown)
# A write into blocks the map calls free is a new allocation whose bitmap (or FAT) has not
# reached the disk yet: ext4 logs the bitmap in the journal and writes it home only at the
# checkpoint, minutes later. "group 0 free blocks" on a file's data would mislead a class.
_NEWLY_ALLOCATED = (
    (" free blocks", " blocks newly allocated (free in the bitmap on disk)"),
    (" free clusters", " clusters newly allocated (free in the FAT on disk)"),
)


def as_written(label: Label, cmd: int) -> Label:
    """`label` for request `cmd`: free blocks that a WRITE fills are newly allocated ones."""
    if label.kind == "free" and cmd in _DATA_WRITES:
        for free, new in _NEWLY_ALLOCATED:
            if label.text.endswith(free):
                return label._replace(text=label.text[: -len(free)] + new)
    return label


_READS = (c.CMD_READ, c.CMD_CACHE)
_LABELLED = (c.CMD_READ, c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM, c.CMD_CACHE)


class Labeller:
    def __init__(self, engine: Engine, *, interval: float = PASS_INTERVAL) -> None:
        self.engine = engine
        self.interval = interval
        self.map: FsMap | None = None  # replaced whole, never changed
        self.builds = 0  # maps built so far (the first included)
        self.structures: dict[str, list[int]] = {}  # kind -> [requests, bytes] since the start
        self.missed = 0  # requests that left the ring before a pass saw them (not counted)
        self._labels: OrderedDict[int, Label] = OrderedDict()
        self._last_seq = 0
        self._timer = RefreshTimer()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buselab-labels", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        self.rebuild()
        while not self._stop.wait(self.interval):
            try:
                self.run_pass()
            except Exception:  # noqa: BLE001 - labels are an explanation; serving goes on without them
                log.exception("labelling requests failed")

    def run_pass(self, now: float | None = None) -> None:
        """Label what finished since the last pass; rebuild the map if its metadata changed."""
        now = time.monotonic() if now is None else now
        records = self.engine.telemetry.recent(self._last_seq)
        if records:
            if self._last_seq and records[0].seq > self._last_seq + 1:
                self.missed += records[0].seq - self._last_seq - 1
            self._label(records, now)
            self._last_seq = max(self._last_seq, records[-1].seq)
        if self._timer.due(now):
            self.rebuild(now)

    def rebuild(self, started: float | None = None) -> None:
        """Read the disk's map again (through the stack the clients see)."""
        started = time.monotonic() if started is None else started
        if any(getattr(f, "powered_off", False) for f in self.engine.stack.enabled()):
            # A dark disk: reading it would only count as a request refused during the power
            # cut (poweron reports how many clients lost). The map waits for power on.
            self._timer.note(started)
            return
        top = self.engine.stack.top
        size = self.engine.size

        def read(offset: int, length: int) -> bytes:
            return bytes(top.read(offset, length))

        try:
            fsmap = build_map(read, size)
        except Exception as exc:  # noqa: BLE001 - a disk we cannot read now (power cut, error filter)
            log.debug("no disk map: %s", exc)
            self._timer.done(started)
            return
        self.map = fsmap
        self.builds += 1
        self._timer.done(started)
        if fsmap.filesystems or fsmap.table:
            self._relabel_unknown(fsmap)

    def _relabel_unknown(self, fsmap: FsMap) -> None:
        """Label again, with a map that knows more, the recent requests that created what it knows.

        mkfs writes a file system before any map can know it, and a new file's data lands in
        blocks the map still calls free: those writes were labelled "unknown" or "free". Once
        the map is read again they say what they wrote ("ext4 group 3 inode bitmap", "data of
        /hello.txt"). So do the reads of bytes that nothing wrote after them: they read what
        the new map describes (mount, right after mkfs, reads the new superblock before the map
        is read again). A read of bytes written after it (blkid before mkfs) read something
        else, and keeps its label; so does any label that said something already.
        """
        labels = self._labels
        counts = self.structures
        written_after = _Ranges()
        for record in reversed(self.engine.telemetry.recent()):  # newest first: what came after
            label = labels.get(record.seq)
            end = record.offset + record.length
            if record.cmd in _DATA_WRITES:
                if not record.error:
                    written_after.add(record.offset, end)
            elif record.cmd not in _READS or written_after.overlaps(record.offset, end):
                continue
            if label is None or label.kind not in _VAGUE:
                continue
            new = as_written(fsmap.label(record.offset, record.length, record.preview), record.cmd)
            if new.kind == "unknown" or new.kind == label.kind:
                continue
            labels[record.seq] = new
            old = counts.get(label.kind)
            if old is not None:
                old[0] -= 1
                old[1] -= record.length
                if old[0] <= 0:
                    del counts[label.kind]
            entry = counts.setdefault(new.kind, [0, 0])
            entry[0] += 1
            entry[1] += record.length

    # -- reading -----------------------------------------------------------------
    def label(self, seq: int) -> Label | None:
        """The label of a recent request, by its seq (None: not labelled yet, or too old)."""
        return self._labels.get(seq)

    def label_of(self, record: RequestRecord) -> Label | None:
        """A record's label, looked up now if no pass has seen it yet."""
        label = self._labels.get(record.seq)
        if label is None and self.map is not None and record.cmd in _LABELLED:
            label = as_written(self.map.label(record.offset, record.length, record.preview), record.cmd)
        return label

    def structures_json(self) -> dict[str, dict[str, int]]:
        return {kind: {"requests": n, "bytes": b} for kind, (n, b) in sorted(self.structures.items())}

    # -- a pass ------------------------------------------------------------------
    def _label(self, records: list[RequestRecord], now: float) -> None:
        fsmap = self.map
        labels = self._labels
        counts = self.structures
        noted = False
        for record in records:
            if record.cmd not in _LABELLED:
                continue
            if fsmap is None:
                label = Label("not mapped", "unknown")
            else:
                label = as_written(fsmap.label(record.offset, record.length, record.preview), record.cmd)
                if (
                    not noted
                    and not record.error
                    and record.cmd in _WRITES
                    and fsmap.needs_refresh(record.offset, record.length, record.preview)
                ):
                    self._timer.note(now)
                    noted = True  # once a pass is enough for the timer
            labels[record.seq] = label
            entry = counts.get(label.kind)
            if entry is None:
                counts[label.kind] = [1, record.length]
            else:
                entry[0] += 1
                entry[1] += record.length
        if fsmap is None and any(r.cmd in _WRITES and not r.error for r in records):
            self._timer.note(now)  # something is being written: it may be a file system
        while len(labels) > LABELS_KEPT:
            labels.popitem(last=False)


class _Ranges:
    """Byte ranges, merged as they are added (a sequential writer keeps one): which were written."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)  # the first range that ends at or after start
        j = bisect.bisect_right(self.starts, end)  # past the last range that begins by end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.ends, start)  # the first range that ends after start
        return i < len(self.starts) and self.starts[i] < end
