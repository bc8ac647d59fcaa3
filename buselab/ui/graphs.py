"""Graphs: throughput, IOPS, latency and requests in flight over the last minutes,
drawn in braille; under them, request sizes and the sequential share per op.

One sample a second from the model; each braille character holds two samples
side by side and four dot rows, so a 70-column plot shows 140 seconds. Axes
carry units; the title line of each chart gives the latest values. Lines are
rebuilt only when a sample arrives or the size changes.

The latency is the time requests spent in buselab, from when it read them to
their reply. A client that keeps more requests outstanding than buselab has
read waits longer, in its own queue or the socket, where no server can see:
the in-flight chart's title gives what Little's law makes of that (requests
outstanding / requests per second = the wait of each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

from ..engine.telemetry import ACTIVITY_SECONDS, Activity
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
MAX_FLIGHT_COLOUR = fmt.HELD_COLOUR
MEAN_FLIGHT_COLOUR = "#7fd1b9"


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


def _count_label(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    return f"{v:,.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def _mean_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def queue_text(limits: dict[str, int | str], width: int) -> str:
    """One line of a kernel device's queue limits, as the size and readahead charts need them.

    "queue: requests up to 128K (bigger I/O is split) · readahead 128K · 128 queued · mq-deadline · 512 B sectors"
    """
    if not limits:
        return ""
    parts = []
    if isinstance(limits.get("max_sectors_kb"), int):
        parts.append(f"requests up to {_size_label(int(limits['max_sectors_kb']) * 1024)} (bigger I/O is split)")
    if isinstance(limits.get("read_ahead_kb"), int):
        parts.append(f"readahead {_size_label(int(limits['read_ahead_kb']) * 1024)}")
    if isinstance(limits.get("nr_requests"), int):
        parts.append(f"{limits['nr_requests']} queued")
    if limits.get("scheduler"):
        parts.append(f"scheduler {limits['scheduler']}")
    if isinstance(limits.get("logical_block_size"), int):
        parts.append(f"{limits['logical_block_size']} B blocks")
    text = "queue: " + " · ".join(parts)
    if len(text) > width and parts:
        text = "queue: " + " · ".join(parts[:2]).replace(" (bigger I/O is split)", "")
    return text


def _share(part: int, total: int) -> str:
    """A share in whole percent; "<1%" rather than "0%" for something that happened."""
    pct = 100 * part / total if total else 0.0
    return "<1%" if 0 < pct < 0.5 else f"{pct:.0f}%"


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
        activity = self.model.window
        # Tall panes get four charts and a few lines of sizes and patterns; middling ones fold
        # IOPS into the throughput title; short ones keep throughput and latency.
        if height >= 30:
            charts, pattern_lines = 4, 4
        elif height >= 16:
            charts, pattern_lines = 3, 3
        elif height >= 9:
            charts, pattern_lines = 3, 1
        elif height >= 6:
            charts, pattern_lines = 2, 0
        else:
            charts, pattern_lines = 1, 0
        chart_h = max(2, (height - 1 - pattern_lines) // charts)
        rows = chart_h - 1
        if pattern_lines:  # rows the charts leave go to sizes and patterns
            pattern_lines = max(pattern_lines, height - 1 - charts * chart_h)
        latest = samples[-1] if samples else None
        window = samples[-plot * 2 :]
        lines: list[Strip] = []

        folded = charts in (2, 3)
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
        # Folded, the titles' values carry each op's requests a second too.
        title = "throughput · IOPS" if folded and width >= 60 else "throughput"
        lines += self._chart(
            title, "MB/s, req/s" if folded else "MB/s", [read, write], rows, plot, top, _rate_label, width
        )

        if charts >= 4:
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

        if charts >= 3:
            lines += self._flight_chart(samples, window, latest, rows, plot, width)

        if pattern_lines:
            room = height - 1 - len(lines)
            lines += self._pattern_lines(activity, min(pattern_lines, room) if room > 0 else 0, width)

        while len(lines) < height - 1:
            lines.append(Strip.blank(width))
        lines = lines[: height - 1]
        lines.append(self._time_axis(plot, width))
        return lines

    def _flight_chart(
        self, samples: list[Sample], window: list[Sample], latest: Sample | None, rows: int, plot: int, width: int
    ) -> list[Strip]:
        """Requests in flight, the most at once and on average each second, and Little's law."""
        most = Series(
            "max",
            MAX_FLIGHT_COLOUR,
            [float(s.max_in_flight) for s in samples],
            f"{latest.max_in_flight:,}" if latest else "–",
        )
        mean = Series(
            "mean",
            MEAN_FLIGHT_COLOUR,
            [s.mean_in_flight for s in samples],
            _mean_label(latest.mean_in_flight) if latest else "–",
        )
        extras: list[str] = []
        if latest is not None and latest.requests and latest.max_in_flight >= 2 and latest.mean_in_flight >= 0.5:
            # Little's law: a client keeping N requests outstanding at this rate waits N / rate each.
            # Only while buselab is busy: a client that sends now and then keeps nothing outstanding.
            rate = latest.requests / max(self.model.sample_every, 1e-9)
            n = latest.max_in_flight
            wait = fmt.latency_text(n / rate)
            extras = [
                f"Little: a client keeping {n:,} outstanding at {_count_label(rate)}/s waits {wait}",
                f"Little: {n:,} outstanding ÷ {_count_label(rate)}/s = {wait} each",
                f"Little: {n:,} ÷ {_count_label(rate)}/s = {wait}",
            ]
        top = nice_ceiling(max([float(s.max_in_flight) for s in window] + [4.0]))
        return self._chart("in flight", "requests", [most, mean], rows, plot, top, _count_label, width, extras)

    def _pattern_lines(self, activity: Activity | None, room: int, width: int) -> list[Strip]:
        """Request sizes and the sequential share per op over the last seconds, one op a line
        under a title; one line for every op when there is room for only one."""
        if room <= 0:
            return []
        ops = []
        if activity is not None:
            ops = [(cmd, op) for cmd, op in activity.ops.items() if op.sizes]
            ops.sort(key=lambda item: -sum(item[1].sizes.values()))
        title = f"request sizes (up to) and sequential share, last {ACTIVITY_SECONDS:.0f} s"
        if len(title) > width:
            title = f"sizes · sequential, last {ACTIVITY_SECONDS:.0f} s"
        queue = queue_text(self.model.queue_limits or {}, width)
        if queue and room >= 2:
            # The kernel's side of the sizes: the largest request it sends, its readahead window.
            room -= 1
            head = [Strip([Segment(queue, _AXIS)]).crop_extend(0, width, None)]
            return head + self._pattern_lines_of(ops, title, room, width)
        return self._pattern_lines_of(ops, title, room, width)

    def _pattern_lines_of(self, ops: list, title: str, room: int, width: int) -> list[Strip]:
        if not ops:
            return [Strip([Segment(title + ": no requests", _AXIS)]).crop_extend(0, width, None)]
        if room == 1:
            segments: list[Segment] = []
            for cmd, op in ops:
                segments += self._op_pattern(cmd, op, short=True, sizes=2)
                segments.append(Segment("  "))
            return [Strip(segments).crop_extend(0, width, None)]
        out = [Strip([Segment(title, _TITLE)]).crop_extend(0, width, None)]
        for cmd, op in ops[: room - 1]:
            segments = self._op_pattern(cmd, op, short=False, sizes=4)
            if sum(len(seg.text) for seg in segments) > width:
                segments = self._op_pattern(cmd, op, short=True, sizes=3, name=True)
            out.append(Strip(segments).crop_extend(0, width, None))
        return out

    @staticmethod
    def _op_pattern(cmd: int, op, *, short: bool, sizes: int, name: bool = False) -> list[Segment]:
        """One op's sequential share and most common sizes; `short` for a narrow pane (with
        `name`, the op's name in full rather than its initial)."""
        style = Style.parse(f"bold {fmt.OP_COLOURS.get(cmd, OTHER_COLOUR)}")
        op_name = fmt.op_short(cmd)
        segments = [Segment(op_name[0] if short and not name else f"{op_name:<5}", style)]
        share = op.sequential_share
        segments.append(Segment(" seq " if short else "  sequential ", _AXIS))
        segments.append(Segment("–" if share is None else _share(op.sequential, op.sequential + op.random), _VALUE))
        total = sum(op.sizes.values())
        ranked = sorted(op.sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:sizes]
        segments.append(Segment(" " if short else "  sizes ", _AXIS))
        for i, (bucket, n) in enumerate(ranked):
            if i:
                segments.append(Segment(" · " if not short else " ", _AXIS))
            segments.append(Segment(f"{_size_label(bucket)} ", _VALUE))
            segments.append(Segment(_share(n, total), _AXIS))
        return segments

    def _title(self, title: str, unit: str, series: list[Series], width: int, extras: Sequence[str] = ()) -> Strip:
        """Title, unit and the latest values, then the longest of `extras` that fits; the extra,
        the unit and the names go first when short of room."""
        layouts = [(extra, True, True) for extra in extras] + [(extra, False, True) for extra in extras]
        layouts += [(None, True, True), (None, False, True), (None, False, False)]
        for extra, with_unit, with_names in layouts:
            segments = [Segment(f"{title} ", _TITLE)]
            if with_unit:
                segments.append(Segment(f"({unit}) ", _AXIS))
            for s in series:
                segments.append(Segment(" ━ " if with_names else " ━", s.style))
                if with_names:
                    segments.append(Segment(f"{s.name} ", _AXIS))
                segments.append(Segment(s.latest + " ", _VALUE))
            if extra is not None:
                segments.append(Segment(" " + extra, _AXIS))
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
        extras: Sequence[str] = (),
    ) -> list[Strip]:
        labels = {0: label(top), rows - 1: "0"}
        if rows >= 5:
            labels[(rows - 1) // 2] = label(top / 2) if (rows - 1) % 2 == 0 else labels.get((rows - 1) // 2, "")
            if not labels[(rows - 1) // 2]:
                del labels[(rows - 1) // 2]
        return [self._title(title, unit, series, width, extras)] + self._plot_lines(
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
        return [self._title("latency in buselab", "log scale", series, width)] + self._plot_lines(
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
