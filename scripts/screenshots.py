#!/usr/bin/env python3
"""Take the lab's screenshots for the docs (SVG, 160x50), from real I/O on a real disk.

    sudo .venv/bin/python scripts/screenshots.py docs/img [SCENE ...]
    sudo .venv/bin/python scripts/screenshots.py --vm docs/img lesson_journal ...

Each scene serves a RAM disk in this process, opens the lab headless (Textual's run_test),
drives real tools against it and saves the screen at the moment the docs talk about:

* mkfs:    mkfs.ext4 over nbdfuse; a superblock write selected, heatmap by structure if it has it
* journal: the ext4 mounted (nbdfuse + loop), a small write and sync; the jbd2 commit selected
* iodepth: fio's nbd engine at iodepth 32 behind a 5 ms delay: 32 in flight, Little's law
* lesson_NAME: each lesson of docs/lessons.md at its key moment (`lesson_shot`), run as
  `buselab lesson NAME DEV --auto` runs it, on a loop device over nbdfuse, or with --vm on
  /dev/nbd0 in the test VM (tests/vm), where the kernel has the nbd driver. The journal,
  readahead, queue-depth and random-sequential lessons need --vm: over a loop device FUA
  becomes a FLUSH, the queue is the loop device's and FUSE cuts and reorders the I/O.

Needs root (loop devices), nbdfuse, mkfs.ext4, fio; --vm needs qemu and the VM image the tests
build. Not part of the test suite: the pictures are for people; what they show is asserted by
the tests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buselab.engine.telemetry import RequestRecord  # noqa: E402
from buselab.session import ServeOptions, Session  # noqa: E402
from buselab.storage.registry import open_backend  # noqa: E402
from buselab.ui.lab import LabApp  # noqa: E402

MiB = 1 << 20
SIZE = (160, 50)
MNT = "/tmp/buselab-lesson"  # the lessons' mount point: short in the pane, and writable in the VM


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120)


@contextmanager
def served(tmp: Path, size: int, filters: tuple[str, ...] = ()):
    sock = str(tmp / "nbd.sock")
    session = Session(open_backend("ram", size=size), ServeOptions(unix=[sock], filters=list(filters)))
    session.start()
    try:
        yield session, sock
    finally:
        session.stop()


@contextmanager
def nbdfuse(sock: str, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    pidfile = where.parent / f"{where.name}.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(where / "nbd"), "--unix", sock])
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nbdfuse did not start")
            time.sleep(0.05)
        yield where / "nbd"
    finally:
        sh("fusermount3", "-u", str(where), check=False)
        proc.wait(10)


async def in_thread(*args: str) -> None:
    await asyncio.to_thread(sh, *args)


def select(app: LabApp, wanted) -> RequestRecord | None:
    """Select the last stream row whose label `wanted(kind, text)` accepts, and show it in the inspector."""
    rows = app.stream.rows
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if not isinstance(row, RequestRecord):
            continue
        label = app.session.labeller.label_of(row)
        if label is not None and wanted(label.kind, label.text):
            app.stream.follow = False
            app.stream._select(index)
            app.inspector.show(row)
            return row
    return None


async def settle(app: LabApp, pilot, seconds: float = 1.5) -> None:
    """Let the labeller label what came and the lab draw it."""
    await asyncio.sleep(seconds)
    app.poll()
    await pilot.pause()


def structure_mode(app: LabApp) -> None:
    """The heatmap by structure, where this build has that mode."""
    for _ in range(3):
        if app.heatmap.mode in ("structure", "struct"):
            return
        app.heatmap.action_toggle_mode()


async def scene_mkfs(out: Path, tmp: Path) -> None:
    with served(tmp, 256 * MiB) as (session, sock), nbdfuse(sock, tmp / "fuse") as image:
        app = LabApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await in_thread("mkfs.ext4", "-F", "-q", "-E", "nodiscard", str(image))
            await settle(app, pilot)
            structure_mode(app)
            select(app, lambda kind, text: kind == "superblock" and "backup" in text) or select(
                app, lambda kind, text: kind == "superblock"
            )
            await settle(app, pilot, 0.3)
            app.save_screenshot(filename="lab-mkfs.svg", path=str(out))


async def scene_journal(out: Path, tmp: Path) -> None:
    with served(tmp, 256 * MiB) as (session, sock), nbdfuse(sock, tmp / "fuse2") as image:
        sh("mkfs.ext4", "-F", "-q", "-E", "nodiscard", str(image))
        loop = sh("losetup", "-f", "--show", str(image)).stdout.strip()
        mnt = tmp / "mnt"
        mnt.mkdir()
        try:
            sh("mount", loop, str(mnt))
            app = LabApp(session)
            async with app.run_test(size=SIZE) as pilot:
                await settle(app, pilot)
                (mnt / "hello.txt").write_text("hello, block layer\n" * 200)
                await in_thread("sync")
                await settle(app, pilot, 3.0)  # the map is read again: the file's data gets its name
                select(app, lambda kind, text: kind == "journal" and "commit" in text)
                await settle(app, pilot, 0.3)
                app.save_screenshot(filename="lab-journal.svg", path=str(out))
        finally:
            sh("umount", str(mnt), check=False)
            sh("losetup", "-d", loop, check=False)


async def scene_iodepth(out: Path, tmp: Path) -> None:
    with served(tmp, 256 * MiB, ("delay:ms=5",)) as (session, sock):
        app = LabApp(session)
        async with app.run_test(size=SIZE) as pilot:
            fio = asyncio.create_task(
                in_thread(
                    "fio", "--name=qd32", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", "--rw=randread",
                    "--bs=4k", "--iodepth=32", "--runtime=8", "--time_based", "--size=256M",
                )
            )  # fmt: skip
            await asyncio.sleep(6)
            app.poll()
            await pilot.pause()
            app.save_screenshot(filename="lab-iodepth32.svg", path=str(out))
            await fio


async def scene_lesson_mkfs(out: Path, tmp: Path) -> None:
    """The mkfs lesson at its key moment: mkfs held on the write that makes the disk ext4."""
    import threading

    from buselab.lessons import LessonRunner, find_lesson
    from buselab.ui.lesson import LessonApp

    with served(tmp, 1 << 30) as (session, sock), nbdfuse(sock, tmp / "fuse") as image:
        loop = sh("losetup", "-f", "--show", str(image)).stdout.strip()
        try:
            runner = LessonRunner(session, find_lesson("mkfs"), device=loop)
            app = LessonApp(session, runner)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.press("greater_than_sign")
                mkfs = threading.Thread(target=sh, args=("mkfs.ext4", "-F", "-q", loop), daemon=True)
                mkfs.start()
                for _ in range(300):
                    if runner.state == "reached":
                        break
                    await asyncio.sleep(0.1)
                await settle(app, pilot, 0.5)
                app.save_screenshot(filename="lesson-mkfs.svg", path=str(out))
                await pilot.press("greater_than_sign")
                await asyncio.to_thread(mkfs.join, 60)
        finally:
            sh("losetup", "-d", loop, check=False)


# -- the other lessons: --auto's runner on a loop device, the lab saved at the step that matters --------


def commands_done(runner) -> bool:
    """Has the current step run all its commands (or stopped at a failing one)?"""
    results = runner.results
    return len(results) == len(runner.command_lines()) or any(r.status != 0 for r in results)


def checkpoint_seen(runner) -> bool:
    """The step's checkpoint fired and, unless the lesson holds the device, its commands finished:
    the pane shows the explanation and what the commands printed."""
    return runner.state == "reached" and (runner.holding or commands_done(runner))


def select_last(app: LabApp, wanted) -> RequestRecord | None:
    """Select the last stream row (a request) that `wanted(record)` accepts, and inspect it."""
    rows = app.stream.rows
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if isinstance(row, RequestRecord) and wanted(row):
            app.stream.follow = False
            app.stream._select(index)
            app.inspector.show(row)
            return row
    return None


def heat_mode(app: LabApp, mode: str) -> None:
    for _ in range(3):
        if app.heatmap.mode == mode:
            return
        app.heatmap.action_toggle_mode()


@contextmanager
def lesson_device(tmp: Path):
    """(session, block device) serving a 256 MiB RAM disk: /dev/nbd0 where the kernel has the nbd
    driver (BUSELAB_SHOT_NBD, set by --vm), else a loop device over nbdfuse. Over the loop device
    the kernel's queue is the loop device's, and a FUA write reaches buselab as a WRITE and a FLUSH."""
    nbd = os.environ.get("BUSELAB_SHOT_NBD")
    if nbd:
        session = Session(open_backend("ram", size=256 * MiB), ServeOptions(device=nbd))
        session.labeller.interval = 0.2  # the lab names the journal's blocks soon after they are written
        session.start()
        try:
            yield session, nbd
        finally:
            session.stop()
        return
    with served(tmp, 256 * MiB) as (session, sock), nbdfuse(sock, tmp / "fuse") as image:
        session.labeller.interval = 0.2
        loop = sh("losetup", "-f", "--show", str(image)).stdout.strip()
        try:
            yield session, loop
        finally:
            for _ in range(20):  # the loop device is busy until the lesson's umount is through
                if sh("losetup", "-d", loop, check=False).returncode == 0:
                    break
                time.sleep(0.2)


async def lesson_shot(out: Path, tmp: Path, name: str, step: int, ready=checkpoint_seen, look=None, size=SIZE) -> None:
    """Run lesson `name` as `buselab lesson NAME DEV --auto` does, on a loop device over nbdfuse;
    save the lab (lesson-NAME.svg) once step `step` (1-based) is `ready`, after `look(app)` has
    set the lab's view (a selected row, a heatmap mode); then let the lesson run to its end, so
    its cleanup unmounts what it mounted."""
    from buselab.lessons import LessonRunner, find_lesson
    from buselab.ui.lesson import LessonApp

    with lesson_device(tmp) as (session, device):
        try:
            runner = LessonRunner(session, find_lesson(name), device=device, mount_dir=MNT)
            app = LessonApp(session, runner, auto=True, hold=3600)  # the script says when to go on
            async with app.run_test(size=size) as pilot:
                try:
                    await reach(app, pilot, runner, step, ready)
                    await settle(app, pilot, 1.0)
                    if look is not None:
                        look(app)
                    await settle(app, pilot, 0.3)
                    app.save_screenshot(filename=f"lesson-{name}.svg", path=str(out))
                    while runner.state != "finished" and not app.lesson_pane.error:
                        if runner.state == "reached":
                            await pilot.press("greater_than_sign")  # --auto's hold ends at once
                        await asyncio.sleep(0.2)
                finally:
                    await pilot.press("q")  # --auto stops, and runs the lesson's cleanup
        finally:
            sh("umount", "-l", MNT, check=False)  # a scene that failed mid-lesson


async def reach(app, pilot, runner, step: int, ready, seconds: float = 180) -> None:
    """Wait until step `step` is `ready`, going on from every checkpoint before it (--auto holds each)."""
    deadline = time.monotonic() + seconds
    while not (runner.index == step - 1 and ready(runner)):
        if runner.index < step - 1 and runner.state == "reached":
            await pilot.press("greater_than_sign")
        if app.lesson_pane.error:
            raise SystemExit(f"{runner.lesson.name}: {app.lesson_pane.error}")
        if time.monotonic() > deadline:
            ran = "; ".join(f"{r.command!r} exit {r.status}" for r in runner.results)
            raise SystemExit(
                f"{runner.lesson.name}: not there in {seconds:g} s: at step {runner.index + 1}, {runner.state}, ran {ran}"
            )
        await asyncio.sleep(0.1)


async def scene_lesson_journal(out: Path, tmp: Path) -> None:
    """Held on the commit block's FUA write (so --vm: over a loop device FUA becomes a FLUSH)."""
    await lesson_shot(out, tmp, "journal", 2)


