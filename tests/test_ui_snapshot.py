"""SVG snapshots of the lab over a deterministic workload.

No sockets and no real time: a scripted, seeded sequence of requests (a small
mkfs-like story, file writes and read-backs, a trim, one failing read) is
recorded straight into the session's telemetry with fixed timestamps, the
model runs on a fake clock, and the time zone is UTC. The screen at 160x50
and 100x30 is compared with tests/snapshots/*.svg (normalised: Rich's
content-hash ids removed) and, for a readable diff, with its plain text
(*.txt). BUSELAB_UPDATE_SNAPSHOTS=1 rewrites them; review the PNG/SVG before
committing (rsvg-convert -o out.png tests/snapshots/lab_160x50.svg).
"""

from __future__ import annotations

import asyncio
import difflib
import os
import random
import re
import time
from pathlib import Path

import pytest

from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui import format as fmt
from buselab.ui.lab import LabApp

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("BUSELAB_UPDATE_SNAPSHOTS") == "1"
EPOCH = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
MiB = 1 << 20
BLOCK = 4096


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scripted_session() -> tuple[Session, list[list[tuple]]]:
    """A RAM disk that is not served, and one list of requests per second."""
    session = Session(open_backend("ram", size=64 * MiB), ServeOptions(unix=["/run/buselab/lab.sock"]))
    session.network.addresses.append("nbd+unix:///?socket=/run/buselab/lab.sock")
    rnd = random.Random(5)
    seconds: list[list[tuple]] = []
    # (cmd, flags, offset, length, latency, error, payload)
    fmt_second = []
    for g in range(16):
        base = g * 1024 * BLOCK
        sb = bytearray(BLOCK)
        sb[1024 + 56 : 1024 + 58] = b"\x53\xef"
        fmt_second.append((c.CMD_WRITE, 0, base, BLOCK, 40e-6, 0, bytes(sb)))
        fmt_second.append((c.CMD_WRITE, 0, base + BLOCK, BLOCK, 25e-6, 0, b"\xff" * 16 + bytes(BLOCK - 16)))
        fmt_second.append((c.CMD_WRITE_ZEROES, 0, base + 4 * BLOCK, 8 * BLOCK, 60e-6, 0, None))
    fmt_second.append((c.CMD_FLUSH, 0, 0, 0, 900e-6, 0, None))
    seconds.append(fmt_second)
    for second in range(1, 24):
        batch = []
        for _ in range(10 + (second * 7) % 23):
            offset = rnd.randrange(16384) * BLOCK
            if rnd.random() < 0.6:
                batch.append((c.CMD_READ, 0, offset, BLOCK, rnd.choice([8e-6, 16e-6, 30e-6]), 0, bytes(BLOCK)))
            else:
                data = bytes([second]) * 16 + b"buselab snapshot" * 255
                batch.append((c.CMD_WRITE, 0, offset, BLOCK * 2, rnd.choice([30e-6, 60e-6, 250e-6]), 0, data))
        if second % 5 == 0:
            batch.append((c.CMD_FLUSH, 0, 0, 0, 2e-3, 0, None))
            batch.append((c.CMD_WRITE, c.CMD_FLAG_FUA, 8200 * BLOCK, BLOCK, 1.2e-3, 0, b"commit" + bytes(BLOCK - 6)))
        seconds.append(batch)
    last = [
        (c.CMD_TRIM, 0, 40 * MiB, 2 * MiB, 120e-6, 0, None),
        (c.CMD_READ, 0, 60 * MiB, BLOCK, 15e-3, c.EIO, None),
        (c.CMD_WRITE, c.CMD_FLAG_FUA, 12 * MiB, 8 * BLOCK, 80e-6, 0, b"BUSELAB!" * 4096),
        (c.CMD_READ, 0, 12 * MiB, 8 * BLOCK, 20e-6, 0, b"BUSELAB!" * 4096),
    ]
    seconds.append(last)
    return session, seconds


async def drive(size: tuple[int, int]) -> tuple[str, str]:
    session, seconds = scripted_session()
    telemetry = session.engine.telemetry
    telemetry.clock_offset = 0.0  # record() adds it to arrival times: make them plain epoch times
    telemetry.started = EPOCH
    clock = FakeClock(0.0)
    wall = FakeClock(EPOCH)
    app = LabApp(session, auto_poll=False, clock=clock, wall=wall)
    rec = telemetry.recorder()
    handle = 0
    async with app.run_test(size=size) as pilot:
        for second, batch in enumerate(seconds):
            for i, (cmd, flags, offset, length, latency, error, payload) in enumerate(batch):
                start = EPOCH + second + i * 0.01
                handle += 1
                telemetry.record(rec, cmd, flags, offset, length, start, start + latency, error, 1, handle, payload)
            clock.now = second + 1.0
            wall.now = EPOCH + second + 1.0
            app.poll()
            await pilot.pause()
        await pilot.press("up", "up")  # select the FUA write of the pattern
        await pilot.pause()
        svg = app.export_screenshot(title="buselab lab")
        text = "\n".join(strip.text.rstrip() for strip in app.screen._compositor.render_strips())
    return svg, text


def normalise(svg: str) -> str:
    """Rich names every SVG class and clip path after a hash of the content: drop it."""
    return re.sub(r"terminal-\d+", "terminal", svg)


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    fmt._SECOND_CACHE.clear()
    yield
    monkeypatch.undo()
    time.tzset()
    fmt._SECOND_CACHE.clear()


@pytest.mark.parametrize("size", [(160, 50), (100, 30)], ids=["160x50", "100x30"])
def test_lab_snapshot(size, utc):
    svg, text = asyncio.run(drive(size))
    name = f"lab_{size[0]}x{size[1]}"
    svg_path = SNAPSHOTS / f"{name}.svg"
    text_path = SNAPSHOTS / f"{name}.txt"
    # The content itself, before comparing pictures.
    assert "SERVING" in text and "requests" in text and "address space" in text
    assert "EIO" in text and "FUA" in text and "32K" in text
    if size[1] >= 50:
        assert "|BUSELAB!BUSELAB!|" in text
    if UPDATE or not svg_path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        svg_path.write_text(normalise(svg))
        text_path.write_text(text + "\n")
        if not UPDATE:
            pytest.fail(f"{svg_path.name} did not exist and was written: look at it, then commit it")
        return
    expected_text = text_path.read_text().rstrip("\n")
    if text != expected_text:
        diff = "\n".join(
            difflib.unified_diff(expected_text.splitlines(), text.splitlines(), "expected", "got", lineterm="")
        )
        pytest.fail(f"the {name} screen changed (BUSELAB_UPDATE_SNAPSHOTS=1 to accept):\n{diff}")
    assert normalise(svg) == svg_path.read_text(), f"{name}.svg changed in style only (colours, attributes)"
