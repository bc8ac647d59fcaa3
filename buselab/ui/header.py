"""The lab's header: what is served where, its state, and humanized totals."""

from __future__ import annotations

from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from ..protocol import constants as c
from ..sizes import human_bytes
from . import format as fmt
from .model import LabModel


def header_text(model: LabModel, width: int = 160) -> Text:
    """Two lines: what and where (state first, so it survives truncation), then totals."""
    session = model.session
    engine = session.engine
    snap = model.snapshot
    gate = engine.gate
    compact = width < 130
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" buselab ", style="bold #101418 on #4fb3ff")
    text.append(" ")
    if session.stopped:
        text.append(" STOPPED ", style="bold #101418 on #9aa5b1")
    elif getattr(gate, "halted", gate.paused):
        text.append(" ‖ PAUSED ", style="bold #101418 on #ffd75f")
        held = model.held
        if held:
            text.append(
                f" {len(held)} held, oldest {fmt.latency_text(gate.oldest_wait())}", style=f"bold {fmt.HELD_COLOUR}"
            )
        else:
            text.append(" nothing held yet", style=fmt.HELD_COLOUR)
    else:
        text.append(" ● SERVING ", style="bold #101418 on #8fbf7a")
        if gate.paused:  # not halted: breakpoints are armed
            text.append(" breakpoints armed", style=fmt.HELD_COLOUR)
        if model.held:
            text.append(f" releasing {len(model.held)}", style=fmt.HELD_COLOUR)
    text.append(f"  {session.backend.describe()} ", style="bold #d8dee9")
    text.append(human_bytes(engine.size), style="#d8dee9")
    if engine.readonly or session.backend.readonly:
        text.append(" read-only", style=f"bold {fmt.HELD_COLOUR}")
    text.append(f"  up {fmt.duration_text(model.uptime())}", style=fmt.DIM_COLOUR)
    clients = snap.connections
    text.append(f"  {clients} client{'s' if clients != 1 else ''}", style=fmt.DIM_COLOUR)
    workload = session.demo_workload
    if workload is not None:
        phase = getattr(workload, "phase", "")
        text.append(f"  demo round {workload.rounds + 1}" + (f": {phase}" if phase else ""), style=fmt.DIM_COLOUR)
        if workload.errors:
            text.append(f" ({len(workload.errors)} errors)", style=fmt.ERROR_COLOUR)
    text.append(f"  {session.transport}: ", style=fmt.DIM_COLOUR)
    text.append(session.where, style="#d8dee9")
    text.append("\n")

    def item(label: str, value: str, colour: str = "#d8dee9") -> None:
        text.append(f" {label} ", style=fmt.DIM_COLOUR)
        text.append(value, style=f"bold {colour}")
        text.append(" " if compact else "  ")

    read_n, write_n = snap.count[c.CMD_READ], snap.count[c.CMD_WRITE]
    if compact:
        item("req", fmt.count_text(snap.total_requests))
        item("R", human_bytes(snap.bytes[c.CMD_READ]), fmt.READ_COLOUR)
        item("W", human_bytes(snap.bytes[c.CMD_WRITE]), fmt.WRITE_COLOUR)
    else:
        item("requests", f"{snap.total_requests:,}")
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
    return text


class LabHeader(Widget):
    """Two lines, rendered to strips once per change (the line API skips Textual's
    content pipeline, which costs a millisecond a frame for two lines of text)."""

    DEFAULT_CSS = """
    LabHeader { height: 2; }
    """

    def __init__(self, model: LabModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self._text = Text()
        self._strips: list[Strip] = []
        self._strips_for: tuple | None = None

    def update_from_model(self) -> None:
        text = header_text(self.model, self.size.width)
        if text.plain != self._text.plain:
            self._text = text
            self._strips_for = None
            self.refresh()

    @property
    def plain(self) -> str:
        return self._text.plain

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self._strips_for != (width, self._text.plain):
            self._strips_for = (width, self._text.plain)
            console = self.app.console
            self._strips = []
            for line in self._text.split("\n"):
                line.no_wrap = True
                line.overflow = "ellipsis"
                line.truncate(width, overflow="ellipsis")
                self._strips.append(Strip(line.render(console)).crop_extend(0, width, None))
        return self._strips[y] if y < len(self._strips) else Strip.blank(width)
