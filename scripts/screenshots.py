#!/usr/bin/env python3
"""Take the lab's screenshots for the docs (SVG, 160x50), from real I/O on a real disk.

    sudo .venv/bin/python scripts/screenshots.py docs/img

Each scene serves a RAM disk in this process, opens the lab headless (Textual's run_test),
drives real tools against it and saves the screen at the moment the docs talk about:

* mkfs:    mkfs.ext4 over nbdfuse; a superblock write selected, heatmap by structure if it has it
* journal: the ext4 mounted (nbdfuse + loop), a small write and sync; the jbd2 commit selected
* iodepth: fio's nbd engine at iodepth 32 behind a 5 ms delay: 32 in flight, Little's law

Needs root (loop devices), nbdfuse, mkfs.ext4, fio. Not part of the test suite: the pictures
are for people; what they show is asserted by the tests.
"""

from __future__ import annotations

import asyncio
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


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img").resolve()
    out.mkdir(parents=True, exist_ok=True)
    scenes = (scene_mkfs, scene_journal, scene_iodepth, scene_lesson_mkfs)
    wanted = sys.argv[2:]  # scene names, or all
    for scene in scenes:
        if wanted and scene.__name__[6:] not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(scene(out, Path(tmp)))
        print(f"{scene.__name__[6:]}: written", file=sys.stderr)


if __name__ == "__main__":
    main()
