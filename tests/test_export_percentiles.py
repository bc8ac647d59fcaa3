"""Honest latency in what buselab exports: the lab's JSON export (`e`), a trace's `buselab stats`
(per op and per structure) and the graphs' samples give percentiles within 5% of the true
ones (the telemetry's HDR-style buckets) or exactly (the trace, the ring of recent requests).

Latencies spread from 3 µs to 80 ms go through a real Session's telemetry and a real trace
recorder; the truth is the nearest rank of the latencies themselves.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest

from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.backends.ram import RamBackend
from buselab.trace.stats import summarize_trace
from buselab.ui.export import export_stats
from buselab.ui.model import LabModel

MiB = 1 << 20
BLOCK = 4096


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_exported_percentiles_are_within_five_percent(tmp_path: Path) -> None:
    rnd = random.Random(14)
    latencies = {
        c.CMD_READ: [math.exp(rnd.uniform(math.log(3e-6), math.log(2e-3))) for _ in range(1500)],
        c.CMD_WRITE: [0.025 + rnd.uniform(0, 0.005) for _ in range(300)],  # a 25 ms delay filter
        c.CMD_TRIM: [math.exp(rnd.gauss(math.log(80e-3), 0.3)) for _ in range(40)],
    }
    session = Session(RamBackend(64 * MiB), ServeOptions())
    telemetry = session.engine.telemetry
    trace = tmp_path / "run.jsonl"
    recorder = session.start_recording(str(trace), payload="none")
    model = LabModel(session, sample_every=0.0)
    try:
        rec = telemetry.recorder()
        now = time.perf_counter()
        order = [(cmd, lat) for cmd, values in latencies.items() for lat in values]
        rnd.shuffle(order)
        for i, (cmd, latency) in enumerate(order):
            telemetry.record(rec, cmd, 0, (i % 1000) * BLOCK, BLOCK, now - latency, now, 0, 1, i, None)
        model.poll()
        sample = model.latest
        exported = export_stats(session, telemetry.recent(), telemetry.snapshot())
    finally:
        recorder.stop()
        session.stop()
    every = [lat for values in latencies.values() for lat in values]
    assert sample is not None and sample.requests == len(every)
    assert sample.p50 == pytest.approx(nearest_rank(every, 0.5), rel=0.05)
    assert sample.p99 == pytest.approx(nearest_rank(every, 0.99), rel=0.05)
    summary = summarize_trace(str(trace))
    for cmd, values in latencies.items():
        name = c.CMD_NAMES[cmd]
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            truth = nearest_rank(values, q)
            # The lab's export: the histograms (within 5%) and the ring of recent requests (exact).
            assert exported["counters"]["ops"][name][f"latency_{key}"] == pytest.approx(truth, rel=0.05), (name, q)
            assert exported["recent"]["ops"][name]["latency"][key] == pytest.approx(
                truth, abs=1e-9
            )  # perf_counter arithmetic
            # The trace keeps each latency to the nanosecond: its stats are exact.
            assert summary["ops"][name]["latency"][key] == pytest.approx(truth, abs=2e-9), (name, q)
    assert exported["activity"]["latency"]["WRITE"]["p50_ms"] == pytest.approx(
        nearest_rank(latencies[c.CMD_WRITE], 0.5) * 1e3, rel=0.05
    )
    # No disk map here, but a labelled trace: every data request is "unknown", its latency exact too.
    unknown = summary["structures"]["unknown"]
    assert unknown["requests"] == len(every)
    assert unknown["p50"] == pytest.approx(nearest_rank(every, 0.5), abs=2e-9)
    assert unknown["ops"]["WRITE"]["p99"] == pytest.approx(nearest_rank(latencies[c.CMD_WRITE], 0.99), abs=2e-9)
