"""Headless mode: one humanized stats line a second until SIGINT or SIGTERM."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .engine.telemetry import Snapshot, percentile
from .protocol import constants as c
from .session import Session
from .sizes import human_bytes, human_rate


def stats_line(session: Session, before: Snapshot, after: Snapshot) -> str:
    dt = max(after.taken - before.taken, 1e-6)
    read_b = (after.bytes[c.CMD_READ] - before.bytes[c.CMD_READ]) / dt
    write_b = (after.bytes[c.CMD_WRITE] - before.bytes[c.CMD_WRITE]) / dt
    reqs = (after.total_requests - before.total_requests) / dt
    window = [0] * len(after.latency[0])
    for cmd in range(len(after.latency)):
        for i, (a, b) in enumerate(zip(after.latency[cmd], before.latency[cmd])):
            window[i] += a - b
    errors = sum(after.errors)
    paused = " PAUSED" if session.engine.gate.halted else ""
    return (
        f"{time.strftime('%H:%M:%S')} {session.backend.kind} {human_bytes(session.engine.size)}{paused}"
        f" | {after.connections} client{'s' if after.connections != 1 else ''}"
        f" | {reqs:,.0f} req/s read {human_rate(read_b)} write {human_rate(write_b)}"
        f" | flush {after.count[c.CMD_FLUSH]} trim {after.count[c.CMD_TRIM]}"
        f" | p50 {percentile(window, 0.5) * 1e3:.2f} ms p99 {percentile(window, 0.99) * 1e3:.2f} ms"
        f" | errors {errors}"
    )


def run_headless(session: Session, *, out: TextIO = sys.stdout, seconds: float | None = None, on_tick=None) -> int:
    """Print stats until a signal (or `seconds`) ends the run, then stop cleanly."""
    done = session.stop_requested
    print(
        f"buselab: serving {session.backend.describe()}, {human_bytes(session.engine.size)}, on {session.where}",
        file=out,
        flush=True,
    )
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        before = session.engine.telemetry.snapshot()
        while not done.wait(1.0):
            after = session.engine.telemetry.snapshot()
            print(stats_line(session, before, after), file=out, flush=True)
            before = after
            if on_tick is not None:
                on_tick()
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        print("buselab: stopping: answering in-flight requests and flushing", file=out, flush=True)
        session.stop()
    print("buselab: stopped cleanly", file=out, flush=True)
    return 0
