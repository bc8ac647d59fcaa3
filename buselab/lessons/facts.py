"""This run's own numbers, for a lesson's explanations ("mkfs wrote the superblock backups at ...").

`facts(...)` turns the requests a checkpoint looked at into a dict of short strings; a lesson's
`explain` text names them in braces. FACTS is the list a lesson may use (docs/lessons.md shows
it), checked when a lesson is loaded. Pure: it reads records and labels, never the disk.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..engine.runs import find_runs
from ..engine.telemetry import RequestRecord, max_overlap
from ..protocol import constants as c
from ..sizes import human_bytes, latency_text

FACTS: dict[str, str] = {
    "count": "how many requests matched the checkpoint's wait",
    "first": "the first matching request: op, size, offset and what it touched",
    "offsets": "byte offsets of the matching requests (the first eight)",
    "blocks": "file-system block numbers of the structures the matching requests wrote (byte offsets where no map)",
    "labels": "the structures the matching requests touched (those the wait names), each once, in order",
    "transactions": "jbd2 transaction ids among the matching requests",
    "held": "the request the checkpoint's breakpoint holds: op, size, offset and what it touches",
    "requests": "requests in the checkpoint's scope",
    "reads": "READs in scope, with their bytes ('12 READs (48.0 KiB)', 'no READ')",
    "writes": "WRITEs in scope, with their bytes",
    "flushes": "FLUSHes in scope ('3 FLUSHes')",
    "fua": "WRITEs with the FUA flag in scope ('1 FUA write')",
    "trims": "TRIMs in scope, with their bytes",
    "structures": "requests per kind of structure written in scope (superblock 2, journal 5, newly allocated 1, ...)",
    "ordering": "the FLUSH before the first FUA write, by request number (a journal commit's order)",
    "runs": "kernel splits and readahead runs found in scope",
    "max_in_flight": "the most requests in flight at once",
    "p50": "median latency in buselab",
    "p99": "99th percentile latency in buselab",
    "iops": "requests a second over the scope",
    "little": "Little's law: requests in flight = requests a second x latency",
    "sequential": "share of READs and WRITEs that continued the one before",
    "errors": "requests that failed, with their errors",
    "max_request": "the largest request size seen",
}

_TRANSACTION = re.compile(r"transaction (\d+)")
_FIRST = 8


def describe(op: str, length: int, offset: int, label: str) -> str:
    text = f"{op} {human_bytes(length)} at byte {offset:,}"
    return f"{text} ({label})" if label else text


def facts(
    scope: Sequence[RequestRecord],
    matched: Sequence[RequestRecord],
    *,
    label: Callable[[RequestRecord], Any],
    focus: Callable[[RequestRecord], list[tuple[str, int | None]]] = lambda record: [],
    held: str = "",
    held_fua: bool = False,
    max_request: int | None = None,
) -> dict[str, str]:
    """The facts of one checkpoint. `label(record)` gives a record's Label (or None);
    `focus(record)` the (label, file-system block) of each structure the checkpoint is about
    that the record touched (the structures its wait names, or all), where the map knows them."""
    out = {name: "–" for name in FACTS}

    def text_of(record: RequestRecord) -> str:
        found = label(record)
        return str(found) if found is not None and found.kind != "unknown" else ""

    out["count"] = str(len(matched))
    if matched:
        first = matched[0]
        # Its own label, or (labelled before the map knew the disk) what the map says is there now.
        what = text_of(first) or ", ".join(dict.fromkeys(text for text, _ in focus(first)))
        out["first"] = describe(first.op, first.length, first.offset, what)
        out["offsets"] = _list([f"{r.offset:,}" for r in matched])
        focused = [item for r in matched for item in focus(r)]
        blocks = list(dict.fromkeys(block for _, block in focused if block is not None))
        out["blocks"] = _list([f"{b:,}" for b in blocks]) if blocks else out["offsets"]
        texts = list(dict.fromkeys(text for text, _ in focused))
        texts = texts or list(dict.fromkeys(filter(None, map(text_of, matched))))
        out["labels"] = _list(texts) if texts else "nothing buselab recognises"
        ids = list(dict.fromkeys(int(m[1]) for t in texts for m in [_TRANSACTION.search(t)] if m))
        out["transactions"] = _list([str(i) for i in ids]) if ids else "–"
    out["held"] = held or "–"
    counts = Counter(r.cmd for r in scope)
    sizes = Counter()
    for r in scope:
        sizes[r.cmd] += r.length
    out["requests"] = f"{len(scope):,}"
    out["reads"] = _counted(counts[c.CMD_READ], "READ", sizes[c.CMD_READ])
    out["writes"] = _counted(counts[c.CMD_WRITE], "WRITE", sizes[c.CMD_WRITE])
    out["flushes"] = _counted(counts[c.CMD_FLUSH], "FLUSH")
    out["fua"] = _counted(sum(1 for r in scope if r.cmd == c.CMD_WRITE and r.flags & c.CMD_FLAG_FUA), "FUA write")
    out["trims"] = _counted(counts[c.CMD_TRIM], "TRIM", sizes[c.CMD_TRIM])
    kinds = Counter()
    for r in scope:
        if r.cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM):
            found = label(r)
            if found is not None:
                # Written "free" blocks are a new file's data (labels.as_written); trimmed ones are free.
                kinds["newly allocated" if found.kind == "free" and r.cmd != c.CMD_TRIM else found.kind] += 1
    out["structures"] = ", ".join(f"{k} {n:,}" for k, n in kinds.most_common()) or "–"
    out["ordering"] = _ordering(scope, text_of, held if held_fua else "")
    runs = find_runs(list(scope), max_request)
    out["runs"] = "; ".join(run.describe() for run in runs[:4]) if runs else "none"
    if scope:
        starts = [r.time for r in scope]
        ends = [r.time + r.latency for r in scope]
        out["max_in_flight"] = str(max_overlap(starts, ends))
        latencies = sorted(r.latency for r in scope)
        p50 = latencies[len(latencies) // 2]
        out["p50"] = latency_text(p50)
        out["p99"] = latency_text(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])
        span = max(ends) - min(starts)
        if span > 0:
            iops = len(scope) / span
            mean = sum(latencies) / len(latencies)
            out["iops"] = f"{iops:,.0f}/s"
            out["little"] = f"{iops:,.0f}/s x {latency_text(mean)} = {iops * mean:.1f} in flight on average"
        data = [r for r in scope if r.cmd in (c.CMD_READ, c.CMD_WRITE)]
        if len(data) > 1:
            seq = sum(1 for a, b in zip(data, data[1:]) if b.offset == a.offset + a.length)
            out["sequential"] = f"{100 * seq / (len(data) - 1):.0f}%"
        failed = Counter(c.ERRNO_NAMES.get(r.error, str(r.error)) for r in scope if r.error)
        out["errors"] = ", ".join(f"{n:,} x {name}" for name, n in failed.most_common()) or "none"
        out["max_request"] = human_bytes(max(r.length for r in scope))
    return out


def _ordering(scope: Sequence[RequestRecord], text_of: Callable[[RequestRecord], str], held_fua: str = "") -> str:
    """'FLUSH #812 came before the FUA WRITE #813 (jbd2 commit, transaction 57)'.

    `held_fua`: a FUA write the lesson holds (not answered, so not among the records): it
    comes after every record in scope.
    """
    last_flush = None
    for r in scope:
        if r.cmd == c.CMD_FLUSH:
            last_flush = r
        elif r.cmd == c.CMD_WRITE and r.flags & c.CMD_FLAG_FUA:
            what = text_of(r)
            fua = f"the FUA WRITE #{r.seq}" + (f" ({what})" if what else "")
            if last_flush is None:
                return f"no FLUSH came before {fua}"
            return f"FLUSH #{last_flush.seq} came before {fua}"
    if held_fua:
        fua = f"the held FUA {held_fua}"
        return f"FLUSH #{last_flush.seq} came before {fua}" if last_flush is not None else f"no FLUSH came before {fua}"
    return "no FUA write" + (f"; the last FLUSH was #{last_flush.seq}" if last_flush is not None else "")


def _counted(n: int, what: str, size: int | None = None) -> str:
    """'3 WRITEs (12.0 KiB)', '1 FLUSH', 'no TRIM'."""
    if n == 0:
        return f"no {what}"
    plural = "es" if what.endswith("SH") else "s"
    text = f"{n:,} {what}{plural if n != 1 else ''}"
    return text + (f" ({human_bytes(size)})" if size is not None else "")


def _list(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_FIRST])
    return shown + (f" and {len(items) - _FIRST} more" if len(items) > _FIRST else "")
