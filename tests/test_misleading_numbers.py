"""Numbers that must not mislead: a power-cut dialog that follows the cache while it is open,
durations that say what is wrong with them (a minus sign, a missing unit), and a --seconds
that cannot be zero or negative."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import aio, socket_path
from textual.widgets import Static

from buselab.client import NBDClient
from buselab.errors import UserError
from buselab.session import ServeOptions, Session
from buselab.storage import registry
from buselab.storage.registry import open_backend
from buselab.storage.spec import parse_duration, parse_duration_range
from buselab.ui.lab import LabApp
from buselab.ui.screens.filters import FiltersScreen
from buselab.ui.screens.panel import ConfirmScreen

MiB = 1 << 20


@pytest.fixture
def session(tmp_path: Path):
    s = Session(open_backend("ram", size=16 * MiB), ServeOptions(unix=[str(tmp_path / "nbd.sock")]))
    s.start()
    yield s
    s.stop()


def dialog_text(app: LabApp) -> str:
    screen = app.screen
    assert isinstance(screen, ConfirmScreen)
    return str(screen.query_one(Static).render())


# --- (a) the power cut dialog follows the cache while it is open -----------------------------------


@aio(timeout=30)
async def test_the_power_cut_dialog_shows_the_dirty_bytes_as_they_grow(session):
    client = NBDClient.connect_unix(socket_path(session))
    try:
        session.steering.add_filter("cache")
        app = LabApp(session, auto_poll=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f")
            screen = app.screen
            assert isinstance(screen, FiltersScreen)
            screen.query_one("#list").focus()
            await pilot.press("exclamation_mark")
            assert "holds 0 Bytes" in dialog_text(app)
            # Writes arrive while the question is on screen: the dialog says what a yes loses now.
            client.write(0, b"D" * (116 * 1024))
            deadline = time.monotonic() + 5
            while "holds 116.0 KiB" not in dialog_text(app):
                assert time.monotonic() < deadline, dialog_text(app)
                await pilot.pause(0.05)
            await pilot.press("y")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert "POWER CUT: 116.0 KiB" in screen.status_text
    finally:
        client.close()


# --- (b), (c) durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("-5ms", "bad duration '-5ms': must not be negative"),
        ("-0.5s", "bad duration '-0.5s': must not be negative"),
        ("1ms--5ms", "bad duration '-5ms': must not be negative"),
        ("5", "bad duration '5': give a unit"),
        ("2.5", "bad duration '2.5': give a unit"),
        ("1-20", "bad duration '1': give a unit"),
    ],
)
def test_durations_say_what_is_wrong(text, words):
    with pytest.raises(UserError) as info:
        parse_duration_range(text)
    message = str(info.value)
    assert message.startswith(words), message
    assert "\n" not in message


def test_a_missing_unit_names_the_units_and_an_example():
    with pytest.raises(UserError) as info:
        parse_duration("5")
    assert str(info.value) == "bad duration '5': give a unit (us, ms or s), like 5ms"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5ms", 0.005), ("500us", 0.0005), ("500µs", 0.0005), ("1s", 1.0), ("0.5ms", 0.0005), ("0", 0.0)],
)
def test_durations_with_a_unit_still_work(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("delay:read=-5ms", "bad duration '-5ms': must not be negative"),
        ("delay:read=5", "bad duration '5': give a unit"),
        ("delay:random=1-20", "give a unit"),
        ("throttle:iops=100,burst=-1ms", "must not be negative"),
        ("throttle:iops=100,burst=50", "bad duration '50': give a unit"),
    ],
)
def test_filter_specs_refuse_negative_and_unitless_durations(spec, words):
    with pytest.raises(UserError) as info:
        registry.parse_filter_spec(spec, 16 * MiB)
    assert words in str(info.value), str(info.value)


def test_zero_needs_no_unit():
    f = registry.parse_filter_spec("throttle:iops=100,burst=0", 16 * MiB)
    assert f.spec == "throttle:iops=100,burst=0ms"


# --- (d) --seconds must be positive -----------------------------------------------------------------


def buselab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "buselab", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--headless", "--seconds", "-1"],
        ["demo", "--headless", "--seconds", "0"],
        ["demo", "--headless", "--seconds=-0.5"],
        ["demo", "--headless", "--seconds", "nan"],
        ["ram", "--size", "1M", "--headless", "--seconds", "-1"],
        ["null", "--size", "1M", "--headless", "--seconds", "0"],
    ],
)
def test_seconds_must_be_more_than_zero(args, tmp_path):
    if args[0] != "demo":  # a serving command: never on the default TCP port
        args = [*args, "--unix", str(tmp_path / "nbd.sock")]
    proc = buselab(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("buselab: error: argument --seconds: ") and "more than 0" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_seconds_that_is_not_a_number_says_so():
    proc = buselab("demo", "--headless", "--seconds", "soon")
    assert proc.returncode == 2 and "argument --seconds: " in proc.stderr and "'soon'" in proc.stderr, proc.stderr
