"""The heatmap's colours survive a 256-colour terminal, 16 colours and the SVG export.

Rich turns a truecolor RGB into the nearest of xterm's 256 colours (tmux with
TERM=xterm-256color and no COLORTERM; many terminals over ssh). Shades chosen
freely met there: trim heat and the discard tint mkfs leaves over the whole disk
became one index, and "untouched" a dark blue. The palette is xterm's own
colours, one index per state; the legend names each state, "untouched" too.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require_tool
from rich.color import Color, ColorSystem
from rich.color_triplet import ColorTriplet

from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui.heatmap import (
    EVER_READ,
    EVER_TRIMMED,
    EVER_WRITTEN,
    LOST,
    NEVER,
    PALETTE,
    READ_HEAT,
    STATES,
    TRIM_HEAT,
    WRITE_HEAT,
    heat_colour,
)
from buselab.ui.lab import LabApp

MiB = 1 << 20
BLOCK = 4096


def index(rgb: tuple[int, int, int]) -> int:
    return Color.from_rgb(*rgb).downgrade(ColorSystem.EIGHT_BIT).number  # type: ignore[return-value]


def standard(rgb: tuple[int, int, int]) -> int:
    return Color.from_rgb(*rgb).downgrade(ColorSystem.STANDARD).number  # type: ignore[return-value]


# --- the palette ---------------------------------------------------------------------------


def test_every_state_is_its_own_256_colour_index_and_looks_the_same_there():
    indexes = {name: index(rgb) for name, rgb in PALETTE.items()}
    assert len(set(indexes.values())) == len(indexes), indexes
    for name, rgb in PALETTE.items():
        # One of xterm's own colours: a 256-colour terminal shows exactly the truecolor one.
        assert Color.from_triplet(ColorTriplet(*rgb)).downgrade(ColorSystem.EIGHT_BIT).get_truecolor() == rgb, name


def test_states_stay_apart_in_16_colours():
    heats = {
        "read": {standard(rgb) for rgb in READ_HEAT},
        "write": {standard(rgb) for rgb in WRITE_HEAT},
        "trim": {standard(rgb) for rgb in TRIM_HEAT},
        "untouched": {standard(NEVER)},
        "lost": {standard(LOST)},
    }
    names = list(heats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not heats[a] & heats[b], (a, b, heats)
    tints = {"written": standard(EVER_WRITTEN), "trimmed": standard(EVER_TRIMMED), "only read": standard(EVER_READ)}
    assert len(set(tints.values())) == 3 and not set(tints.values()) & set().union(*heats.values()), tints


def test_heat_is_always_a_palette_colour_of_the_busiest_op():
    palette = set(PALETTE.values())
    rnd = random.Random(7)
    for _ in range(2000):
        r, w, t = (rnd.choice([0.0, rnd.random() * 60]) for _ in range(3))
        colour = heat_colour(r, w, t, rnd.choice([1.0, 24.0, 500.0]), NEVER)
        assert colour in palette
        if r + w + t > 0.02:
            busiest = max((w, 0), (t, 1), (r, 2))[1]
            assert colour in (WRITE_HEAT, TRIM_HEAT, READ_HEAT)[busiest]
    # Brighter (a later entry of the ramp) the more touches there were.
    assert heat_colour(0, 1, 0, 24, NEVER) == WRITE_HEAT[0] and heat_colour(0, 24, 0, 24, NEVER) == WRITE_HEAT[-1]


# --- the lab: the legend and the SVG ----------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def mkfs_story(size: tuple[int, int], svg_path: Path | None = None) -> tuple[LabApp, dict, str, str]:
    """A 64 MiB disk: mkfs's discard of the first half, writes, reads, the rest untouched;
    the colours of each part once the heat has faded, and while it is fresh."""
    session = Session(open_backend("ram", size=64 * MiB), ServeOptions(unix=["/run/buselab/colours.sock"]))
    telemetry = session.engine.telemetry
    clock = FakeClock(0.0)
    app = LabApp(session, auto_poll=False, clock=clock)
    rec = telemetry.recorder()
    seen: dict[str, tuple[int, int, int]] = {}
    async with app.run_test(size=size) as pilot:

        def record(cmd: int, offset: int, length: int) -> None:
            start = time.perf_counter()
            telemetry.record(rec, cmd, 0, offset, length, start, start + 1e-5, 0, 1, 1, None)

        record(c.CMD_TRIM, 0, 32 * MiB)
        record(c.CMD_WRITE, 4 * MiB, 1 * MiB)
        record(c.CMD_READ, 40 * MiB, 1 * MiB)
        app.poll()
        await pilot.pause()
        clock.now = 60.0  # the heat fades: what stays is each part's tint
        app.poll()
        await pilot.pause()
        heat = app.heatmap
        seen.update(
            trimmed=heat.colour_at(16 * MiB),
            written=heat.colour_at(4 * MiB),
            only_read=heat.colour_at(40 * MiB),
            untouched=heat.colour_at(56 * MiB),
        )
        for _ in range(3):
            record(c.CMD_TRIM, 20 * MiB, 1 * MiB)  # fstrim over the discarded part: heat over its tint
            record(c.CMD_WRITE, 8 * MiB, 1 * MiB)
            record(c.CMD_READ, 48 * MiB, 1 * MiB)
        clock.now = 60.1
        app.poll()
        await pilot.pause()
        seen.update(
            trim_heat=heat.colour_at(20 * MiB), write_heat=heat.colour_at(8 * MiB), read_heat=heat.colour_at(48 * MiB)
        )
        legend = "\n".join(heat.render_line(y).text for y in range(heat.size.height - 3, heat.size.height - 1))
        svg = app.export_screenshot(title="colours")
    return app, seen, legend, svg


@pytest.mark.parametrize("size", [(160, 50), (100, 30), (80, 24)], ids=["160x50", "100x30", "80x24"])
def test_each_part_of_the_disk_has_its_own_colour_and_the_legend_names_untouched(size):
    _app, seen, legend, svg = asyncio.run(mkfs_story(size))
    assert seen["trimmed"] == EVER_TRIMMED and seen["written"] == EVER_WRITTEN
    assert seen["only_read"] == EVER_READ and seen["untouched"] == NEVER
    assert seen["trim_heat"] in TRIM_HEAT and seen["write_heat"] in WRITE_HEAT and seen["read_heat"] in READ_HEAT
    indexes = {name: index(rgb) for name, rgb in seen.items()}
    assert len(set(indexes.values())) == len(indexes), indexes  # trim heat is not the discard tint
    # Every state named whole, "untouched" first among what a cell keeps.
    words = re.findall(r"■([a-z ]+?)(?= ■| *(?:│|$))", legend, re.M)
    assert {"read", "write", "trim", "untouched", "written"} <= set(words), legend
    # The SVG export shows the same colours.
    for name, rgb in seen.items():
        assert "#{:02x}{:02x}{:02x}".format(*rgb) in svg, name


def test_the_legend_swatches_are_the_colours_the_cells_show():
    colours = dict(STATES)
    assert colours["untouched"] == NEVER and colours["written"] == EVER_WRITTEN and colours["lost"] == LOST
    assert colours["read"] in READ_HEAT and colours["write"] in WRITE_HEAT and colours["trim"] in TRIM_HEAT


# --- a real terminal with 256 colours ---------------------------------------------------------


def tmux(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """tmux on a private server with no config file (see test_ui_tmux.py)."""
    return subprocess.run(["tmux", "-L", name, "-f", "/dev/null", *args], **kwargs)


def capture(name: str, colours: bool = False) -> str:
    args = ["capture-pane", "-p", *(["-e"] if colours else []), "-t", name]
    return tmux(name, *args, capture_output=True, text=True).stdout


SGR = re.compile(r"\x1b\[([0-9;]*)m")


def styled_chars(line: str) -> list[tuple[str, str, str]]:
    """(character, foreground, background) for each character of a `capture-pane -e` line;
    colours as SGR parameters ("38;5;235"), "" for the default."""
    out: list[tuple[str, str, str]] = []
    fg = bg = ""
    pos = 0
    for match in [*SGR.finditer(line), None]:
        end = match.start() if match is not None else len(line)
        out += [(ch, fg, bg) for ch in line[pos:end]]
        if match is None:
            break
        pos = match.end()
        params = match.group(1).split(";")
        i = 0
        while i < len(params):
            code = params[i]
            if code in ("38", "48") and i + 1 < len(params):
                n = 3 if params[i + 1] == "5" else 5
                value = ";".join(params[i : i + n])
                fg, bg = (value, bg) if code == "38" else (fg, value)
                i += n
                continue
            if code in ("0", ""):
                fg = bg = ""
            elif code == "39":
                fg = ""
            elif code == "49":
                bg = ""
            i += 1
    return out


def swatch_colours(line: str) -> dict[str, str]:
    """{legend name: the colour its ■ was drawn in} for one captured line."""
    chars = styled_chars(line)
    text = "".join(ch for ch, _, _ in chars)
    out = {}
    for match in re.finditer(r"■([a-z]+(?: [a-z]+)?)", text):
        out[match.group(1)] = chars[match.start()][1]
    return out


def test_the_demo_in_a_256_colour_tmux_draws_each_state_in_its_own_index(tmp_path: Path):
    require_tool("tmux")
    name = f"buselab-colours-{os.getpid()}"
    buselab = shutil.which("buselab")
    command = shlex.quote(buselab) if buselab else f"{shlex.quote(sys.executable)} -m buselab"
    # What tmux users over ssh have: 256 colours, no COLORTERM announcing truecolor.
    shell = f"unset COLUMNS LINES COLORTERM; TERM=xterm-256color {command} demo; sleep 30"
    tmux(name, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", "sleep 600", check=True)
    try:
        tmux(name, "set-option", "-t", name, "window-size", "manual", check=True)
        tmux(name, "resize-window", "-t", name, "-x", "160", "-y", "50", check=True)
        tmux(name, "respawn-pane", "-k", "-t", name, shell, check=True)
        deadline = time.monotonic() + 30
        screen = ""
        while time.monotonic() < deadline:
            screen = capture(name)
            if "■untouched" in screen and re.search(r"demo round [2-9]", screen):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the lab never showed its legend:\n{screen}")
        coloured = capture(name, colours=True)
        assert "\x1b[38;2;" not in coloured and "\x1b[48;2;" not in coloured, "truecolor sent to a 256-colour terminal"
        legend: dict[str, str] = {}
        for line in coloured.splitlines():
            if "■" in line and ("untouched" in line or "1 cell =" in line):
                legend.update(swatch_colours(line))
        wanted = {"read", "write", "trim", "untouched", "written"}
        assert wanted <= set(legend), legend
        codes = {state: legend[state] for state in wanted}
        assert all(code.startswith("38;5;") for code in codes.values()), codes
        assert len(set(codes.values())) == len(codes), codes
        assert codes["untouched"] == f"38;5;{index(NEVER)}" and codes["written"] == f"38;5;{index(EVER_WRITTEN)}"
        # The grid itself: only the palette's indexes, untouched among them.
        palette = {f"38;5;{index(rgb)}" for rgb in PALETTE.values()} | {
            f"48;5;{index(rgb)}" for rgb in PALETTE.values()
        }
        used = {
            colour
            for line in coloured.splitlines()
            for ch, fg, bg in styled_chars(line)
            if ch == "▀"
            for colour in (fg, bg)
        }
        assert f"48;5;{index(NEVER)}" in used and used <= palette, sorted(used - palette)
    finally:
        tmux(name, "kill-server", capture_output=True)