async def scene_lesson_powercut(out: Path, tmp: Path) -> None:
    """After the cut: the requests since fail with EIO, the writes the cache lost are marked."""

    def look(app):
        lost = app.model.lost_requests
        select_last(app, lambda r: r.seq in lost)

    await lesson_shot(out, tmp, "powercut", 4, look=look)


async def scene_lesson_trim(out: Path, tmp: Path) -> None:
    """After fstrim: its TRIMs in the stream, ext4's free space trimmed on the heatmap."""
    await lesson_shot(out, tmp, "trim", 2, look=lambda app: select_last(app, lambda r: r.op == "TRIM"))


async def scene_lesson_readahead(out: Path, tmp: Path) -> None:
    """The 1 MiB direct write split at max_sectors_kb (--vm: FUSE under a loop device cuts I/O its own way)."""
    await lesson_shot(out, tmp, "readahead", 2)


async def scene_lesson_queue_depth(out: Path, tmp: Path) -> None:
    """fio at iodepth 32 behind the 2 ms delay, while it runs: 32 in flight, Little's law."""
    await lesson_shot(out, tmp, "queue-depth", 2, ready=lambda runner: runner.state == "reached")


async def scene_lesson_random_sequential(out: Path, tmp: Path) -> None:
    """The sequential reader after the random one, on the heatmap's time view."""
    await lesson_shot(out, tmp, "random-sequential", 2, look=lambda app: heat_mode(app, "time"))


