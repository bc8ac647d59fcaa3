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

BACK_TO_BACK = 0.002  # seconds between arrivals for pieces of one split I/O
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
    split = _split(chain, max_request)
    if split:
        return split
    if chain[0].cmd == c.CMD_READ and len(chain) >= MIN_READAHEAD_RUN:
        sizes = [r.length for r in chain]
        if all(b >= a for a, b in zip(sizes, sizes[1:])) and sizes[-1] > sizes[0]:
            return [_run("readahead", chain)]
    return []


def _split(chain: list[RequestRecord], max_request: int | None) -> list[Run]:
    """The back-to-back groups of a contiguous chain whose pieces are all full size (but the last)."""
    runs = []
    group: list[RequestRecord] = []
    for record in chain:
        if group and (record.time - group[-1].time > BACK_TO_BACK or not _full(group[-1], group[0], max_request)):
            if len(group) >= 2:
                runs.append(_run("split", group))
            group = []
        group.append(record)
    if len(group) >= 2 and _full(group[0], group[0], max_request):
        runs.append(_run("split", group))
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
