"""The lab's header: what is served where, its state, humanized totals, and the steering:
recording, replay, the control socket, breakpoints and the filter stack."""

from __future__ import annotations

import os

from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from ..protocol import constants as c
from ..sizes import human_bytes
from . import format as fmt
from .model import LabModel


def header_text(model: LabModel, width: int = 160) -> Text:
    """Three lines: what and where (state first, so it survives truncation), totals, steering."""
    snap = model.snapshot
    compact = width < 130
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" buselab ", style="bold #101418 on #4fb3ff")
    text.append(" ")
    armed = sum(1 for bp in model.breakpoints if bp.enabled)
    if model.stopped:
        text.append(" STOPPED ", style="bold #101418 on #9aa5b1")
    elif model.busy:
        # The stack is being changed: the gate holds requests for that, not for the user.
        text.append(f" ⇄ {model.busy} ", style="bold #101418 on #7fd1b9")
        switching = model.switching
        if switching is not None and switching.total:
            # `position` moves at extent ends, `copied` (data bytes) within one: the larger is nearer.
            copied = switching.copied
            done = 100 * min(1.0, max(switching.position, copied) / switching.total)
            text.append(
                f" {done:.0f}% ({human_bytes(copied)} of data) into {switching.to}",
                style=f"bold {fmt.EVENT_COLOUR}",
            )
        if model.held:
            text.append(f" {len(model.held)} held", style=fmt.HELD_COLOUR)
    elif model.powered_off:
        # Before PAUSED: a dark disk fails everything, held or not, until poweron.
        text.append(" ⚡ POWER OFF ", style=f"bold #101418 on {fmt.ERROR_COLOUR}")
        text.append(" every request fails with EIO until power on (f, o)", style=f"bold {fmt.ERROR_COLOUR}")
    elif model.paused:
        text.append(" ‖ PAUSED ", style="bold #101418 on #ffd75f")
        held = model.held
        if held:
            text.append(
                f" {len(held)} held, oldest {fmt.latency_text(model.oldest_wait())}", style=f"bold {fmt.HELD_COLOUR}"
            )
            caught = next((h.breakpoint for h in held if h.breakpoint is not None), None)
            if caught is not None:
                bp_id = getattr(caught, "id", "?")
                spec = getattr(caught, "spec", "")
                text.append(f" · breakpoint {bp_id} ({spec})", style=f"bold {fmt.ERROR_COLOUR}")
        else:
            text.append(" nothing held yet", style=fmt.HELD_COLOUR)
    else:
        text.append(" ● SERVING ", style="bold #101418 on #8fbf7a")
        if armed:
            text.append(f" {armed} breakpoint{'s' if armed != 1 else ''} armed", style=fmt.HELD_COLOUR)
        if model.held:
            text.append(f" releasing {len(model.held)}", style=fmt.HELD_COLOUR)
    text.append(f"  {short_description(model.backend_description)} ", style="bold #d8dee9")
    text.append(human_bytes(model.disk_size), style="#d8dee9")
    if model.readonly:
        text.append(" read-only", style=f"bold {fmt.HELD_COLOUR}")
    text.append(f"  up {fmt.duration_text(model.uptime())}", style=fmt.DIM_COLOUR)
    clients = snap.connections
    text.append(f"  {clients} client{'s' if clients != 1 else ''}", style=fmt.DIM_COLOUR)
    # Requests read and not yet answered (held ones included), and the most at once lately.
    in_flight, most = model.in_flight, model.max_in_flight
    text.append(", " if not compact else " ", style=fmt.DIM_COLOUR)
    text.append(f"{in_flight:,}", style=f"bold {fmt.HELD_COLOUR if in_flight else '#d8dee9'}")
    text.append(f" in flight (max {most:,})" if not compact else f"/{most:,} in flight", style=fmt.DIM_COLOUR)
    workload = model.workload
    if workload is not None:
        phase = getattr(workload, "phase", "")
        text.append(f"  demo round {workload.rounds + 1}" + (f": {phase}" if phase else ""), style=fmt.DIM_COLOUR)
        errors = getattr(workload, "error_count", None)
        if errors is None:
            errors = len(workload.errors)
        if errors:
            text.append(f" ({errors:,} error{'s' if errors != 1 else ''})", style=fmt.ERROR_COLOUR)
    text.append(f"  {model.transport}: ", style=fmt.DIM_COLOUR)
    text.append(model.where, style="#d8dee9")
    text.append("\n")

    def item(label: str, value: str, colour: str = "#d8dee9") -> None:
        text.append(f" {label} ", style=fmt.DIM_COLOUR)
        text.append(value, style=f"bold {colour}")
        text.append(" " if compact else "  ")

    read_n, write_n = snap.count[c.CMD_READ], snap.count[c.CMD_WRITE]
    if compact:
        item("req", fmt.count_text(model.requests))
        item("R", human_bytes(snap.bytes[c.CMD_READ]), fmt.READ_COLOUR)
        item("W", human_bytes(snap.bytes[c.CMD_WRITE]), fmt.WRITE_COLOUR)
    else:
        item("requests", f"{model.requests:,}")
        item("read", f"{human_bytes(snap.bytes[c.CMD_READ])} ({read_n:,})", fmt.READ_COLOUR)
        item("written", f"{human_bytes(snap.bytes[c.CMD_WRITE])} ({write_n:,})", fmt.WRITE_COLOUR)
    item("flush", fmt.count_text(snap.count[c.CMD_FLUSH]), fmt.OP_COLOURS[c.CMD_FLUSH])
    item("trim", fmt.count_text(snap.count[c.CMD_TRIM]), fmt.TRIM_COLOUR)
    zeroes = snap.count[c.CMD_WRITE_ZEROES]
    if zeroes:
        item("zero", fmt.count_text(zeroes), fmt.OP_COLOURS[c.CMD_WRITE_ZEROES])
    errors = sum(snap.errors)
    item("err" if compact else "errors", f"{errors:,}", fmt.ERROR_COLOUR if errors else "#8fbf7a")
    latest = model.latest
    if latest is not None:
        text.append("│ ", style=fmt.DIM_COLOUR)
        text.append(f"{latest.requests / max(model.sample_every, 1e-9):,.0f}/s ", style="bold #d8dee9")
        text.append("R ", style=fmt.READ_COLOUR)
        text.append(fmt.rate_text(latest.read_bps) + " ", style="#d8dee9")
        text.append("W ", style=fmt.WRITE_COLOUR)
        text.append(fmt.rate_text(latest.write_bps) + " ", style="#d8dee9")
        if latest.requests:
            text.append("p99 ", style=fmt.DIM_COLOUR)
            text.append(fmt.latency_text(latest.p99), style="#d8dee9")
    text.append("\n")
    steering_line(text, model, armed, compact)
    return text


