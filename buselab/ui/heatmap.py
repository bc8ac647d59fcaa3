"""The heatmap: the device's address space, coloured by recent I/O.

Two views of the same counters. The grid lays the disk out like a page, offset
0 at the top left, one half-block cell per range of blocks, coloured by the
decayed recent reads (blue), writes (orange to yellow) and trims (violet) in
it, and once they fade by what the cell keeps: a dim tint where it was written,
trimmed or only read, the darkest grey where it was never touched, and a loud
one where a power cut threw written data away (until it is written again).
The legend names each of these. The time view plots offset
(vertical) against time (horizontal), one column a second, as iowatcher does.
The structure view colours each cell by the structure filling most of it in the
disk's map (superblock, inode table, journal, data, ...; heat_structures.py),
brighter where it was touched in the last seconds; its legend gives each kind's
share of the disk. `m` cycles heat -> time -> structure.
Lines are rebuilt only when the model's heat (or the map) changed, never per request.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip

from . import format as fmt
from .heat_structures import STRUCTURE_COLOURS, StructureCells, knows_something, structure_cells, structure_colour
from .model import LabModel
from .pane import Pane
from .stream import LOST_COLOUR

if TYPE_CHECKING:
    from textual.app import RenderResult  # noqa: F401

RGB = tuple[int, int, int]

# Every colour here is one of xterm's 256 (its 6x6x6 cube or its grey ramp), so a terminal
# with 256 colours (tmux, TERM=xterm-256color without COLORTERM) shows each state exactly as
# a truecolor one, or the SVG export, does, and no two states share an index: Rich turns an
# RGB into its nearest index, and shades between states used to meet there (trim heat and
# the discard tint mkfs leaves everywhere). In 16 colours the heats stay bright blue/cyan,
# yellow and magenta, the tints their dim blue, brown and magenta, untouched black, lost red.
PANEL = (18, 18, 18)  # past the end of the disk (232 + 1)
NEVER = (38, 38, 38)  # untouched (235)
EVER_READ = (0, 0, 95)  # read, never written (17)
EVER_WRITTEN = (95, 95, 0)  # written at some time (58)
EVER_TRIMMED = (95, 0, 95)  # trimmed and not written since (53): mkfs discards the whole disk
CURSOR = (255, 255, 255)  # (231)
# Recent I/O, dimmest first: a cell takes the ramp of its busiest op, brighter the more there was.
READ_HEAT: tuple[RGB, ...] = ((0, 95, 215), (0, 135, 255), (95, 175, 255), (135, 215, 255))  # 26 33 75 117
WRITE_HEAT: tuple[RGB, ...] = ((255, 175, 0), (255, 175, 95), (255, 215, 0), (255, 215, 95))  # 214 215 220 221
TRIM_HEAT: tuple[RGB, ...] = ((175, 95, 215), (215, 95, 255), (215, 135, 255), (255, 135, 255))  # 134 171 177 213
HEAT_SCALE = 24.0  # decayed touches at which a cell is at full brightness


def _hex(colour: str) -> RGB:
    colour = colour.lstrip("#")
    return (int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16))


READ_RGB = _hex(fmt.READ_COLOUR)
WRITE_RGB = _hex(fmt.WRITE_COLOUR)
TRIM_RGB = _hex(fmt.TRIM_COLOUR)
LOST = _hex(LOST_COLOUR)  # written data a power cut threw away (197)

# What the legend names, in its order: (name, colour). The tests hold these to distinct indexes.
STATES: tuple[tuple[str, RGB], ...] = (
    ("read", READ_HEAT[2]),
    ("write", WRITE_HEAT[0]),
    ("trim", TRIM_HEAT[2]),
    ("written", EVER_WRITTEN),
    ("untouched", NEVER),
    ("lost", LOST),
)
PALETTE: dict[str, RGB] = {
    "past the end": PANEL,
    "untouched": NEVER,
    "ever read": EVER_READ,
    "written": EVER_WRITTEN,
    "trimmed": EVER_TRIMMED,
    "lost": LOST,
    "cursor": CURSOR,
    **{f"read heat {i}": rgb for i, rgb in enumerate(READ_HEAT)},
    **{f"write heat {i}": rgb for i, rgb in enumerate(WRITE_HEAT)},
    **{f"trim heat {i}": rgb for i, rgb in enumerate(TRIM_HEAT)},
}

_LABEL = Style.parse(fmt.DIM_COLOUR)
_TEXT = Style.parse("#d8dee9")
_KEY = Style.parse("bold #d8dee9")
_READ = Style.parse(f"bold {fmt.READ_COLOUR}")
_WRITE = Style.parse(f"bold {fmt.WRITE_COLOUR}")
_TRIM = Style.parse(f"bold {fmt.TRIM_COLOUR}")


MODES = ("grid", "time", "structure")  # the order `m` cycles through
TITLES = {
    "grid": "address space · heat",
    "time": "address space · offset by time",
    "structure": "address space · structure",
}


def heat_colour(r: float, w: float, t: float, scale: float, base: RGB) -> RGB:
    """The busiest op's colour, brighter the more recent touches there were; `base` when none."""
    total = r + w + t
    if total <= 0.02:
        return base
    ramp = WRITE_HEAT if w >= r and w >= t else TRIM_HEAT if t >= r else READ_HEAT
    level = int(len(ramp) * math.log1p(total) / math.log1p(max(scale, 1.0)))
    return ramp[min(len(ramp) - 1, level)]


