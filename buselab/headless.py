"""Headless mode: one humanized stats line a second until SIGINT or SIGTERM.

    12:00:01 ram 64.0 MiB | 1 client | 120 req/s read 1.20 MB/s write 0.00 MB/s
        | p50 130 µs p99 1.02 ms | in flight 3, max 32 | totals: requests 1,234, flush 3, trim 0, errors 0

(one line). Before "totals:" everything is over the last interval: requests per
second, and bytes in MB/s (decimal, like the lab and fio); the latency
percentiles (µs below a millisecond) are of the requests that finished in it,
"-" when none did: the time they spent in buselab, from when it read them to
their reply. "in flight" is how many requests buselab had read and not yet
answered when the line was made (held ones included), "max" the most at once
during the interval. After "totals:" come counts since the start.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from .engine.telemetry import Snapshot, histogram_between, percentile
from .protocol import constants as c
from .session import Session
from .sizes import human_bytes, human_rate, latency_text


def _latency(window: list[int], q: float) -> str:
    return latency_text(percentile(window, q)) if sum(window) else "-"


def stats_line(session: Session, before: Snapshot, after: Snapshot) -> str:
    dt = max(after.taken - before.taken, 1e-6)

    def per_second(totals_after: list[int], totals_before: list[int], cmd: int) -> float:
        return (totals_after[cmd] - totals_before[cmd]) / dt

    reqs = (after.total_requests - before.total_requests) / dt
    window = histogram_between(after.latency, before.latency)
    gate = session.engine.gate
    held = [h.replier.number for h in gate.held()]
    flight = session.engine.telemetry.activity(dt, snap=after, held=held, releasing=gate.releasing)
    paused = " PAUSED" if gate.halted else ""
    return (
        f"{time.strftime('%H:%M:%S')} {session.backend.kind} {human_bytes(session.engine.size)}{paused}"
        f" | {after.connections} client{'s' if after.connections != 1 else ''}"
        f" | {reqs:,.0f} req/s"
        f" read {human_rate(per_second(after.bytes, before.bytes, c.CMD_READ))}"
        f" write {human_rate(per_second(after.bytes, before.bytes, c.CMD_WRITE))}"
        f" | p50 {_latency(window, 0.5)} p99 {_latency(window, 0.99)}"
        f" | in flight {flight.in_flight:,}, max {flight.max_in_flight:,}"
        f" | totals: requests {after.total_requests:,}, flush {after.count[c.CMD_FLUSH]:,},"
        f" trim {after.count[c.CMD_TRIM]:,}, errors {sum(after.errors):,}"
    )


class _Out:
    """Prints lines until the reader of `out` goes away, then prints nothing more."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.gone = False

    def say(self, text: str) -> None:
        if self.gone:
            return
        try:
            print(text, file=self.out, flush=True)
        except BrokenPipeError:
            # `buselab ram --headless | head -2`: the reader has what it wanted. The
            # server does NOT stop for that: clients (maybe a mounted /dev/nbdN) still
            # use the disk, and losing it because a log reader left would hurt them.
            # It serves on, silently, until a signal (or --seconds) stops it cleanly.
            self.gone = True
            try:  # what is still buffered (and Python's flush at exit) goes to /dev/null
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.out.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def run_headless(session: Session, *, out: TextIO = sys.stdout, seconds: float | None = None, on_tick=None) -> int:
    """Print stats until a signal (or `seconds`) ends the run, then stop cleanly."""
    done = session.stop_requested
    say = _Out(out).say
    say(f"buselab: serving {session.backend.describe()}, {human_bytes(session.engine.size)}, on {session.where}")
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        before = session.engine.telemetry.snapshot()
        while not done.wait(1.0):
            after = session.engine.telemetry.snapshot()
            say(stats_line(session, before, after))
            before = after
            if on_tick is not None:
                on_tick()
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        say("buselab: stopping: answering in-flight requests and flushing")
        session.stop()
    say("buselab: stopped cleanly")
    return 0
