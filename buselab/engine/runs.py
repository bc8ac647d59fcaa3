"""Runs of requests that tell a story the single requests do not: splitting and readahead.

A server sees requests, not the application's I/O. Two patterns explain most of the gap:

* **Splitting.** The kernel cuts an I/O bigger than the queue's `max_sectors_kb` into pieces
  of that size and sends them back to back: a 1 MiB direct write reaches buselab as 8 writes
  of 128 KiB, each continuing the last.
* **Readahead.** A file read sequentially makes the page cache read ahead in windows that
  grow (4 KiB, 16 KiB, 32 KiB, ... up to `read_ahead_kb`): sequential READs whose size grows.

`find_runs` finds both in a list of finished requests (the telemetry ring's records, in seq
order). It is pure and runs off the serve path, when the lab or `ctl status` asks.
`RunTracker` keeps the runs of the requests the lab has shown current, tick by tick, over the
records the lab already has (the lab's tick, never a serving thread).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..protocol import constants as c
from .telemetry import RequestRecord

# Seconds: a piece of one split I/O arrives this soon after the last, or after its answer. The
# kernel sends the pieces together, but under software emulation (the classroom VM test) a 1 MiB
# write came in batches of 1 to 3 pieces, the next batch up to 18 ms after the last answer. Same-
# size sequential I/Os with no pause between them (dd bs=1M count=4) look like one I/O anyway.
BACK_TO_BACK = 0.050
MIN_SPLIT_PIECE = 64 << 10  # without the queue's limit, only pieces this big count as split
MIN_READAHEAD_RUN = 3  # requests: fewer cannot show a growing window


@dataclass(frozen=True)
class Run:
    """Consecutive requests of one connection that belong together."""

    kind: str  # "split" or "readahead"
    cmd: int
    seqs: tuple[int, ...]
    offset: int
    sizes: tuple[int, ...]

    @property
    def length(self) -> int:
        return sum(self.sizes)

    @property
    def op(self) -> str:
        return c.CMD_NAMES.get(self.cmd, f"CMD{self.cmd}")

    def part(self, seq: int) -> str:
        """Where request `seq` sits in the run, for the inspector: "part 3 of 8 of one 1 MiB WRITE, ..."."""
        where = f"{self.seqs.index(seq) + 1} of {len(self.seqs)}"
        if self.kind == "split":
            return f"part {where} of {self.describe()}"
        return f"READ {where} of a readahead run, window {self.windows()}"

    def brief(self) -> str:
        """The same, short, for a narrow column: "1M WRITE split 8×128K", "readahead 6 READs 4K→128K"."""
        if self.kind == "split":
            piece, last = self.sizes[0], self.sizes[-1]
            n = len(self.sizes)
            pieces = f"{n}×{_short(piece)}" if last == piece else f"{n - 1}×{_short(piece)}+{_short(last)}"
            return f"{_short(self.length)} {self.op} split {pieces}"
        sizes = _distinct_in_order(self.sizes)
        return f"readahead {len(self.sizes)} READs {_short(sizes[0])}→{_short(sizes[-1])}"

    def windows(self) -> str:
        """The readahead window's sizes as it grew: "4 KiB → 16 KiB → 32 KiB"."""
        return " → ".join(_size(n) for n in _distinct_in_order(self.sizes))

    def describe(self) -> str:
        """One line for the stream and the inspector."""
        if self.kind == "split":
            piece = self.sizes[0]
            pieces = f"{len(self.sizes)} × {_size(piece)}"
            if self.sizes[-1] != piece:
                pieces = f"{len(self.sizes) - 1} × {_size(piece)} + {_size(self.sizes[-1])}"
            return f"one {_size(self.length)} {self.op}, split by the kernel into {pieces}"
        return f"readahead: {len(self.sizes)} sequential READs, window {self.windows()}"