LEGEND_ROWS = 2  # the heatmap's legend: the scale and the heats, then the states a cell keeps


def _swatches(items: Iterable[tuple[str, RGB]]) -> list[Segment]:
    """'■name ' for each (name, colour): the square in the colour the cells show."""
    segments = []
    for name, rgb in items:
        segments += [Segment("■", Style(color=Color.from_rgb(*rgb))), Segment(f"{name} ", _TEXT)]
    return segments


def aggregate(values: list, group: int, n: int) -> list:
    """Sum consecutive runs of `group` values: n results (C-speed strided adds)."""
    if group == 1:
        return values
    padded = values + [0] * (n * group - len(values))
    out = padded[0::group]
    for k in range(1, group):
        out = list(map(operator.add, out, padded[k::group]))
    return out


def grid_char_rows(shown: int, width: int) -> int:
    """Character rows for `shown` half-block cells, `width` to a row."""
    display_rows = -(-shown // width)
    return -(-display_rows // 2)


def grid_layout(cells: int, width: int, char_rows: int) -> tuple[int, int]:
    """(telemetry cells per display cell, display cells) for the finest grid that fits."""
    group = max(1, -(-cells // (width * char_rows * 2)))
    while grid_char_rows(-(-cells // group), width) > char_rows:
        group += 1
    return group, -(-cells // group)


class Heatmap(Pane, can_focus=True):
    """The address space as cells; `m` switches to offset-by-time."""

    BINDINGS = [
        Binding("left", "move(-1, 0)", "Left", show=False),
        Binding("right", "move(1, 0)", "Right", show=False),
        Binding("up", "move(0, -1)", "Up", show=False),
        Binding("down", "move(0, 1)", "Down", show=False),
    ]

    mode: reactive[str] = reactive("grid")
    """"grid" (address space by heat), "time" (offset vertical, time horizontal) or
    "structure" (address space by what the disk's map says each cell holds)."""

    class Resized(Message):
        """The heatmap's width changed: the app may give it a better height."""

    def __init__(self, model: LabModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.cursor: int | None = None  # display cell, moved with the arrow keys
        self.hover: int | None = None  # display cell under the mouse
        self.hover_time: tuple[int, int] | None = None  # (column, band) in the time view
        self._lines: list[Strip] = []
        self._built_for: tuple | None = None
        self._segments: dict[tuple[RGB, RGB], Segment] = {}
        self._colour_cache: dict[tuple, RGB] = {}
        self.group = 1
        self.cells_shown = 0
        self.grid_width = 1
        self.builds = 0
        self._structures: StructureCells | None = None
        self._structures_for: tuple | None = None  # (map, display cell bytes, cells shown) they were made for
        self.structure_builds = 0  # how often the cells' kinds were worked out (once per map and geometry)

    # -- geometry ------------------------------------------------------------------
    def _grid_geometry(self) -> tuple[int, int, int]:
        """(group, display cells, grid columns) for the current size."""
        width = self.inner_width
        group, shown = grid_layout(self.model.cells, width, max(1, self.inner_height - 1 - LEGEND_ROWS))
        return group, shown, width

    def preferred_height(self, width: int, max_height: int) -> int:
        """Height (frame, info and legend included) that shows the whole disk
        at the finest grouping that fits in `max_height`: no empty rows."""
        inner = max(1, width - 2)
        rows = max(1, max_height - 3 - LEGEND_ROWS)
        group, shown = grid_layout(self.model.cells, inner, rows)
        return grid_char_rows(shown, inner) + 3 + LEGEND_ROWS

    def cell_range(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of display cell `index`."""
        per = self.group * self.model.cell_bytes
        start = index * per
        return start, min(self.model.size, start + per)

    @property
    def display_cell_bytes(self) -> int:
        """Bytes one cell of the grid covers (the legend's number)."""
        if self.size.width > 2:
            self.group = self._grid_geometry()[0]
        return self.group * self.model.cell_bytes

    def cell_for_offset(self, offset: int) -> int:
        return offset // (self.group * self.model.cell_bytes)

    def cell_counts(self, index: int) -> tuple[list[int], list[float]]:
        first = index * self.group
        return self.model.cell_counts(first, first + self.group - 1)

    # -- drawing ------------------------------------------------------------------------
    def _half(self, top: RGB, bottom: RGB) -> Segment:
        """The half-block segment showing `top` over `bottom` (cached)."""
        key = (top, bottom)
        cached = self._segments.get(key)
        if cached is None:
            if len(self._segments) > 4096:
                self._segments.clear()
            style = Style(color=Color.from_rgb(*top), bgcolor=Color.from_rgb(*bottom))
            cached = self._segments[key] = Segment("▀", style)
        return cached

    def cell_colours(self) -> list[RGB]:
        """The colour of every display cell of the grid view."""
        model = self.model
        group, shown = self.group, self.cells_shown
        reads, writes, trims = (aggregate(model.activity[k], group, shown) for k in range(3))
        t_reads, t_writes, t_trims = (aggregate(model.heat_prev[k], group, shown) for k in range(3))
        lost = model.lost_cell_flags(group, shown)
        cache = self._colour_cache
        if len(cache) > 20000:
            cache.clear()
        colours: list[RGB] = []
        append = colours.append
        for i in range(shown):
            if lost is not None and lost[i]:
                base = LOST
            elif t_writes[i]:
                base = EVER_WRITTEN
            else:
                base = EVER_TRIMMED if t_trims[i] else EVER_READ if t_reads[i] else NEVER
            r, w, t = reads[i], writes[i], trims[i]
            if r < 0.05 and w < 0.05 and t < 0.05:
                append(base)
                continue
            # Quantised inputs: under uniform load most cells share a colour.
            key = (base, int(min(r, 63.0) * 2), int(min(w, 63.0) * 2), int(min(t, 63.0) * 2))
            colour = cache.get(key)
            if colour is None:
                colour = cache[key] = heat_colour(key[1] / 2, key[2] / 2, key[3] / 2, HEAT_SCALE, base)
            append(colour)
        return colours

    # -- the structure view --------------------------------------------------------------
    def structures(self) -> StructureCells:
        """The dominant kind of each display cell: worked out again only for a new map or geometry."""
        fsmap = self.model.fsmap
        per = self.group * self.model.cell_bytes
        key = (fsmap, per, self.cells_shown, self.model.size)
        built_for = self._structures_for
        if self._structures is None or built_for is None or built_for[0] is not fsmap or built_for[1:] != key[1:]:
            self._structures = structure_cells(fsmap, self.model.size, per, self.cells_shown)
            self._structures_for = key
            self.structure_builds += 1
        return self._structures

    def structure_colours(self) -> list[RGB]:
        """The colour of every display cell of the structure view: its kind's, brighter if touched lately."""
        model = self.model
        group, shown = self.group, self.cells_shown
        kinds = self.structures().kinds
        recent = [
            r + w + t for r, w, t in zip(*(aggregate(model.activity[k], group, shown) for k in range(3)), strict=True)
        ]
        lost = model.lost_cell_flags(group, shown)
        colours = [structure_colour(kind, touched) for kind, touched in zip(kinds, recent, strict=True)]
        if lost is not None:
            colours = [LOST if is_lost else colour for colour, is_lost in zip(colours, lost, strict=True)]
        return colours

    def _structure_info(self, index: int, start: int, end: int) -> list[Segment]:
        """What the map says cell `index` holds: its structures, most of them first."""
        fsmap = self.model.fsmap
        head = [
            Segment(f"cell {index} ", _KEY),
            Segment(f"at {fmt.compact_size(start)}+{fmt.compact_size(end - start)}: ", _TEXT),
        ]
        if not knows_something(fsmap):
            return [*head, Segment("the map knows nothing here", _LABEL)]
        assert fsmap is not None
        sizes: dict[str, int] = {}
        kinds: dict[str, str] = {}
        covered = 0
        for region in fsmap.regions_in(start, end - start):
            n = min(region.end, end) - max(region.offset, start)
            sizes[region.label] = sizes.get(region.label, 0) + n
            kinds[region.label] = region.kind
            covered += n
        if covered < end - start:
            sizes["not mapped"] = end - start - covered
            kinds["not mapped"] = "unknown"
        names = sorted(sizes, key=lambda label: -sizes[label])
        segments = list(head)
        for i, label in enumerate(names):
            if i:
                segments.append(Segment(", ", _LABEL))
            rgb = STRUCTURE_COLOURS[kinds[label]][1]
            segments.append(Segment(label, Style(color=Color.from_rgb(*rgb))))
        return segments

    def _build_grid(self, width: int, height: int) -> list[Strip]:
        self.group, self.cells_shown, self.grid_width = self._grid_geometry()
        colours = self.structure_colours() if self.mode == "structure" else self.cell_colours()
        highlight = self.hover if self.hover is not None else self.cursor if self.has_focus else None
        if highlight is not None and highlight < len(colours):
            colours[highlight] = CURSOR
        shown = self.cells_shown
        gw = self.grid_width
        lines: list[Strip] = []
        char_rows = grid_char_rows(shown, gw)
        for row in range(max(0, height - 1 - LEGEND_ROWS)):
            if row >= char_rows:
                lines.append(Strip.blank(width))
                continue
            top0 = row * 2 * gw
            bottom0 = top0 + gw
            half = self._half
            if bottom0 + gw <= shown:
                segments = [half(t, b) for t, b in zip(colours[top0:bottom0], colours[bottom0 : bottom0 + gw])]
            else:
                segments = [
                    half(
                        colours[top0 + x] if top0 + x < shown else PANEL,
                        colours[bottom0 + x] if bottom0 + x < shown else PANEL,
                    )
                    for x in range(gw)
                ]
            lines.append(Strip(segments, gw).simplify().crop_extend(0, width, None))
        lines.append(self._info_line(width))
        lines.extend(self._legend_lines(width))
        return lines

    def _info_line(self, width: int) -> Strip:
        index = self.hover if self.hover is not None else self.cursor
        if self.mode == "time":
            text = self._time_info()
            return Strip([Segment(text, _TEXT)]).crop_extend(0, width, None)
        if index is None or index >= self.cells_shown:
            return Strip([Segment("hover a cell (or tab here, then arrows)", _LABEL)]).crop_extend(0, width, None)
        start, end = self.cell_range(index)
        if self.mode == "structure":
            return Strip(self._structure_info(index, start, end)).crop_extend(0, width, None)
        totals, _recent = self.cell_counts(index)
        segments = [
            Segment(f"cell {index} ", _KEY),
            Segment(f"at {fmt.compact_size(start)}+{fmt.compact_size(end - start)} ", _TEXT),
            Segment(f"R {totals[0]:,} ", _READ),
            Segment(f"W {totals[1]:,} ", _WRITE),
            Segment(f"T {totals[2]:,}  ", _TRIM),
            Segment(f"blocks {start // 4096:,}–{(end - 1) // 4096:,}  bytes {start:,}–{end - 1:,}", _LABEL),
        ]
        return Strip(segments).crop_extend(0, width, None)

    def _legend_lines(self, width: int) -> list[Strip]:
        """LEGEND_ROWS lines: the scale, the heat of each op, then the states a cell keeps.

        Names are never cut: what does not fit on the first line goes to the second, and
        what fits on neither is left out, least telling first (at 80 columns the pane is
        30 wide); "untouched" comes right after the heats.
        """
        if self.mode == "structure":
            return self._structure_legend(width)
        if self.mode == "time":
            head = f"1 col = {self.model.time_column:g} s · 1 row = {fmt.iec_size(self._band_bytes())}"
            detail = ""
            kept: list[tuple[str, RGB]] = [("untouched", NEVER)]
        else:
            per = self.group * self.model.cell_bytes
            head = f"1 cell = {fmt.iec_size(per)}"
            detail = f" ({per // 4096:,} blocks)"
            kept = [("untouched", NEVER)]
            if self.model.lost_requests:
                kept.append(("lost", LOST))
            kept += [("written", EVER_WRITTEN), ("trimmed", EVER_TRIMMED), ("only read", EVER_READ)]
        items = [*STATES[:3], *kept]  # the heats on the first line, what cells keep on the second
        heats_width = sum(len(name) + 2 for name, _ in STATES[:3])
        first = [Segment(head, _KEY)]
        used = len(head)
        if used + len(detail) + 2 + heats_width <= width + 1:
            first.append(Segment(detail, _LABEL))
            used += len(detail)
        first.append(Segment("  "))
        used += 2
        lines: list[list[Segment]] = [first, []]
        line = 0
        for i, (name, rgb) in enumerate(items):
            need = len(name) + 2  # "■name "
            if line == 0 and (i >= 3 or used + need > width + 1):
                line, used = 1, 0
            if used + need <= width + 1:
                lines[line] += _swatches([(name, rgb)])
                used += need
        return [Strip(segments).crop_extend(0, width, None) for segments in lines]

    def _structure_legend(self, width: int) -> list[Strip]:
        """LEGEND_ROWS lines: each kind a cell shows, its colour and its share of the disk, the
        biggest first, as many as fit whole; or, when the map knows nothing, that it does not."""
        per = self.group * self.model.cell_bytes
        head = f"1 cell = {fmt.iec_size(per)}  "
        if not knows_something(self.model.fsmap):
            lines = [
                [Segment(head, _KEY), *_swatches([("unknown", STRUCTURE_COLOURS["unknown"][0])])],
                [Segment("no partition table or file system found on this disk", _LABEL)],
            ]
            return [Strip(segments).crop_extend(0, width, None) for segments in lines]
        cells = self.structures()
        items: list[tuple[str, RGB]] = []
        for kind in cells.legend_kinds():
            share = cells.share(kind)
            text = f"{share:.0%}" if share >= 0.01 else "<1%"
            items.append((f"{kind} {text}", STRUCTURE_COLOURS[kind][0]))
        if self.model.lost_requests:
            items.append(("lost", LOST))
        lines: list[list[Segment]] = [[Segment(head, _KEY)], []]
        used = [len(head), 0]
        for name, rgb in items:
            need = len(name) + 2  # "■name "
            for line in (0, 1):
                if used[line] + need <= width + 1:
                    lines[line] += _swatches([(name, rgb)])
                    used[line] += need
                    break
        if used[1] + 22 <= width:
            lines[1].append(Segment("bright = touched lately", _LABEL))
        return [Strip(segments).crop_extend(0, width, None) for segments in lines]

    # -- the time view ---------------------------------------------------------------
    def _time_geometry(self, width: int, height: int) -> tuple[int, int, int]:
        axis = 6
        plot = max(1, width - axis - 1)
        bands = max(2, (height - 2 - LEGEND_ROWS) * 2)
        return axis, plot, bands

    def _band_bytes(self) -> int:
        width = self.inner_width
        height = self.inner_height
        _axis, _plot, bands = self._time_geometry(width, height)
        return -(-self.model.size // bands)

    def _time_columns(self, plot: int) -> list:
        """The last `plot` columns, oldest first: closed TimeColumns and the open dict."""
        cols: list = list(self.model.columns)[-(plot - 1) :] if plot > 1 else []
        cols.append(self.model.column_open)
        return cols

    def _build_time(self, width: int, height: int) -> list[Strip]:
        model = self.model
        axis, plot, bands = self._time_geometry(width, height)
        columns = self._time_columns(plot)
        rows = model.time_rows
        grids: list[list[list[int]] | None] = []
        peak = 1
        for col in columns:
            if not col:
                grids.append(None)
                continue
            grid = [[0, 0, 0] for _ in range(bands)]
            for bucket, counts in col.items():
                band = min(bands - 1, bucket * bands // rows)
                cell = grid[band]
                cell[0] += counts[0]
                cell[1] += counts[1]
                cell[2] += counts[2]
                peak = max(peak, cell[0] + cell[1] + cell[2])
            grids.append(grid)
        pad = plot - len(columns)
        lines: list[Strip] = []
        char_rows = bands // 2
        labels = {
            0: "0",
            char_rows // 2: fmt.compact_size(model.size // 2),
            char_rows - 1: fmt.compact_size(model.size),
        }
        hover = self.hover_time
        for row in range(char_rows):
            segments = [Segment(labels.get(row, "").rjust(axis) + "┤" if row in labels else " " * axis + "│", _LABEL)]
            if pad > 0:
                segments.append(Segment(" " * pad))
            for ci, grid in enumerate(grids):
                colours = []
                for band in (row * 2, row * 2 + 1):
                    if grid is None:
                        colour = NEVER
                    else:
                        r, w, t = grid[band]
                        colour = heat_colour(r, w, t, peak, NEVER) if r or w or t else NEVER
                    if hover is not None and hover == (ci, band):
                        colour = CURSOR
                    colours.append(colour)
                segments.append(self._half(colours[0], colours[1]))
            lines.append(Strip(segments).simplify().crop_extend(0, width, None))
        while len(lines) < height - 2 - LEGEND_ROWS:
            lines.append(Strip.blank(width))
        span = plot * model.time_column
        axis_line = " " * (axis + 1)
        marks = []
        for frac in (1.0, 0.5):
            seconds = span * frac
            marks.append((axis + 1 + int(plot * (1 - frac)), f"−{seconds:.0f}s"))
        marks.append((axis + plot + 1 - 3, "now"))
        chars = list(axis_line + " " * plot)
        for pos, label in marks:
            for i, ch in enumerate(label):
                if 0 <= pos + i < len(chars):
                    chars[pos + i] = ch
        lines.append(Strip([Segment("".join(chars), _LABEL)]).crop_extend(0, width, None))
        lines.append(self._info_line(width))
        lines.extend(self._legend_lines(width))
        return lines[:height]

    def _time_info(self) -> str:
        if self.hover_time is None:
            return "hover the plot to see a moment's offsets"
        col, band = self.hover_time
        width = self.inner_width
        height = self.inner_height
        _axis, plot, bands = self._time_geometry(width, height)
        columns = self._time_columns(plot)
        if col >= len(columns):
            return ""
        ago = (len(columns) - 1 - col) * self.model.time_column
        band_bytes = -(-self.model.size // bands)
        start = band * band_bytes
        counts = [0, 0, 0]
        rows = self.model.time_rows
        for bucket, c3 in columns[col].items():
            if min(bands - 1, bucket * bands // rows) == band:
                counts = [a + b for a, b in zip(counts, c3)]
        when = "now" if ago == 0 else f"{ago:.0f}s ago"
        end = min(self.model.size, start + band_bytes)
        return (
            f"{when}: {fmt.compact_size(start)}–{fmt.compact_size(end)}  "
            f"read {counts[0]:,} write {counts[1]:,} trim {counts[2]:,} cell touches"
        )

    # -- the line API ---------------------------------------------------------------
    def refresh_heat(self) -> None:
        """The model's heat changed: redraw on the next frame."""
        self._built_for = None
        self.refresh()

    def _ensure_lines(self) -> None:
        width = self.inner_width
        height = self.inner_height
        key = (
            width,
            height,
            self.mode,
            self.cursor,
            self.hover,
            self.hover_time,
            self.has_focus,
            self.model.heat_version,
            self.model.cells,
            self.model.fsmap if self.mode == "structure" else None,  # no __eq__: compared by identity
        )
        if key == self._built_for:
            return
        self._built_for = key
        self.builds += 1
        if width <= 0 or height <= 0:
            self._lines = []
        elif self.mode == "time":
            self._lines = self._build_time(width, height)
        else:
            self._lines = self._build_grid(width, height)

    def render_inner(self, y: int, width: int) -> Strip:
        self._ensure_lines()
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(width)

    # -- interaction -------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != getattr(self, "_last_width", None):
            self._last_width = event.size.width
            self.post_message(self.Resized())

    def watch_mode(self, mode: str) -> None:
        self.hover = None
        self.hover_time = None
        self.pane_title = TITLES.get(mode, "address space")
        self.refresh()

    def action_toggle_mode(self) -> None:
        """heat -> time -> structure -> heat."""
        self.mode = MODES[(MODES.index(self.mode) + 1) % len(MODES)] if self.mode in MODES else MODES[0]

    def action_move(self, dx: int, dy: int) -> None:
        if self.mode == "time":
            return
        if self.cursor is None:
            self.cursor = 0
        else:
            index = self.cursor + dx + dy * self.grid_width
            if 0 <= index < self.cells_shown:
                self.cursor = index
        self.refresh()

    def on_mouse_move(self, event: events.MouseMove) -> None:
        offset = event.get_content_offset(self)
        inner = offset and self.inner_offset(offset.x, offset.y)
        if not inner:
            self.on_leave(None)
            return
        x, y = inner
        if self.mode != "time":
            index = (y * 2) * self.grid_width + x
            self.hover = index if x < self.grid_width and index < self.cells_shown else None
        else:
            width = self.inner_width
            height = self.inner_height
            axis, plot, bands = self._time_geometry(width, height)
            columns = self._time_columns(plot)
            pad = plot - len(columns)
            col = x - axis - 1 - pad
            self.hover_time = (col, y * 2) if 0 <= col < len(columns) and y * 2 < bands else None
        self.refresh()

    def on_leave(self, event: events.Leave | None) -> None:
        if self.hover is not None or self.hover_time is not None:
            self.hover = None
            self.hover_time = None
            self.refresh()

    def on_focus(self) -> None:
        if self.cursor is None:
            self.cursor = 0

    def point_at(self, offset: int) -> int:
        """Put the cursor on the cell holding byte `offset` (tests, the inspector)."""
        self._ensure_lines()
        self.cursor = self.cell_for_offset(offset)
        self.refresh()
        return self.cursor

    def colour_at(self, offset: int) -> RGB:
        """The colour the grid (or the structure view) gives the cell holding byte `offset` (cursor aside)."""
        self._ensure_lines()
        colours = self.structure_colours() if self.mode == "structure" else self.cell_colours()
        return colours[self.cell_for_offset(offset)]