async def scene_lesson_failing_disk(out: Path, tmp: Path) -> None:
    """Every write fails with EIO; dmesg says ext4 remounted read-only."""
    # Six rows more than the others: the pane ends with dmesg's remount line and touch's EROFS.
    await lesson_shot(out, tmp, "failing-disk", 2, look=lambda app: select_last(app, lambda r: r.error), size=(160, 56))


def shoot_in_vm(out: Path, wanted: list[str]) -> None:
    """Take the scenes in the test VM (tests/vm), where the kernel has the nbd driver: the lessons
    on /dev/nbd0, with the nbd queue's own limits and real FUA writes (the journal lesson needs them)."""
    from tests.vm.vm import run_in_vm

    with tempfile.TemporaryDirectory(prefix="buselab-shots-") as shared:
        script = f"{sys.executable} {Path(__file__).resolve()} {shared} {' '.join(wanted)}\n"
        result = run_in_vm(
            script,
            shared_dir=Path(shared),
            timeout=1800,
            env={"BUSELAB_SHOT_NBD": "/dev/nbd0"},
            modules=("nbd nbds_max=2",),
        )
        print(result.output, file=sys.stderr)
        for svg in Path(shared).glob("*.svg"):
            (out / svg.name).write_bytes(svg.read_bytes())
        if result.returncode != 0:
            raise SystemExit(f"the VM's screenshots exited {result.returncode}")


def main() -> None:
    vm = "--vm" in sys.argv
    args = [arg for arg in sys.argv[1:] if arg != "--vm"]
    out = Path(args[0] if args else "docs/img").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if vm:
        return shoot_in_vm(out, args[1:])
    scenes = (
        scene_mkfs,
        scene_journal,
        scene_iodepth,
        scene_lesson_mkfs,
        scene_lesson_journal,
        scene_lesson_powercut,
        scene_lesson_trim,
        scene_lesson_readahead,
        scene_lesson_queue_depth,
        scene_lesson_random_sequential,
        scene_lesson_failing_disk,
    )
    wanted = args[1:]  # scene names, or all
    failed = []
    for scene in scenes:
        name = scene.__name__[6:]
        if wanted and name not in wanted:
            continue
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            try:
                asyncio.run(scene(out, Path(tmp)))
            except SystemExit as exc:  # one scene that cannot be taken does not stop the others
                failed.append(name)
                print(f"{name}: FAILED: {exc}", file=sys.stderr)
                continue
        print(f"{name}: written", file=sys.stderr)
    if failed:
        raise SystemExit(f"not taken: {', '.join(failed)}")


if __name__ == "__main__":
    main()
