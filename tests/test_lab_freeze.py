"""The lab's refresh never stops: not after the event loop stalls, not after a tick that fails.

The lab polls telemetry on its own schedule (12 a second). It used to re-arm a
one-shot Textual timer from each tick; a Textual timer skips a run whose
deadline has passed by the time it looks (skip=True), and a one-shot timer has
only one run, so a stall at the wrong moment (the GIL held by the serving
threads, a long garbage collection, SIGSTOP) ended the refresh for good: the
lab froze while the disk kept serving. These tests stall the real event loop
with time.sleep and check that the model keeps ticking afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from helpers import aio, socket_path

from buselab.client import NBDClient
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui import lab as lab_module
from buselab.ui.lab import LabApp

MiB = 1 << 20
STALL = 0.2  # seconds: longer than a tick (1/12 s) and than the shortest gap between two


@pytest.fixture
def session(tmp_path: Path):
    s = Session(open_backend("ram", size=16 * MiB), ServeOptions(unix=[str(tmp_path / "nbd.sock")]))
    s.start()
    yield s
    s.stop()


async def ticks_keep_rising(app: LabApp, pilot, seconds: float = 1.5, at_least: int = 4) -> None:
    before = app.model.ticks
    deadline = time.monotonic() + seconds
    while app.model.ticks < before + at_least:
        assert time.monotonic() < deadline, (
            f"the lab stopped refreshing: {app.model.ticks - before} ticks in {seconds} s after the stall"
        )
        await pilot.pause(0.05)


@aio
async def test_ticks_go_on_after_the_event_loop_is_blocked(session):
    client = NBDClient.connect_unix(socket_path(session))
    app = LabApp(session)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await ticks_keep_rising(app, pilot)
            for i in range(5):
                client.write(i * MiB, b"x" * 4096)
                time.sleep(STALL + 0.01 * i)  # the event loop (this thread) is blocked
                await asyncio.sleep(0)
            await ticks_keep_rising(app, pilot)
    finally:
        client.close()


def _scheduler_frame(frame) -> bool:
    """A frame of the code that schedules the lab's ticks: Textual's timers, or the lab itself."""
    name = frame.f_code.co_filename.replace("\\", "/")
    return name.endswith("textual/timer.py") or name == lab_module.__file__


@aio
async def test_ticks_go_on_after_a_stall_right_after_the_scheduler_reads_the_clock(session):
    """The stall lands just after the tick's scheduler reads the clock (where a GIL hand-over
    to a serving thread, or a collection, can land): each of the next few clock reads by the
    scheduling code is followed by a blocked event loop."""
    app = LabApp(session)
    async with app.run_test(size=(120, 40)) as pilot:
        await ticks_keep_rising(app, pilot)
        stalls = []

        def stall_after_clock_reads(frame, event, arg) -> None:
            if event == "c_return" and arg is time.monotonic and len(stalls) < 4 and _scheduler_frame(frame):
                stalls.append(frame.f_code.co_name)
                time.sleep(STALL)

        sys.setprofile(stall_after_clock_reads)
        try:
            deadline = time.monotonic() + 2
            while len(stalls) < 4 and time.monotonic() < deadline:
                await pilot.pause(0.02)
        finally:
            sys.setprofile(None)
        assert stalls, "the scheduler never read the clock"
        await ticks_keep_rising(app, pilot)


class FailingLab(LabApp):
    """A lab whose second and third polls fail (as a bug in a widget would)."""

    CSS_PATH = str(Path(lab_module.__file__).with_name("lab.tcss"))
    polls = 0

    def poll(self):  # type: ignore[no-untyped-def]
        self.polls += 1
        if self.polls in (2, 3):
            raise RuntimeError("a bad tick")
        return super().poll()


@aio
async def test_a_tick_that_fails_is_logged_and_the_next_one_runs(session, caplog):
    app = FailingLab(session)
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 5
        while app.polls < 8:
            assert time.monotonic() < deadline, f"only {app.polls} polls: the refresh ended at the failure"
            await pilot.pause(0.05)
        assert app.is_running and app.return_code is None
    assert "a bad tick" in caplog.text
