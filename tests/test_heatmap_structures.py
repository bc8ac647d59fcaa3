"""The heatmap's structure view: cells coloured by what the disk's map says they hold.

The pure parts (the palette, the dominant kind of a cell) are checked on their own; the view
itself in the lab, with a real Session whose labeller maps an ext4 file system a real NBD
client wrote, the legend as rendered, and the cursor's info line.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

from helpers import connect, require_tool, serve
from rich.color import Color, ColorSystem
from rich.color_triplet import ColorTriplet

from buselab.fsmap import KINDS, FsMap, Region
from buselab.storage.backends.ram import RamBackend
from buselab.ui.heat_structures import STRUCTURE_COLOURS, structure_cells, structure_colour
from buselab.ui.heatmap import CURSOR, LOST, PALETTE, READ_HEAT, TRIM_HEAT, WRITE_HEAT
from buselab.ui.lab import LabApp

MiB = 1 << 20
KiB = 1 << 10


def index(rgb: tuple[int, int, int]) -> int:
    return Color.from_rgb(*rgb).downgrade(ColorSystem.EIGHT_BIT).number  # type: ignore[return-value]


# --- the palette and the pure functions ------------------------------------------------------


def test_every_kind_has_two_own_256_colour_indexes_apart_from_the_heat_view():
    assert set(STRUCTURE_COLOURS) == set(KINDS)
    colours = [rgb for pair in STRUCTURE_COLOURS.values() for rgb in pair]
    indexes = [index(rgb) for rgb in colours]
    assert len(set(indexes)) == len(indexes), indexes
    for rgb in colours:  # xterm's own colours: a 256-colour terminal shows exactly these
        assert Color.from_triplet(ColorTriplet(*rgb)).downgrade(ColorSystem.EIGHT_BIT).get_truecolor() == rgb
    # The op colours (read blue, write orange, trim violet), lost and the cursor keep their meaning.
    reserved = {index(rgb) for rgb in (*READ_HEAT, *WRITE_HEAT, *TRIM_HEAT, LOST, CURSOR)}
    assert not set(indexes) & reserved
    assert not set(indexes) & {index(rgb) for rgb in PALETTE.values()}


def test_a_cell_takes_the_kind_that_fills_most_of_it_and_gaps_are_unknown():
    regions = [
        Region(0, 1 * KiB, "boot", "boot"),
        Region(1 * KiB, 1 * KiB, "superblock", "sb"),
        Region(4 * KiB, 12 * KiB, "inode-table", "it"),  # cell 0: 12K of 16K
        Region(16 * KiB, 10 * KiB, "data", "d"),
        Region(26 * KiB, 6 * KiB, "journal", "j"),  # cell 1: data 10K, journal 6K
        Region(40 * KiB, 8 * KiB, "directory", "dir"),  # cell 2: 8K directory, 8K not mapped: a tie
    ]
    fsmap = FsMap(80 * KiB, regions)
    cells = structure_cells(fsmap, 80 * KiB, 16 * KiB, 5)
    # The tie goes to the more telling kind; the last cells hold nothing the map knows.
    assert cells.kinds == ["inode-table", "data", "directory", "unknown", "unknown"]
    assert cells.disk_bytes == {
        "boot": KiB,
        "superblock": KiB,
        "unknown": 2 * KiB + 8 * KiB + 32 * KiB,
        "inode-table": 12 * KiB,
        "data": 10 * KiB,
        "journal": 6 * KiB,
        "directory": 8 * KiB,
    }
    assert sum(cells.disk_bytes.values()) == 80 * KiB
    assert cells.legend_kinds() == ["unknown", "inode-table", "data", "directory"]
    assert structure_cells(None, 80 * KiB, 16 * KiB, 5).kinds == ["unknown"] * 5
    assert structure_colour("journal", 0.0) == STRUCTURE_COLOURS["journal"][0]
    assert structure_colour("journal", 3.0) == STRUCTURE_COLOURS["journal"][1]


# --- the lab ---------------------------------------------------------------------------------


def ext4_image(tmp_path, size: int) -> bytes:
    """mkfs.ext4 with 16 MiB groups: groups 1 and 3 hold superblock backups."""
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-g", "4096", str(image), str(size // 1024) + "k"], check=True
    )
    return image.read_bytes()


def legend_text(heat) -> str:
    return "\n".join(heat.render_line(y).text for y in range(heat.size.height - 3, heat.size.height - 1))


def info_text(heat) -> str:
    return heat.render_line(heat.size.height - 4).text


def test_the_structure_view_of_a_file_system_written_over_nbd(tmp_path):
    size = 64 * MiB
    data = ext4_image(tmp_path, size)
    with serve(RamBackend(size), tmp_path) as session:
        client = connect(session)

        async def run() -> None:
            app = LabApp(session, auto_poll=False)
            async with app.run_test(size=(160, 50)) as pilot:
                heat = app.heatmap
                for mode, title in (("time", "offset by time"), ("structure", "structure")):
                    await pilot.press("m")
                    assert heat.mode == mode and heat.pane_title == f"address space · {title}"
                app.poll()
                await pilot.pause()
                # A disk of zeros: the map knows nothing, and the legend says so.
                assert "no partition table or file system found" in legend_text(heat), legend_text(heat)
                assert heat.colour_at(0) == STRUCTURE_COLOURS["unknown"][0]
                builds = heat.structure_builds

                for offset in range(0, size, MiB):  # what mkfs sends, from a real client
                    client.write(offset, data[offset : offset + MiB])
                deadline = time.monotonic() + 15
                while not (session.labeller.map is not None and session.labeller.map.filesystems):
                    assert time.monotonic() < deadline, "the labeller never mapped the ext4 disk"
                    app.poll()
                    await pilot.pause(0.1)
                fsmap = session.labeller.map
                app.poll()
                await pilot.pause()
                assert heat.structure_builds == builds + 1  # the new map, worked out once

                legend = legend_text(heat)
                shares = dict(re.findall(r"■([a-z-]+) (\d+%|<1%)", legend))
                assert {"free", "inode-table", "journal"} <= set(shares), legend
                assert "unknown" not in shares, legend  # the whole disk is the file system
                journal = max((r for r in fsmap.regions if r.kind == "journal"), key=lambda r: r.length)
                table = next(r for r in fsmap.regions if r.kind == "inode-table")
                free = next(r for r in fsmap.regions if r.kind == "free" and r.length >= 4 * MiB)
                # Cells inside a structure take its resting colour (no I/O there lately).
                app.heatmap.model.activity = [[0.0] * heat.model.cells for _ in range(3)]
                heat.refresh_heat()
                await pilot.pause()
                assert heat.colour_at(journal.offset + journal.length // 2) == STRUCTURE_COLOURS["journal"][0]
                assert heat.colour_at(free.offset + free.length // 2) == STRUCTURE_COLOURS["free"][0]
                cell = heat.point_at(table.offset)
                await pilot.pause()
                info = info_text(heat)
                assert f"cell {cell} " in info and "inode table" in info, info
                # The mouse over a journal cell (a top half: the hover row's cells).
                gw = heat.grid_width
                first, last = heat.cell_for_offset(journal.offset), heat.cell_for_offset(journal.end - 1)
                hovered = next(i for i in range(first + 1, last) if (i // gw) % 2 == 0)
                await pilot.hover(heat, offset=(1 + hovered % gw, 1 + hovered // gw // 2))
                await pilot.pause()
                assert heat.hover == hovered
                info = info_text(heat)
                assert f"cell {hovered} " in info and "journal" in info, info

                # Reads of the journal brighten its cells; the kinds are not worked out again.
                builds = heat.structure_builds
                for k in range(8):
                    client.read(journal.offset + k * 4096, 4096)
                app.poll()
                await pilot.pause()
                assert heat.colour_at(journal.offset) == STRUCTURE_COLOURS["journal"][1]
                for _ in range(5):
                    client.read(free.offset, 4096)
                    app.poll()
                    await pilot.pause()
                assert heat.structure_builds == builds
                await pilot.press("m")  # and round again to the heat view
                assert heat.mode == "grid" and heat.pane_title == "address space · heat"

        asyncio.run(run())
        client.close()


def test_a_vfat_disk_shows_its_boot_sector_fats_and_root_directory(tmp_path):
    require_tool("mkfs.vfat")
    from buselab.fsmap import build_map

    image = tmp_path / "fat.img"
    image.write_bytes(bytes(16 * MiB))
    subprocess.run(["mkfs.vfat", "-F", "16", "-S", "512", str(image)], check=True, capture_output=True)
    data = image.read_bytes()
    fsmap = build_map(lambda offset, length: data[offset : offset + length], len(data))
    assert fsmap.filesystems and fsmap.filesystems[0].type == "vfat"
    cells = structure_cells(fsmap, len(data), KiB, len(data) // KiB)
    fat = next(r for r in fsmap.regions if r.kind == "fat")
    assert cells.kinds[0] == "boot"  # the boot sector and the reserved sectors after it
    assert cells.kinds[fat.offset // KiB + 1] == "fat"
    assert {"boot", "fat", "directory", "free"} <= set(cells.kinds)
    assert cells.disk_bytes["fat"] == sum(r.length for r in fsmap.regions if r.kind == "fat")