def short_description(description: str) -> str:
    """The backend and its filters by name ("ram (sparse, in memory) + delay"): each filter's
    whole spec is on the steering line already, and a long one pushed the requests in flight
    off the end of the first line."""
    base, *filters = description.split(" + ")
    return " + ".join([base, *(spec.split(":", 1)[0] for spec in filters)])


def steering_line(text: Text, model: LabModel, armed: int, compact: bool) -> None:
    """Recording and replay first (they change), then the control socket, breakpoints, filters."""
    sep = "  " if compact else "   "
    text.append(" ")
    recorder = model.recording
    if recorder is not None:
        text.append(" ● REC ", style=f"bold #101418 on {fmt.REC_COLOUR}")
        text.append(f" {_short_path(recorder.path)} ", style=f"bold {fmt.REC_COLOUR}")
        text.append(f"{fmt.count_text(recorder.sent)} req" + sep, style=fmt.REC_COLOUR)
    replayer = model.replayer
    if replayer is not None:
        total = replayer.total or 0
        done = replayer.done
        summary = replayer.summary
        state = "replaying" if done < total and not summary.stopped else "replayed"
        text.append(f"{state} ", style=fmt.DIM_COLOUR)
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        text.append(f"{done:,}/{total:,}{pct}", style=f"bold {fmt.EVENT_COLOUR}")
        if summary.divergences:
            text.append(f" {summary.divergences:,} diverged", style=f"bold {fmt.ERROR_COLOUR}")
        text.append(sep)
    control = model.control
    text.append("ctl ", style=fmt.DIM_COLOUR)
    if control is None:
        text.append("none", style=fmt.DIM_COLOUR)
    elif control[0] is None:
        text.append("none", style=fmt.HELD_COLOUR)
        if not compact and control[1]:
            text.append(f" ({control[1]})", style=fmt.DIM_COLOUR)
    else:
        text.append(control[0], style="#d8dee9")
    text.append(sep)
    breakpoints = model.breakpoints
    text.append("breakpoints ", style=fmt.DIM_COLOUR)
    if not breakpoints:
        text.append("none", style=fmt.DIM_COLOUR)
    else:
        text.append(f"{armed}/{len(breakpoints)} armed", style=f"bold {fmt.HELD_COLOUR}" if armed else "#d8dee9")
    text.append(sep)
    layers = model.layers
    text.append("filters ", style=fmt.DIM_COLOUR)
    if not layers:
        text.append("none", style=fmt.DIM_COLOUR)
    for i, f in enumerate(reversed(layers)):  # top first, as requests meet them
        if i:
            text.append(" → ", style=fmt.DIM_COLOUR)
        text.append(f.spec, style=f"bold {fmt.EVENT_COLOUR}" if f.enabled else f"strike {fmt.DIM_COLOUR}")


def _short_path(path: str) -> str:
    """A trace path relative to the current directory when it is under it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


class LabHeader(Widget):
    """Three lines, rendered to strips once per change (the line API skips Textual's
    content pipeline, which costs a millisecond a frame for two lines of text). Each
    line is rendered and redrawn only when it changed: under load the request total
    moves every tick, and the other two lines stay as they were."""

    DEFAULT_CSS = """
    LabHeader { height: 3; }
    """

    def __init__(self, model: LabModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self._text = Text()
        self._lines: list[Text] = []
        self._strips: dict[int, Strip] = {}
        self._strips_width = 0

    def update_from_model(self) -> None:
        text = header_text(self.model, self.size.width)
        if text.plain == self._text.plain and text.spans == self._text.spans:
            return
        self._text = text
        lines = text.split("\n")
        old = self._lines
        self._lines = lines
        width = self.size.width
        for y, line in enumerate(lines):
            if y < len(old) and line.plain == old[y].plain and line.spans == old[y].spans:
                continue
            self._strips.pop(y, None)
            self.refresh(Region(0, y, width, 1))
        for y in range(len(lines), len(old)):
            self._strips.pop(y, None)
            self.refresh(Region(0, y, width, 1))

    @property
    def plain(self) -> str:
        return self._text.plain

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._strips_width:
            self._strips_width = width
            self._strips = {}
        strip = self._strips.get(y)
        if strip is None:
            if y >= len(self._lines):
                return Strip.blank(width)
            line = self._lines[y].copy()
            line.no_wrap = True
            line.overflow = "ellipsis"
            line.truncate(width, overflow="ellipsis")
            strip = self._strips[y] = Strip(line.render(self.app.console)).crop_extend(0, width, None)
        return strip
