"""Lessons: the files load and are checked; a lesson runs against a real block device.

The kernel's nbd driver is not on this machine, so the device here is a loop device over
nbdfuse over buselab (root): real mkfs, real mount, real page cache, the lesson's pause on
the real superblock write. The VM tests run the lessons on /dev/nbd0.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from buselab.lessons import LessonError, LessonRunner, builtin_paths, find_lesson, load_lesson, run_auto
from buselab.lessons.facts import FACTS

MiB = 1 << 20


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


# -- the files ---------------------------------------------------------------------------------------


def test_every_builtin_lesson_loads_in_teaching_order():
    names = list(builtin_paths())
    assert names[:2] == ["mkfs", "journal"] and len(names) >= 8, names
    for name in names:
        lesson = find_lesson(name)
        assert lesson.name == name and lesson.title and lesson.steps
        assert any(step.checkpoint for step in lesson.steps), f"{name} has no checkpoint"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("title = 'x'\n", "needs at least one [[step]]"),
        ("title = 'x'\n[[step]]\ntitle = 'a'\nbogus = 1\n", "step 1 ('a'): unknown key 'bogus'"),
        (
            "title = 'x'\n[[step]]\ntitle = 'a'\n[step.checkpoint]\nwait = 'struct=jounral'\n",
            "step 1 ('a'): checkpoint wait = 'struct=jounral'",
        ),
        (
            "title = 'x'\n[[step]]\ntitle = 'a'\n[step.checkpoint]\nwait = 'op=read'\nexplain = '{nonsense}'\n",
            "explain names {nonsense}, which buselab does not measure",
        ),
        ("title = 'x'\n[[step]]\ntitle = 'a'\ncommands = ['ls {disk}']\n", "names {disk}: commands know {dev}"),
        ("title = 'x'\n[[step]]\ntitle = 'a'\n[step.checkpoint]\nexplain = 'hi'\n", "a checkpoint waits for something"),
        ("title = 'x'\n[[step]]\ntitle = 'a'\n[step.checkpoint]\nrun = 'zigzag'\n", "run = 'zigzag': use one of"),
        ("title = = 'x'\n", "is not valid TOML"),
    ],
)
def test_a_bad_lesson_file_is_one_line_naming_the_step(tmp_path, text, says):
    with pytest.raises(LessonError) as error:
        load_lesson(write(tmp_path, text))
    message = str(error.value)
    assert says in message and "\n" not in message and "mine.toml" in message, message


def test_unknown_lesson_names_the_lessons():
    with pytest.raises(LessonError, match=r"no lesson called 'mkfz': the lessons are mkfs, journal, "):
        find_lesson("mkfz")


def test_the_facts_a_lesson_may_use_are_documented():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "lessons.md").read_text()
    missing = [name for name in FACTS if f"`{{{name}}}`" not in doc]
    assert not missing, f"docs/lessons.md does not explain {missing}"


# -- running one, on a real block device -------------------------------------------------------------


def test_the_mkfs_lesson_pauses_on_the_superblock_and_explains_with_this_runs_numbers(loop_disk, tmp_path):
    session, loop = loop_disk
    runner = LessonRunner(session, find_lesson("mkfs"), device=loop, mount_dir=str(tmp_path / "mnt"))
    seen: list[tuple[int, str]] = []

    def on_change() -> None:
        if runner.state in ("paused", "reached") and (runner.index, runner.state) not in seen:
            seen.append((runner.index, runner.state))
            if runner.state == "reached" and runner.index == 1:
                # At the pause, mkfs is really held: the gate holds its superblock write.
                assert session.steering.paused and session.steering.held(), "the device was not paused"

    run_auto(runner, hold=0.2, on_change=on_change)
    assert runner.reached == [1, 2, 3, 4], runner.reached
    assert runner.state == "finished" and not session.steering.paused
    assert not session.steering.list_breakpoints(), "the lesson left its breakpoint behind"
    assert (1, "reached") in seen


def test_each_explanation_carries_numbers_from_the_run(loop_disk, tmp_path):
    session, loop = loop_disk
    lesson = find_lesson("mkfs")
    runner = LessonRunner(session, lesson, device=loop, mount_dir=str(tmp_path / "mnt"))
    explained: dict[int, str] = {}
    run_auto(
        runner,
        hold=0.0,
        on_change=lambda: explained.setdefault(runner.index, runner.explanation) if runner.state == "reached" else None,
    )
    held = explained[1]
    assert re.match(r"Held: WRITE [\d.]+ KiB at byte [\d,]+\. Before it, mkfs sent \d+ WRITEs \(", held), held
    assert "\n" not in held and "{" not in held, held
    backups = explained[2]
    assert (
        "mkfs wrote the superblock" in backups and "backup" in backups and "–" not in backups.split("blocks")[1][:20]
    ), backups
    assert "ext4 journal superblock" in explained[4] or "jbd2" in explained[4], explained[4]


def test_a_checkpoint_that_never_fires_fails_with_the_steps_name(loop_disk, tmp_path):
    session, loop = loop_disk
    path = write(
        tmp_path,
        """
