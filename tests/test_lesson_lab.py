"""The lab with a lesson: the pane, the keys, the pause, on a loop device over nbdfuse (root).

The "other terminal" is a thread running the step's own commands, as a student would.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

from helpers import aio

from buselab.lessons import LessonRunner, find_lesson
from buselab.ui.lesson import LessonApp

MiB = 1 << 20


async def until(app: LessonApp, pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s; the pane says:\n{app.lesson_pane.text}"
        app.poll()
        await pilot.pause(0.05)
    app.poll()  # the pane shows what the predicate saw
    await pilot.pause()


@aio(timeout=90)
async def test_a_student_walks_through_the_mkfs_lesson(loop_disk):
    session, loop = loop_disk
    runner = LessonRunner(session, find_lesson("mkfs"), device=loop)
    app = LessonApp(session, runner, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        app.poll()
        await pilot.pause()
        pane = app.lesson_pane
        assert pane.pane_title == "lesson mkfs · step 1 of 5" and "1. An empty disk" in pane.text
        assert f"$ blkid -p {loop}" in pane.text and "read, then > for the next step" in pane.text
        await pilot.press("greater_than_sign")
        assert "2. mkfs.ext4 writes the superblock" in pane.text and "waiting for the requests" in pane.text
        # The student runs mkfs in the other terminal: it blocks on the lesson's pause.
        mkfs = threading.Thread(target=subprocess.run, args=(["mkfs.ext4", "-F", "-q", loop],), daemon=True)
        mkfs.start()
        await until(app, pilot, lambda: runner.state == "reached")
        assert session.steering.paused and mkfs.is_alive(), "the lesson did not hold mkfs"
        assert "Held: WRITE" in pane.text and "the device is paused on it: > goes on" in pane.text, pane.text
        assert "PAUSED" in app.header_widget.plain and "breakpoint" in app.header_widget.plain
        # > releases the pause: mkfs finishes, the next step finds the superblock copies.
        await pilot.press("greater_than_sign")
        assert not session.steering.paused
        await asyncio.to_thread(mkfs.join, 30)
        assert not mkfs.is_alive()
        await until(app, pilot, lambda: runner.state == "reached" and runner.index == 2)
        assert "mkfs wrote the superblock" in pane.text and "backup, group 1" in pane.text, pane.text
        await pilot.press("less_than_sign")
        assert runner.index == 1 and "2. mkfs.ext4" in pane.text
        await pilot.press("q")
    assert not session.steering.list_breakpoints() and not session.steering.paused


@aio(timeout=90)
async def test_auto_runs_the_commands_and_the_pane_shows_their_output(loop_disk, tmp_path):
    session, loop = loop_disk
    path = tmp_path / "tiny.toml"
    path.write_text(
        """
title = "tiny"
[[step]]
title = "write something"
commands = ["dd if=/dev/zero of={dev} bs=4k count=8 oflag=direct status=none", "echo wrote {name}"]
[step.checkpoint]
wait = "op=write"
count = 8
explain = "{writes} reached the disk."
"""
    )
    from buselab.lessons import load_lesson

    runner = LessonRunner(session, load_lesson(path), device=loop)
    app = LessonApp(session, runner, auto=True, hold=30.0, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await until(app, pilot, lambda: runner.state == "reached")
        assert "8 WRITEs (32.0 KiB) reached the disk." in app.lesson_pane.text, app.lesson_pane.text
        await pilot.press("greater_than_sign")  # no need to wait the 30 s hold
        await until(app, pilot, lambda: runner.state == "finished", timeout=15)
        text = app.lesson_pane.text
        assert "lesson finished: q to quit" in text, text
        await pilot.press("q")


def test_a_short_pane_keeps_the_title_and_the_newest_lines():
    from rich.segment import Segment

    from buselab.ui.lesson import fit

    lines = [[Segment(f"line {i}")] for i in range(30)]
    assert fit(lines, 40) == lines
    shown = ["".join(seg.text for seg in line) for line in fit(lines, 10)]
    assert len(shown) == 10 and shown[0] == "line 0" and shown[-1] == "line 29", shown
    assert shown[1].startswith("… 21 lines above") and shown[2] == "line 22", shown