def find_runs(records: Sequence[RequestRecord], max_request: int | None = None) -> list[Run]:
    """Split I/Os and readahead runs among `records` (oldest first).

    `max_request` is the queue's max_sectors_kb in bytes when buselab knows it (a kernel
    device); pieces of a split I/O are then exactly that size. Without it, a run of
    back-to-back contiguous requests of one size of at least MIN_SPLIT_PIECE counts.
    """
    runs: list[Run] = []
    last: dict[tuple[int, int], list[RequestRecord]] = {}  # (connection, cmd) -> the open chain
    for record in records:
        if record.error or record.cmd not in (c.CMD_READ, c.CMD_WRITE):
            continue
        key = (record.conn, record.cmd)
        chain = last.get(key)
        if chain and _continues(chain[-1], record):
            chain.append(record)
        else:
            if chain:
                runs.extend(_classify(chain, max_request))
            last[key] = [record]
    for chain in last.values():
        runs.extend(_classify(chain, max_request))
    runs.sort(key=lambda run: run.seqs[0])
    return runs


class RunTracker:
    """Which run each recent request belongs to, as the lab's ticks hand over new records.

    Every `add` looks again at the last `window` requests (and back to the start of a run they
    cut into, at most `reach` requests back) together with the new ones, so a run that straddles
    ticks is found whole and a run that grows (readahead going on) is replaced by the longer one.
    A run longer than `reach` (a long streaming read) goes on as a new run. Cost: one `find_runs`
    over a few hundred records per tick that brought requests (0.6-1.2 ms at 250 records a tick,
    the most the lab shows); nothing per request on a serving thread.
    """

    def __init__(self, *, window: int = 64, reach: int = 512, keep: int = 4096) -> None:
        self.window = window
        self.reach = reach
        self.max_request: int | None = None  # the queue's max_sectors_kb in bytes, when known
        self._recent: deque[RequestRecord] = deque(maxlen=keep)
        self._by_seq: dict[int, Run] = {}
        self.seen = False  # some run was found (the stream then makes room to say what runs were)

    def run_of(self, seq: int) -> Run | None:
        return self._by_seq.get(seq)

    def add(self, records: Iterable[RequestRecord], *, after_gap: bool = False) -> set[int]:
        """Take one tick's records; the seqs whose run changed (their rows are drawn again).

        `after_gap`: requests were left out before these (the lab's "+N more" row): no run
        reaches across what was not seen.
        """
        new = [r for r in records if r.__class__ is RequestRecord and r.cmd in _RUN_CMDS and not r.error]
        if not new:
            return set()
        recent = self._recent
        start = len(recent) if after_gap else max(0, len(recent) - self.window)
        if start < len(recent):
            cut = self._by_seq.get(recent[start].seq)
            furthest = max(0, len(recent) - self.reach)
            while cut is not None and start > furthest and recent[start - 1].seq >= cut.seqs[0]:
                start -= 1  # back to the first request of the run the window would cut
        looked = [recent[i] for i in range(start, len(recent))]
        recent.extend(new)
        looked.extend(new)
        by_seq = self._by_seq
        before = {r.seq: by_seq.pop(r.seq, None) for r in looked}
        changed: set[int] = set()
        for run in find_runs(looked, self.max_request):
            self.seen = True
            old = before.get(run.seqs[0])
            if old is None or old.kind != run.kind or old.seqs[0] != run.seqs[0] or old.seqs[-1] != run.seqs[-1]:
                # A row shows its bracket (┌ │ └) and the last one the story: those are what changed.
                changed.update(run.seqs[0:1] + run.seqs[-1:])
                if old is not None:
                    changed.update(old.seqs[0:1] + old.seqs[-1:])
                    changed.update(seq for seq in run.seqs if before.get(seq) is None)
                else:
                    changed.update(run.seqs)
            for seq in run.seqs:
                by_seq[seq] = run
        changed.update(seq for seq, old in before.items() if old is not None and seq not in by_seq)
        if len(by_seq) > 2 * (recent.maxlen or 0):
            oldest = recent[0].seq
            self._by_seq = {seq: run for seq, run in by_seq.items() if seq >= oldest}
        return changed

    def clear(self) -> None:
        self._recent.clear()
        self._by_seq.clear()


_RUN_CMDS = (c.CMD_READ, c.CMD_WRITE)