title = "never"
[[step]]
title = "reads nothing"
commands = ["true"]
[step.checkpoint]
wait = "op=trim"
timeout = 1.5
""",
    )
    runner = LessonRunner(session, load_lesson(path), device=loop)
    with pytest.raises(
        LessonError, match=r"step 1 \(reads nothing\): the checkpoint never fired in 1.5 s \(waited for 1 x op=trim\)"
    ):
        run_auto(runner, hold=0.0)


def test_a_failing_command_fails_the_step_with_its_output(loop_disk, tmp_path):
    session, loop = loop_disk
    path = write(
        tmp_path,
        """
title = "broken"
[[step]]
title = "a typo"
commands = ["mkfs.ext9 {dev}"]
[step.checkpoint]
wait = "op=write"
""",
    )
    runner = LessonRunner(session, load_lesson(path), device=loop)
    with pytest.raises(LessonError, match=r"step 1 \(a typo\): 'mkfs.ext9 /dev/loop\d+' failed \(exit 127\)"):
        run_auto(runner, hold=0.0)
    assert not session.steering.paused


def test_stopping_auto_releases_a_held_device(loop_disk, tmp_path):
    session, loop = loop_disk
    runner = LessonRunner(session, find_lesson("mkfs"), device=loop)
    stop = threading.Event()

    def stop_at_pause() -> None:
        if runner.state == "reached" and runner.index == 1:
            stop.set()

    run_auto(runner, hold=30.0, stop=stop, on_change=stop_at_pause)
    assert not session.steering.paused and not session.steering.list_breakpoints()


def test_the_ordering_fact_names_the_flush_before_the_fua_write_held_or_answered():
    from buselab.engine.telemetry import RequestRecord
    from buselab.lessons.facts import facts
    from buselab.protocol import constants as c

    def rec(seq, cmd, flags=0, offset=0):
        return RequestRecord(
            seq, float(seq), cmd, flags, offset, 4096 if cmd != c.CMD_FLUSH else 0, 1e-4, 0, 1, seq, None
        )

    scope = [rec(1, c.CMD_WRITE), rec(2, c.CMD_FLUSH), rec(3, c.CMD_WRITE, c.CMD_FLAG_FUA, 8192)]
    found = facts(scope, [], label=lambda r: None)
    assert found["ordering"] == "FLUSH #2 came before the FUA WRITE #3" and found["fua"] == "1 FUA write"
    assert found["flushes"] == "1 FLUSH" and found["writes"] == "2 WRITEs (8.0 KiB)" and found["trims"] == "no TRIM"
    held = facts(scope[:2], [], label=lambda r: None, held="WRITE 4.0 KiB at byte 8,192", held_fua=True)
    assert held["ordering"] == "FLUSH #2 came before the held FUA WRITE 4.0 KiB at byte 8,192"
    assert facts(scope[:1], [], label=lambda r: None)["ordering"] == "no FUA write"


def test_a_run_checkpoint_waits_for_the_whole_run(session, tmp_path):
    """The split is seen after three pieces; the checkpoint fires, with all eight, once the I/O stops."""
    from helpers import connect

    lesson = load_lesson(
        write(tmp_path, "title = 'x'\n[[step]]\ntitle = 'a'\n[step.checkpoint]\nrun = 'split'\nexplain = '{runs}'\n")
    )
    runner = LessonRunner(session, lesson, device="/dev/nbd9", mount_dir=str(tmp_path))
    runner.goto(0)
    piece = 128 * 1024
    with connect(session) as client:
        for i in range(3):
            client.write(4 * MiB + i * piece, b"x" * piece)
        assert not runner.poll(), f"fired on part of the run: {runner.explanation}"
        for i in range(3, 8):
            client.write(4 * MiB + i * piece, b"x" * piece)
    assert not runner.poll(), "fired while requests were still coming"
    fired = False
    for _ in range(40):  # RUN_SETTLE (0.5 s) after the last request, polled as the lab's tick does
        if runner.poll():
            fired = True
            break
        threading.Event().wait(0.05)
    assert fired and runner.state == "reached"
    assert "8 × 128 KiB" in runner.explanation, runner.explanation
