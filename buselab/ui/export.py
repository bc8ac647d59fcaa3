"""`e` in the lab: the session's statistics as one JSON document.

Two views of the same run: `counters` are the telemetry's totals since the
start (every request, exact), and `recent` is `buselab stats`' summary
(trace/stats.py: sizes, alignment, sequential share, latency percentiles,
hot ranges) over the requests still in the telemetry's ring of recent ones.
When the ring holds every request (`recent.complete`), the two agree.
No Textual here: the lab calls it from a thread worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine.telemetry import Snapshot
from ..protocol import constants as c
from ..steering.results import to_json
from ..trace.stats import summarize

if TYPE_CHECKING:
    from ..engine.telemetry import RequestRecord
    from ..session import Session
    from .model import Sample

EXPORT_FORMAT = "buselab-lab-stats"
EXPORT_VERSION = 1


def counters(snap: Snapshot) -> dict[str, Any]:
    ops = {}
    for cmd, count in enumerate(snap.count):
        if not count:
            continue
        ops[c.CMD_NAMES.get(cmd, f"CMD{cmd}")] = {
            "count": count,
            "bytes": snap.bytes[cmd],
            "errors": snap.errors[cmd],
            "latency_mean": snap.latency_sum[cmd] / count,
        }
    return {
        "requests": snap.total_requests,
        "errors": sum(snap.errors),
        "bytes_read": snap.bytes[c.CMD_READ],
        "bytes_written": snap.bytes[c.CMD_WRITE],
        "last_seq": snap.last_seq,
        "connections": snap.connections,
        "ops": ops,
    }


def export_stats(
    session: Session,
    records: Sequence[RequestRecord],
    snap: Snapshot,
    *,
    samples: Sequence[Sample] = (),
    now: float | None = None,
) -> dict[str, Any]:
    engine = session.engine
    recent = summarize(records, size=engine.size)
    recent["first_seq"] = records[0].seq if records else None
    recent["last_seq"] = records[-1].seq if records else None
    recent["complete"] = bool(records) and records[0].seq == 1 or snap.total_requests == 0
    steering = session.steering
    data: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported": now or time.time(),
        "device": {
            "backend": engine.backend.describe(),
            "size": engine.size,
            "where": session.where,
            "transport": session.transport,
            "uptime": (now or time.time()) - engine.telemetry.started,
        },
        "counters": counters(snap),
        "recent": recent,
        "graphs": [sample._asdict() for sample in samples],
    }
    data["filters"] = to_json(steering.list_filters())
    data["breakpoints"] = to_json(steering.list_breakpoints())
    return data