def runs_by_seq(runs: Iterable[Run]) -> dict[int, Run]:
    """Each request's run, to annotate the stream's rows."""
    return {seq: run for run in runs for seq in run.seqs}


def _continues(prev: RequestRecord, record: RequestRecord) -> bool:
    return record.offset == prev.offset + prev.length


def _classify(chain: list[RequestRecord], max_request: int | None) -> list[Run]:
    """A contiguous chain's runs: for READs readahead first (a window that grew, then stays at
    its largest, is readahead, not a split), then splits among the rest."""
    if len(chain) < 2:
        return []
    if chain[0].cmd != c.CMD_READ:
        return _split(chain, max_request)
    runs = _readahead(chain)
    if not runs:
        return _split(chain, max_request)
    taken = {seq for run in runs for seq in run.seqs}
    rest: list[RequestRecord] = []
    for record in chain + [None]:  # type: ignore[list-item]
        if record is None or record.seq in taken:
            if len(rest) >= 2:
                runs.extend(_split(rest, max_request))
            rest = []
        else:
            rest.append(record)
    runs.sort(key=lambda run: run.seqs[0])
    return runs


def _readahead(chain: list[RequestRecord]) -> list[Run]:
    """The stretches of a sequential READ chain whose size never shrinks and grows at least once.

    A smaller read ends a window sequence (the file's end, another reader) and may start the next.
    """
    runs = []
    start = 0
    for i in range(1, len(chain) + 1):
        if i == len(chain) or chain[i].length < chain[i - 1].length:
            stretch = chain[start:i]
            if len(stretch) >= MIN_READAHEAD_RUN and stretch[-1].length > stretch[0].length:
                runs.append(_run("readahead", stretch))
            start = i
    return runs


def _split(chain: list[RequestRecord], max_request: int | None) -> list[Run]:
    """The back-to-back groups of a contiguous chain whose pieces are all full size but the last,
    which is no bigger (what the block layer makes of one I/O bigger than the queue allows)."""
    runs: list[Run] = []
    group: list[RequestRecord] = []

    def close() -> None:
        if len(group) >= 2 and _full(group[0], group[0], max_request) and group[-1].length <= group[0].length:
            runs.append(_run("split", group))

    answered = 0.0  # when the group's last answer went out
    slowest = 0.0  # the group's longest latency: the pace of this disk and this machine now
    for record in chain:
        # Every piece in `group` but its last is full: a piece after one that is not starts anew.
        # The kernel sends the pieces together, but may send the last ones only as earlier ones
        # are answered (the test VM's 6.1, under emulation, sent the 8th of 8 20 ms after the
        # first 7 were answered in 60 ms): a piece that arrives within BACK_TO_BACK, or one
        # latency of the group's, after the last answer still belongs.
        if group:
            allowed = slowest if slowest > BACK_TO_BACK else BACK_TO_BACK
            arrived = record.time
            if (arrived - group[-1].time > allowed and arrived - answered > allowed) or not _full(
                group[-1], group[0], max_request
            ):
                close()
                group = []
        if not group:
            answered = slowest = 0.0
        group.append(record)
        done = record.time + record.latency
        if done > answered:
            answered = done
        if record.latency > slowest:
            slowest = record.latency
    close()
    return runs


def _full(record: RequestRecord, first: RequestRecord, max_request: int | None) -> bool:
    """Is `record` a full-size piece: the queue's limit, or (not knowing it) the group's size?"""
    if max_request:
        return record.length == max_request
    return record.length == first.length and record.length >= MIN_SPLIT_PIECE


def _run(kind: str, group: list[RequestRecord]) -> Run:
    return Run(kind, group[0].cmd, tuple(r.seq for r in group), group[0].offset, tuple(r.length for r in group))


def _distinct_in_order(sizes: Iterable[int]) -> list[int]:
    out: list[int] = []
    for n in sizes:
        if not out or out[-1] != n:
            out.append(n)
    return out


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _short(n: int) -> str:
    """1M, 128K, 512 (the stream's length column's way)."""
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
