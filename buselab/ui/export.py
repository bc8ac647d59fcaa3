"""`e` in the lab: the session's statistics as one JSON document.

Three views of the same run: `counters` are the telemetry's totals since the
start (every request, exact; latency percentiles from its histograms, within
2.2%), `recent` is `buselab stats`' summary (trace/stats.py: sizes,
alignment, sequential share, exact latency percentiles, hot ranges, and the
same by structure from the labeller's labels) over the
requests still in the telemetry's ring of recent ones, and `activity` the
last seconds as `buselab ctl status --json` gives them (in flight now and at
most, per connection too; latency, sizes and sequential share per op). When
the ring holds every request (`recent.complete`), the first two agree.
Latencies are the time requests spent in buselab, in seconds (`_ms` keys in
milliseconds). No Textual here: the lab calls it from a thread worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine.telemetry import Snapshot, percentile
from ..protocol import constants as c
from ..steering.results import activity_fields, to_json
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
            "latency_p50": percentile(snap.latency[cmd], 0.5),
            "latency_p99": percentile(snap.latency[cmd], 0.99),
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
    labeller = session.labeller

    def struct_of(record: RequestRecord) -> str | None:
        label = labeller.label(record.seq)  # what the lab's stream said it touched
        return label.kind if label is not None else None

    recent = summarize(records, size=engine.size, struct_of=struct_of)
    recent["first_seq"] = records[0].seq if records else None
    recent["last_seq"] = records[-1].seq if records else None
    recent["complete"] = bool(records) and records[0].seq == 1 or snap.total_requests == 0
    steering = session.steering
    gate = engine.gate
    held = [h.replier.number for h in gate.held()]
    activity = engine.telemetry.activity(snap=snap, held=held, releasing=gate.releasing)
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
        "activity": to_json(activity_fields(activity)),
        "graphs": [sample._asdict() for sample in samples],
    }
    data["filters"] = to_json(steering.list_filters())
    data["breakpoints"] = to_json(steering.list_breakpoints())
    return data
