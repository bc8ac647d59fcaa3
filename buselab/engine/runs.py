"""Runs of requests that tell a story the single requests do not: splitting and readahead.

A server sees requests, not the application's I/O. Two patterns explain most of the gap:

* **Splitting.** The kernel cuts an I/O bigger than the queue's `max_sectors_kb` into pieces
  of that size and sends them back to back: a 1 MiB direct write reaches buselab as 8 writes
  of 128 KiB, each continuing the last.
* **Readahead.** A file read sequentially makes the page cache read ahead in windows that
  grow (4 KiB, 16 KiB, 32 KiB, ... up to `read_ahead_kb`): sequential READs whose size grows.

`find_runs` finds both in a list of finished requests (the telemetry ring's records, in seq
order). It is pure and runs off the serve path, when the lab or `ctl status` asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..protocol import constants as c
from .telemetry import RequestRecord

# Seconds from one piece's answer to the next piece's arrival, for pieces of one split I/O. The
# kernel sends all the pieces at once, so each is read as soon as buselab is done with the ones
# before: microseconds on a real machine; under software emulation (the VM's classroom test) a
# 1 MiB write came in batches of 2 or 3 pieces up to 18 ms apart. An application's next I/O of
# the same size, right after (dd bs=1M count=4), comes as quickly and looks like more pieces of
# the same one: no server can tell them apart. A pause longer than this one can.
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

    def describe(self) -> str:
        """One line for the stream and the inspector."""
        if self.kind == "split":
            piece = self.sizes[0]
            pieces = f"{len(self.sizes)} × {_size(piece)}"
            if self.sizes[-1] != piece:
                pieces = f"{len(self.sizes) - 1} × {_size(piece)} + {_size(self.sizes[-1])}"
            return f"one {_size(self.length)} {self.op}, split by the kernel into {pieces}"
        windows = " → ".join(_size(n) for n in _distinct_in_order(self.sizes))
        return f"readahead: {len(self.sizes)} sequential READs, window {windows}"


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


def runs_by_seq(runs: Iterable[Run]) -> dict[int, Run]:
    """Each request's run, to annotate the stream's rows."""
    return {seq: run for run in runs for seq in run.seqs}


def _continues(prev: RequestRecord, record: RequestRecord) -> bool:
    return record.offset == prev.offset + prev.length


def _classify(chain: list[RequestRecord], max_request: int | None) -> list[Run]:
    if len(chain) < 2:
        return []
    # Readahead first: once its window reaches read_ahead_kb, it sends READs of the queue's
    # max size back to back, which would otherwise pass for the pieces of one split read.
    ahead = _readahead(chain) if chain[0].cmd == c.CMD_READ else 0
    if ahead:
        return [_run("readahead", chain[:ahead]), *_classify(chain[ahead:], max_request)]
    return _split(chain, max_request)


def _readahead(chain: list[RequestRecord]) -> int:
    """How many requests at the start of `chain` are a readahead run (0: none).

    The windows never shrink and do grow; the last request may be smaller (the file ended).
    """
    n = 1
    while n < len(chain) and chain[n].length >= chain[n - 1].length:
        n += 1
    if n < MIN_READAHEAD_RUN or chain[n - 1].length <= chain[0].length:
        return 0
    return n + 1 if n == len(chain) - 1 else n


def _split(chain: list[RequestRecord], max_request: int | None) -> list[Run]:
    """The back-to-back groups of a contiguous chain whose pieces are all full size (but the last)."""
    runs = []
    group: list[RequestRecord] = []
    for record in chain:
        if group and (_waited(group[-1], record) > BACK_TO_BACK or not _full(group[-1], group[0], max_request)):
            if len(group) >= 2:
                runs.append(_run("split", group))
            group = []
        group.append(record)
    if len(group) >= 2 and _full(group[0], group[0], max_request):
        runs.append(_run("split", group))
    return runs


def _waited(prev: RequestRecord, record: RequestRecord) -> float:
    """How long after `prev` was answered `record` arrived (negative: it came while prev ran).

    From the answer, not the arrival: a slow backend (a delay filter) answers each piece late,
    and the next one, already sent, is read only then.
    """
    return record.time - (prev.time + prev.latency)


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
