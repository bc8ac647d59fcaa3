"""The inspector pages through a held request's whole payload and opens a breakpoint's hit
at the bytes it matched.

Telemetry keeps the first KiB of answered requests; a held request (p, k) has all of its
payload, and a step keeps it for the answer. `]` and `[` move a KiB at a time, `g` goes to
a byte; the ext4-sb breakpoint opens at the superblock's magic, byte 1080, highlighted.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import aio, require_tool, socket_path
from rich.color import Color

from buselab.client import NBDClient
from buselab.engine.telemetry import RequestRecord
from buselab.errors import UserError
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui import format as fmt
from buselab.ui.inspector import GotoScreen, parse_payload_offset
from buselab.ui.lab import LabApp

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def session(tmp_path: Path):
    s = Session(open_backend("ram", size=16 * MiB), ServeOptions(unix=[str(tmp_path / "nbd.sock")]))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(session):
    nbd = NBDClient.connect_unix(socket_path(session))
    yield nbd
    nbd.close()


async def settle(app: LabApp, pilot) -> None:
    app.poll()
    await pilot.pause()


def wait_held(session: Session, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(session.engine.gate.held()) < count:
        assert time.monotonic() < deadline, "nothing was held"
        time.sleep(0.005)


def sixty_four_kib() -> bytes:
    """Each KiB says which it is; the very last bytes say so too."""
    data = b"".join(f"<KiB {k:02d}>".encode().ljust(KiB, bytes([0x41 + k % 26])) for k in range(64))
    return data[:-16] + b"THE LAST 16 BYTE"


def payload_row(app: LabApp) -> str:
    return next(line for line in app.inspector.text.splitlines() if line.startswith("payload"))


def marked(app: LabApp) -> dict[str, list[str]]:
    """{hexdump row offset: the texts drawn there in the highlight style}, for the rows that have some."""
    inspector = app.inspector
    inspector._ensure()
    held = Color.parse(fmt.HELD_COLOUR)
    rows = {}
    for strip in inspector._lines:
        runs: list[str] = []
        inside = False
        for segment in strip:
            lit = segment.style is not None and segment.style.bgcolor == held
            if lit and inside:
                runs[-1] += segment.text
            elif lit:
                runs.append(segment.text)
            inside = lit
        if runs and strip.text[:8].isalnum():
            rows[strip.text[:8]] = runs
    return rows


@aio
async def test_a_64_kib_write_is_paged_through_to_its_last_byte(session, client):
    data = sixty_four_kib()
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("p")
        writer = threading.Thread(target=client.write, args=(1 * MiB, data))
        writer.start()
        wait_held(session)
        await settle(app, pilot)
        await pilot.press("n")  # the step shows it, whole; the answer that follows keeps it
        writer.join(10)
        await settle(app, pilot)
        inspector = app.inspector
        assert isinstance(inspector.record, RequestRecord) and inspector.record.seq > 0, "not the answered write"
        assert "65,536 bytes written · bytes 0–1,023 (page 1 of 64" in payload_row(app)
        assert "<KiB 00>" in inspector.text and "<KiB 01>" not in inspector.text
        assert "page 1/64 · ] [ g" in inspector.pane_subtitle
        inspector.focus()
        await pilot.pause()
        for k in range(1, 64):
            await pilot.press("right_square_bracket")
            if k in (1, 37):
                assert f"<KiB {k:02d}>" in inspector.screen_text and f"<KiB {k - 1:02d}>" not in inspector.text
        assert "bytes 64,512–65,535 (page 64 of 64" in payload_row(app)
        assert "0010fff0  " in inspector.text and "|THE LAST 16 BYTE|" in inspector.text
        await pilot.press("right_square_bracket")  # no further than the last byte
        assert inspector.page_start == 64512
        await pilot.press("left_square_bracket")
        assert "(page 63 of 64" in payload_row(app) and "<KiB 62>" in inspector.text
        # g goes to a byte: its row opens the page, the byte highlighted.
        await pilot.press("g")
        assert isinstance(app.screen, GotoScreen)
        await pilot.press(*"0x8123", "enter")
        await pilot.pause()
        assert inspector.page_start == 0x8120 and inspector.mark == (0x8123, 0x8124)
        assert inspector.screen_text.count("00108120  ") == 1
        assert marked(app) == {"00108120": ["47", "G"]}, "the byte gone to is not highlighted"
        # A mistyped byte says why and changes nothing.
        await pilot.press("g", *"99K", "enter")
        assert isinstance(app.screen, GotoScreen) and "outside the payload" in str(
            app.screen.query_one("#hint").render()
        )
        await pilot.press("escape")
        assert inspector.page_start == 0x8120


@aio
async def test_an_ext4_superblock_breakpoint_opens_at_the_magic_highlighted(session, tmp_path):
    require_tool("mkfs.ext4", "nbdcopy")
    image = tmp_path / "ext4.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    session.steering.add_breakpoint("ext4-sb")
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(100, 30)) as pilot:
        uri = f"nbd+unix:///?socket={socket_path(session)}"
        copy = subprocess.Popen(["nbdcopy", str(image), uri], stderr=subprocess.PIPE)
        try:
            wait_held(session)
            await settle(app, pilot)
            inspector = app.inspector
            assert "caught by breakpoint 1 (ext4-sb)" in inspector.text
            held = session.engine.gate.held()[0].req
            assert held.offset <= 1080 < held.offset + held.length and held.length > 4 * KiB
            magic = 1080 - held.offset
            assert inspector.mark == (magic, magic + 2)
            assert inspector.page_start == magic // 16 * 16  # not the first KiB (zeros): the magic's row
            assert f"bytes {magic:,}–{magic + 1:,} highlighted (at 0x438 on the disk)" in inspector.text
            # The short pane scrolled to it, and the two bytes stand out (8 bytes a row at 100 columns).
            assert "00000438  " in inspector.screen_text
            assert marked(app) == {"00000438": ["53 ef", "S."]}
            await pilot.press("p")  # go on: the copy finishes
            assert copy.wait(30) == 0, copy.stderr.read() if copy.stderr else ""
        finally:
            if copy.poll() is None:
                session.engine.gate.release_all()
                copy.kill()
                copy.wait()
    with NBDClient.connect_unix(socket_path(session)) as check:
        assert check.read(1080, 2) == b"\x53\xef"


@aio
async def test_an_answered_request_pages_on_into_what_the_disk_holds_now_and_says_so(session, client):
    data = sixty_four_kib()[: 8 * KiB]
    client.write(0, data)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot)
        inspector = app.inspector
        assert "first 1,024 of 8,192 bytes written" in inspector.text  # what telemetry kept
        inspector.focus()
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert inspector.page_start == KiB and "<KiB 01>" in inspector.text and "<KiB 00>" not in inspector.text
        assert "8,192 bytes written · bytes 1,024–2,047 (page 2 of 8" in payload_row(app)
        assert "bytes 0–1,023 as the request wrote them; the rest is what the disk holds now" in inspector.text
        await pilot.press("g", *"end", "enter")
        await pilot.pause()
        assert "(page 8 of 8" in payload_row(app) and "00001ff0  48 48" in inspector.text  # the last byte: H

        # Written over since: the lab says that what it shows is the disk now, not the request.
        client.write(0, b"\xee" * KiB)
        await settle(app, pilot)
        first = next(r for r in app.stream.rows if isinstance(r, RequestRecord) and r.length == 8 * KiB)
        app.stream._select(app.stream.rows.index(first))
        await pilot.pause()
        inspector.focus()
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert "the disk no longer holds what this request wrote in its first 1,024 bytes" in inspector.text


def test_go_to_reads_what_people_type():
    record = RequestRecord(1, 0.0, 1, 0, 1 * MiB, 64 * KiB, 0.0, 0, 1, 1, None)
    length = 64 * KiB
    assert parse_payload_offset("1080", record, length) == 1080
    assert parse_payload_offset("0x438", record, length) == 1080
    assert parse_payload_offset("4K", record, length) == 4096
    assert parse_payload_offset("end", record, length) == length - 1
    assert parse_payload_offset("@0x100438", record, length) == 1080
    for bad in ("64K", "@0", "", "lots"):
        with pytest.raises(UserError):
            parse_payload_offset(bad, record, length)
