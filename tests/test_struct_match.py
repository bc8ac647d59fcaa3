"""`struct=KIND`: breakpoints and the lab's stream filter name a structure of the disk's map.

One language for both (steering.breakpoints.parse_match). A struct breakpoint looks the
request up in the labeller's map when it arrives, before it runs, and only while one is
armed; the stream filter (`/` in the lab) keeps the rows that match.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from helpers import connect, require_tool, serve, start_buselab

from buselab.client import NBDClient
from buselab.engine.telemetry import RequestRecord
from buselab.fsmap import KINDS
from buselab.steering.breakpoints import BreakpointError, parse_breakpoint, parse_match
from buselab.storage.backends.ram import RamBackend
from buselab.ui.lab import LabApp
from buselab.ui.screens.stream_filter import StreamFilterScreen

MiB = 1 << 20


# --- the language ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kinds"),
    [
        ("struct=journal", {"journal"}),
        ("struct=jbd2", {"journal"}),
        ("journal", {"journal"}),  # a kind alone, like `flush` alone is an op
        ("struct=inode", {"inode-table"}),  # an unambiguous start
        ("struct=gdt", {"group-desc"}),
        ("struct=bitmap+group-desc", {"bitmap", "group-desc"}),
        ("struct=dir,op=write", {"directory"}),
    ],
)
def test_struct_kinds_may_be_given_loosely(spec, kinds):
    assert parse_breakpoint(spec, 16 * MiB).kinds == kinds


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("struct=nope", "unknown structure 'nope': struct= takes " + ", ".join(KINDS)),
        ("struct=b", "'b' could be bitmap or boot"),
        ("struct=", "struct= needs a kind"),
    ],
)
def test_an_unknown_or_ambiguous_kind_is_one_line_listing_the_kinds(spec, words):
    with pytest.raises(BreakpointError) as caught:
        parse_breakpoint(spec, 16 * MiB)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_stream_filter_speaks_the_same_language_and_says_filter():
    assert parse_match("struct=inode-table,op=read", what="filter").kinds == {"inode-table"}
    with pytest.raises(BreakpointError, match="filters do not know 'colour'"):
        parse_match("colour=red", what="filter")


# --- a real disk ----------------------------------------------------------------------------------


def ext4_disk(tmp_path):
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "16384k"], check=True)
    return image


def mapped(session):
    deadline = time.monotonic() + 10
    while session.labeller.map is None or not session.labeller.map.filesystems:
        assert time.monotonic() < deadline, "the session's labeller did not map the ext4 disk"
        time.sleep(0.05)
    return session.labeller.map


def first_region(fsmap, kind):
    return next(r for r in fsmap.regions if r.kind == kind)


def test_a_struct_breakpoint_holds_a_journal_write_and_nothing_else(tmp_path):
    image = ext4_disk(tmp_path)
    backend = RamBackend(16 * MiB)
    backend.write(0, image.read_bytes())
    with serve(backend, tmp_path) as session:
        fsmap = mapped(session)
        journal = first_region(fsmap, "journal")
        free = first_region(fsmap, "free")
        table = session.steering.breakpoints
        looked_up = []
        real_map = table.current_map
        table.current_map = lambda: looked_up.append(1) or real_map()
        client = connect(session)

        # A breakpoint without struct= looks nothing up.
        session.steering.add_breakpoint("op=trim")
        client.write(free.offset, b"\x11" * 4096)
        assert looked_up == []
        session.steering.remove_breakpoint("all")

        bp = session.steering.add_breakpoint("struct=jbd2,op=write")
        client.write(free.offset, b"\x22" * 4096)  # file-system free space: runs at once
        client.read(journal.offset, 4096)  # the journal, but a READ: runs at once
        assert looked_up and not session.engine.gate.held()

        writer = threading.Thread(target=client.write, args=(journal.offset + 8192, b"\xc0\x3b\x39\x98" * 1024))
        writer.start()
        assert session.engine.gate.wait_held(1, 10), "the journal write was not held"
        (held,) = session.engine.gate.held()
        assert held.req.offset == journal.offset + 8192
        hit = session.steering.last_break
        assert hit.breakpoint == bp.id and hit.spec == "struct=jbd2,op=write"
        session.steering.remove_breakpoint("all")
        session.steering.resume()
        writer.join(10)
        assert not writer.is_alive()
        assert backend.read(journal.offset + 8192, 4) == b"\xc0\x3b\x39\x98"  # held, then written
        client.close()


def test_ctl_break_add_struct_and_a_bad_kind(tmp_path):
    image = ext4_disk(tmp_path)
    control = str(tmp_path / "control.sock")
    served = start_buselab(["file", str(image), "--control", control], tmp_path)
    try:

        def ctl(*args):
            return subprocess.run(
                [sys.executable, "-m", "buselab", "ctl", control, *args], capture_output=True, text=True, timeout=60
            )

        bad = ctl("break", "add", "struct=inodez")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert "unknown structure 'inodez': struct= takes superblock, group-desc, bitmap, inode-table" in bad.stderr
        good = ctl("break", "add", "struct=inode-table,op=write")
        assert good.returncode == 0 and good.stdout.startswith("added breakpoint 1: struct=inode-table,op=write")
        with NBDClient.connect_unix(served.socket) as client:
            deadline = time.monotonic() + 10
            while "inode-table" not in ctl("status", "--json").stdout:  # the map is built, a request labelled
                client.read(1024, 1024)
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.read(0, 4096)  # reads run: the device keeps serving
    finally:
        served.stop()


# --- the lab's stream filter ---------------------------------------------------------------------


def test_slash_filters_the_stream_by_structure(tmp_path):
    image = ext4_disk(tmp_path)
    backend = RamBackend(16 * MiB)
    backend.write(0, image.read_bytes())
    with serve(backend, tmp_path) as session:
        fsmap = mapped(session)
        itable = first_region(fsmap, "inode-table")
        free = first_region(fsmap, "free")
        client = connect(session)

        async def run() -> None:
            app = LabApp(session, auto_poll=False)
            async with app.run_test(size=(160, 50)) as pilot:
                client.read(itable.offset, 4096)
                client.read(free.offset, 4096)
                client.write(itable.offset + 4096, b"\0" * 4096)
                client.read(1024, 1024)  # the superblock
                app.poll()
                await pilot.pause()

                def shown() -> list[tuple[str, int]]:
                    return [(r.op, r.offset) for r in app.stream.rows if isinstance(r, RequestRecord)]

                assert len(shown()) == 4
                await pilot.press("slash")
                assert isinstance(app.screen, StreamFilterScreen)
                await pilot.press(*"struct=inode,op=read", "enter")
                await pilot.pause()
                assert shown() == [("READ", itable.offset)]
                assert app.stream.pane_title == "requests · / struct=inode,op=read"
                assert any(not isinstance(r, RequestRecord) for r in app.stream.rows)  # events stay

                # New rows are filtered as they come.
                client.read(itable.offset + 8192, 4096)
                client.read(free.offset + 4096, 4096)
                app.poll()
                await pilot.pause()
                assert shown() == [("READ", itable.offset), ("READ", itable.offset + 8192)]

                # A bad spec: one line, the panel stays, the filter in use stays.
                await pilot.press("slash", "ctrl+u", *"struct=nope", "enter")
                await pilot.pause()
                assert isinstance(app.screen, StreamFilterScreen)
                assert "unknown structure 'nope'" in app.screen.status_text
                await pilot.press("escape")
                assert app.stream.pane_title == "requests · / struct=inode,op=read"
                assert len(shown()) == 2

                # The op keys still work with it; an empty filter shows everything again.
                await pilot.press("1")  # hide READs
                assert app.stream.pane_title == "requests · only WRITE FLUSH TRIM OTHER · / struct=inode,op=read"
                assert shown() == []
                await pilot.press("0")
                assert len(shown()) == 2
                await pilot.press("slash", "ctrl+u", "enter")
                await pilot.pause()
                assert app.stream.pane_title == "requests" and len(shown()) == 6

        asyncio.run(asyncio.wait_for(run(), 60))
        client.close()


def test_the_breakpoints_panel_takes_struct_and_refuses_a_bad_kind_in_one_line(tmp_path):
    from buselab.ui.screens.breakpoints import BreakpointsScreen

    with serve(RamBackend(16 * MiB), tmp_path) as session:

        async def run() -> None:
            app = LabApp(session, auto_poll=False)
            async with app.run_test(size=(160, 50)) as pilot:
                await pilot.press("k")
                assert isinstance(app.screen, BreakpointsScreen)
                await pilot.press(*"struct=jornal", "enter")
                await pilot.pause()
                assert "unknown structure 'jornal': struct= takes superblock" in app.screen.status_text
                assert not session.steering.list_breakpoints()
                await pilot.press("ctrl+u", *"struct=jbd2,op=write", "enter")
                await pilot.pause()
                assert app.screen.status_text == "breakpoint 1 set: struct=jbd2,op=write"
                assert [b.spec for b in session.steering.list_breakpoints()] == ["struct=jbd2,op=write"]

        asyncio.run(asyncio.wait_for(run(), 60))
