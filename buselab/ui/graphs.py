"""Graphs: throughput, IOPS and latency over the last minutes, drawn in braille.

One sample a second from the model; each braille character holds two samples
side by side and four dot rows, so a 70-column plot shows 140 seconds. Axes
carry units; the title line of each chart gives the latest values. Lines are
rebuilt only when a sample arrives or the size changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from . import format as fmt
from .model import LabModel, Sample, nice_ceiling
from .pane import Pane

# Dot bits of a braille cell, [dot row from the top][dot column].
_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
AXIS_WIDTH = 9

_AXIS = Style.parse(fmt.DIM_COLOUR)
_TITLE = Style.parse("bold #d8dee9")
_VALUE = Style.parse("#d8dee9")
P50_COLOUR = "#8fbf7a"
P99_COLOUR = fmt.ERROR_COLOUR
OTHER_COLOUR = fmt.TRIM_COLOUR


class Series:
    def __init__(self, name: str, colour: str, values: Sequence[float | None], latest: str) -> None:
        self.name = name
        self.colour = colour
        self.style = Style.parse(colour)
        self.values = values
        self.latest = latest


def braille_plot(
    series: list[Series], rows: int, cols: int, to_unit: Callable[[float], float]
) -> list[list[tuple[str, Style | None]]]:
    """Rows of (char, style) cells; values mapped by `to_unit` into [0, 1]."""
    dots_y = rows * 4
    owner = [[[0] * len(series) for _ in range(cols)] for _ in range(rows)]
    bits = [[0] * cols for _ in range(rows)]
    for si, s in enumerate(series):
        values = list(s.values)[-cols * 2 :]
        offset = cols * 2 - len(values)
        previous: int | None = None
        for i, v in enumerate(values):
            if v is None:
                previous = None
                continue
            x = offset + i
            y = max(0, min(dots_y - 1, round(to_unit(v) * (dots_y - 1))))
            lo, hi = (y, y) if previous is None else (min(previous, y), max(previous, y))
            # Connect to the previous sample so steep changes read as lines.
            for yy in range(lo, hi + 1):
                row_from_top = dots_y - 1 - yy
                cy, dy = divmod(row_from_top, 4)
                cx, dx = divmod(x, 2)
                bits[cy][cx] |= _BITS[dy][dx]
                owner[cy][cx][si] += 1
            previous = y
    out: list[list[tuple[str, Style | None]]] = []
    for cy in range(rows):
        line = []
        for cx in range(cols):
            b = bits[cy][cx]
            if not b:
                line.append((" ", None))
                continue
            counts = owner[cy][cx]
            best = max(range(len(series)), key=lambda i: (counts[i], i))
            line.append((chr(0x2800 + b), series[best].style))
        out.append(line)
    return out


def _rate_label(v: float) -> str:
    return f"{v / 1e6:.0f}" if v >= 10e6 else f"{v / 1e6:.1f}" if v >= 1e6 or v == 0 else f"{v / 1e6:.2f}"


def _iops_label(v: float) -> str:
    return f"{v / 1000:.0f}k" if v >= 10_000 else f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _latency_label(seconds: float) -> str:
    us = seconds * 1e6
    if us < 1000:
        return f"{us:.0f}µs"
    if us < 1e6:
        return f"{us / 1000:.0f}ms"
    return f"{us / 1e6:.0f}s"


class Graphs(Pane):
    """Three stacked charts over the model's samples."""

    def __init__(self, model: LabModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self._lines: list[Strip] = []
        self._built_for: tuple | None = None
        self.builds = 0

    def refresh_graphs(self) -> None:
        self.refresh()

    def render_inner(self, y: int, width: int) -> Strip:
        height = self.inner_height
        key = (width, height, len(self.model.samples), self.model.latest)
        if key != self._built_for:
            self._built_for = key
            self.builds += 1
            self._lines = self.build(width, height)
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(width)

    # -- building -------------------------------------------------------------------
    def build(self, width: int, height: int) -> list[Strip]:
        samples: list[Sample] = list(self.model.samples)
        plot = max(4, width - AXIS_WIDTH)
        # Three charts need room for a few rows each; short panes fold IOPS
        # into the throughput title and keep latency.
        charts = 3 if height >= 16 else 2 if height >= 6 else 1
        chart_h = max(2, (height - 1) // charts)
        rows = chart_h - 1
        latest = samples[-1] if samples else None
        window = samples[-plot * 2 :]
        lines: list[Strip] = []

        folded = charts == 2
        read = Series(
            "read",
            fmt.READ_COLOUR,
            [s.read_bps for s in samples],
            (fmt.rate_text(latest.read_bps) + (f" {latest.read_iops:,.0f}/s" if folded else "")) if latest else "–",
        )
        write = Series(
            "write",
            fmt.WRITE_COLOUR,
            [s.write_bps for s in samples],
            (fmt.rate_text(latest.write_bps) + (f" {latest.write_iops:,.0f}/s" if folded else "")) if latest else "–",
        )
        top = nice_ceiling(max([s.read_bps for s in window] + [s.write_bps for s in window] + [1e5]))
        lines += self._chart("throughput", "MB/s", [read, write], rows, plot, top, _rate_label, width)

        if charts >= 3:
            r_iops = Series(
                "read", fmt.READ_COLOUR, [s.read_iops for s in samples], f"{latest.read_iops:,.0f}/s" if latest else "–"
            )
            w_iops = Series(
                "write",
                fmt.WRITE_COLOUR,
                [s.write_iops for s in samples],
                f"{latest.write_iops:,.0f}/s" if latest else "–",
            )
            o_iops = Series(
                "other", OTHER_COLOUR, [s.other_iops for s in samples], f"{latest.other_iops:,.0f}/s" if latest else "–"
            )
            top = nice_ceiling(max([max(s.read_iops, s.write_iops, s.other_iops) for s in window] + [10]))
            lines += self._chart("IOPS", "req/s", [r_iops, w_iops, o_iops], rows, plot, top, _iops_label, width)

        if charts >= 2:
            p50 = Series(
                "p50",
                P50_COLOUR,
                [s.p50 if s.requests else None for s in samples],
                fmt.latency_text(latest.p50) if latest and latest.requests else "–",
            )
            p99 = Series(
                "p99",
                P99_COLOUR,
                [s.p99 if s.requests else None for s in samples],
                fmt.latency_text(latest.p99) if latest and latest.requests else "–",
            )
            lines += self._latency_chart([p50, p99], rows, plot, window, width)

        while len(lines) < height - 1:
            lines.append(Strip.blank(width))
        lines = lines[: height - 1]
        lines.append(self._time_axis(plot, width))
        return lines

    def _title(self, title: str, unit: str, series: list[Series], width: int) -> Strip:
        """Title, unit and the latest values; the unit and names go first when short of room."""
        for with_unit, with_names in ((True, True), (False, True), (False, False)):
            segments = [Segment(f"{title} ", _TITLE)]
            if with_unit:
                segments.append(Segment(f"({unit}) ", _AXIS))
            for s in series:
                segments.append(Segment(" ━ " if with_names else " ━", s.style))
                if with_names:
                    segments.append(Segment(f"{s.name} ", _AXIS))
                segments.append(Segment(s.latest + " ", _VALUE))
            if sum(len(seg.text) for seg in segments) <= width:
                break
        return Strip(segments).crop_extend(0, width, None)

    def _plot_lines(
        self,
        series: list[Series],
        rows: int,
        plot: int,
        to_unit: Callable[[float], float],
        labels: dict[int, str],
        width: int,
    ) -> list[Strip]:
        cells = braille_plot(series, rows, plot, to_unit)
        out = []
        for r, line in enumerate(cells):
            label = labels.get(r)
            axis = (label.rjust(AXIS_WIDTH - 1) + "┤") if label is not None else " " * (AXIS_WIDTH - 1) + "│"
            segments = [Segment(axis, _AXIS)]
            segments.extend(Segment(ch, st) for ch, st in line)
            out.append(Strip(segments).simplify().crop_extend(0, width, None))
        return out

    def _chart(
        self,
        title: str,
        unit: str,
        series: list[Series],
        rows: int,
        plot: int,
        top: float,
        label: Callable[[float], str],
        width: int,
    ) -> list[Strip]:
        labels = {0: label(top), rows - 1: "0"}
        if rows >= 5:
            labels[(rows - 1) // 2] = label(top / 2) if (rows - 1) % 2 == 0 else labels.get((rows - 1) // 2, "")
            if not labels[(rows - 1) // 2]:
                del labels[(rows - 1) // 2]
        return [self._title(title, unit, series, width)] + self._plot_lines(
            series, rows, plot, lambda v: v / top, labels, width
        )

    def _latency_chart(
        self, series: list[Series], rows: int, plot: int, window: list[Sample], width: int
    ) -> list[Strip]:
        values = [s.p50 for s in window if s.requests and s.p50 > 0] + [
            s.p99 for s in window if s.requests and s.p99 > 0
        ]
        lo_exp = math.floor(math.log10(min(values))) if values else -5
        hi_exp = math.ceil(math.log10(max(values))) if values else -3
        if hi_exp - lo_exp < 2:
            hi_exp = lo_exp + 2
        span = hi_exp - lo_exp

        def to_unit(v: float) -> float:
            return (math.log10(max(v, 1e-9)) - lo_exp) / span

        labels: dict[int, str] = {}
        for e in range(lo_exp, hi_exp + 1):
            r = round((1 - (e - lo_exp) / span) * (rows - 1))
            labels.setdefault(r, _latency_label(10.0**e))
        return [self._title("latency", "log scale", series, width)] + self._plot_lines(
            series, rows, plot, to_unit, labels, width
        )

    def _time_axis(self, plot: int, width: int) -> Strip:
        seconds_per_char = 2 * self.model.sample_every
        span = plot * seconds_per_char
        # Ticks at least 9 characters apart, at a round number of seconds.
        step = next((s for s in (10, 15, 30, 60, 120, 300, 600) if s / seconds_per_char >= 9), 900)
        chars = list(" " * (AXIS_WIDTH - 1) + "└" + "─" * plot)
        end = len(chars)
        for i, ch in enumerate("now"):
            chars[end - 3 + i] = ch
        ago = step
        while ago < span:
            x = AXIS_WIDTH + plot - 1 - int(ago / seconds_per_char)
            text = f"-{ago // 60}m" if ago % 60 == 0 else f"-{ago}s"
            if x - 1 <= AXIS_WIDTH or x + 1 + len(text) > end - 4:
                ago += step
                continue
            chars[x] = "┴"
            for i, ch in enumerate(text):
                chars[x + 1 + i] = ch
            ago += step
        return Strip([Segment("".join(chars), _AXIS)]).crop_extend(0, width, None)
