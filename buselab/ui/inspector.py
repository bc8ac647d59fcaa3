"""The inspector: one request decoded, with a hexdump of its payload.

Besides finished requests it shows held ones (the request a step released or
a breakpoint caught), with a note saying what happened to it.
"""

from __future__ import annotations

import textwrap
import time
from typing import TYPE_CHECKING

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.strip import Strip

from ..engine.telemetry import PREVIEW_BYTES, RequestRecord
from ..protocol import constants as c
from . import format as fmt
from .pane import Pane
from .stream import LOST_COLOUR

if TYPE_CHECKING:
    from ..engine.gate import HeldRequest

_THUMB = Style.parse("#4a5568")
BLOCK = 4096
SECTOR = 512

_MEANING = {
    c.CMD_READ: "data read from the disk",
    c.CMD_WRITE: "data written to the disk",
    c.CMD_FLUSH: "no data: makes every acknowledged write durable",
    c.CMD_TRIM: "no data: the range is discarded (reads may return zeros)",
    c.CMD_WRITE_ZEROES: "no data: the range becomes zeros",
    c.CMD_CACHE: "no data: a hint that the range will be read soon",
    c.CMD_BLOCK_STATUS: "no data: asks which parts of the range are holes",
}


def record_from_held(item: HeldRequest, *, error: int = 0, now: float | None = None) -> RequestRecord:
    """A held request as a record (seq 0: it has no number until it is answered)."""
    req = item.req
    waited = (now or time.monotonic()) - item.held_since
    payload = req.payload
    preview = bytes(payload[:PREVIEW_BYTES]) if payload is not None else None
    return RequestRecord(
        0,
        time.time() - waited,
        req.cmd,
        req.flags,
        req.offset,
        req.length,
        waited,
        error,
        getattr(item.replier, "number", 0),
        req.handle,
        preview,
    )


def describe_record(
    record: RequestRecord,
    *,
    cell_bytes: int | None = None,
    hex_width: int = 16,
    note: str = "",
    reason: str = "",
    width: int | None = None,
    lost: bool = False,
) -> Text:
    """Everything the stream row abbreviates, and the payload as `hexdump -C` shows it.

    `note`: what the lab did with it (stepped, failed, caught by a breakpoint).
    `reason`: why it failed, as the backend said it (wrapped to `width` columns if given).
    `lost`: a power cut threw its write away (it was answered ok).
    """
    text = Text()
    colour = fmt.OP_COLOURS.get(record.cmd, "white")
    label = "#ffffff"
    text.append(f" {fmt.op_name(record.cmd)} ", style=f"bold #101418 on {colour}")
    held = record.seq == 0
    text.append("  held request" if held else f"  request #{record.seq}", style="bold")
    flags = fmt.flag_names(record.flags)
    if flags:
        text.append("  " + " ".join(flags), style=f"bold {fmt.HELD_COLOUR}")
    if record.error:
        text.append(f"  failed: {fmt.errno_name(record.error)} ({record.error})", style=f"bold {fmt.ERROR_COLOUR}")
    elif lost:
        text.append(" lost ", style=f"bold #101418 on {LOST_COLOUR}")
        text.append("  answered ok, then a power cut threw it away: no FLUSH had sent it down", style=LOST_COLOUR)
    elif not held:
        text.append("  ok", style="#8fbf7a")
    text.append("\n")
    if note:
        text.append(f"▸ {note}\n", style=f"bold {fmt.HELD_COLOUR}")

    def row(name: str, value: str, style: str = "") -> None:
        text.append(f"{name:<9}", style=fmt.DIM_COLOUR)
        text.append(value + "\n", style=style or label)

    if record.error and reason and reason != fmt.errno_name(record.error):
        lines = textwrap.wrap(reason, max(20, width - 9), break_on_hyphens=False) if width else [reason]
        row("why", lines[0], fmt.ERROR_COLOUR)
        for line in lines[1:]:
            row("", line, fmt.ERROR_COLOUR)

    if record.cmd in fmt.RANGED_OPS:
        end = record.offset + record.length
        last = end - 1 if record.length else record.offset
        row("bytes", f"{record.offset:,} – {last:,}  ({fmt.exact_bytes(record.length)})")
        first_block, last_block = record.offset // BLOCK, last // BLOCK
        blocks = f"{first_block:,}" if first_block == last_block else f"{first_block:,} – {last_block:,}"
        aligned = "" if record.offset % BLOCK == 0 and record.length % BLOCK == 0 else "  (not 4 KiB aligned)"
        row("blocks", f"{blocks} of 4 KiB   sectors {record.offset // SECTOR:,} – {last // SECTOR:,}{aligned}")
        if cell_bytes:
            first_cell, last_cell = record.offset // cell_bytes, last // cell_bytes
            cells = f"{first_cell}" if first_cell == last_cell else f"{first_cell} – {last_cell}"
            row("heatmap", f"cell {cells} (a cell is {fmt.iec_size(cell_bytes)})")
    row("handle", f"{record.handle:#018x}   connection {record.conn}")
    waited = "held for" if held else "latency"
    row("arrived", f"{fmt.clock_text(record.time, micro=True)}   {waited} {fmt.latency_text(record.latency)}")
    payload = record.preview
    meaning = _MEANING.get(record.cmd, "")
    if payload is None or record.error:
        if held and record.cmd == c.CMD_READ and not record.error:
            meaning = "not read yet: the data shows once the request is answered"
        row("payload", meaning if not record.error else "none: the request failed, no data went back", fmt.DIM_COLOUR)
        return text
    shown = len(payload)
    what = "read" if record.cmd == c.CMD_READ else "written"
    if shown < record.length:
        row("payload", f"first {shown:,} of {record.length:,} bytes {what}", fmt.DIM_COLOUR)
    else:
        row("payload", f"{record.length:,} bytes {what}", fmt.DIM_COLOUR)
    if not any(payload):
        text.append(f"          all zeros ({shown:,} bytes)\n", style=fmt.DIM_COLOUR)
    for line in fmt.hexdump(payload, base=record.offset, width=hex_width):
        if line == "*" or len(line) <= 10:
            text.append(line + "\n", style=fmt.DIM_COLOUR)
            continue
        text.append(line[:10], style=fmt.DIM_COLOUR)
        bar = line.index("|")
        text.append(line[10:bar], style=colour)
        text.append(line[bar:] + "\n", style="#aeb7c4")
    return text


class Inspector(Pane, can_focus=True):
    """Shows the selected request, or the newest one while the stream follows.

    A line-API widget with its own scroll position, like the stream: showing a
    new request re-renders its own lines and never lays out the screen.
    """

    BINDINGS = [
        Binding("up", "scroll_lines(-1)", "Up", show=False),
        Binding("down", "scroll_lines(1)", "Down", show=False),
        Binding("pageup", "scroll_lines(-10)", "Page up", show=False),
        Binding("pagedown", "scroll_lines(10)", "Page down", show=False),
        Binding("home", "scroll_lines(-100000)", "Top", show=False),
        Binding("end", "scroll_lines(100000)", "Bottom", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.record: RequestRecord | None = None
        self.note = ""
        self.reason = ""  # why the shown request failed, when the backend said
        self.lost = False  # a power cut threw the shown request's write away
        self.cell_bytes: int | None = None
        self.top = 0
        self._text: Text = self._placeholder()
        self._lines: list[Strip] = []
        self._lines_for: tuple | None = None

    @staticmethod
    def _placeholder() -> Text:
        return Text(
            "No request yet. Select one in the stream (↑/↓ or click) to decode it here;\n"
            "while the stream follows, this shows the newest request.\n"
            f"Payloads show their first {PREVIEW_BYTES:,} bytes.",
            style=fmt.DIM_COLOUR,
        )

    def show(self, record: RequestRecord | None, *, cell_bytes: int | None = None, note: str = "") -> None:
        lost = self._lost(record)
        if record is self.record and cell_bytes == self.cell_bytes and note == self.note and lost == self.lost:
            return
        self.record = record
        self.note = note
        self.reason = self._reason(record)
        self.lost = lost
        self.cell_bytes = cell_bytes
        self.top = 0
        self._lines_for = None
        if record is None:
            self.pane_subtitle = ""
        else:
            self.pane_subtitle = f"#{record.seq}" if record.seq else "held"
        self.refresh()

    def _reason(self, record: RequestRecord | None) -> str:
        """Why a failed request failed, from the lab's model (only asked for failed ones)."""
        if record is None or not record.error or not self.is_attached:
            return ""
        failure_reason = getattr(getattr(self.app, "model", None), "failure_reason", None)
        return failure_reason(record) if failure_reason is not None else ""

    def _lost(self, record: RequestRecord | None) -> bool:
        """Whether a power cut threw the request's write away (the lab's model knows)."""
        if record is None or not record.seq or record.error or not self.is_attached:
            return False
        is_lost = getattr(getattr(self.app, "model", None), "is_lost", None)
        return bool(is_lost(record)) if is_lost is not None else False

    def _build(self, width: int) -> list[Strip]:
        if self.record is None:
            text = self._placeholder()
        else:
            text = describe_record(
                self.record,
                cell_bytes=self.cell_bytes,
                hex_width=16 if width >= 79 else 8,
                note=self.note,
                reason=self.reason,
                width=width,
                lost=self.lost,
            )
        self._text = text
        console = self.app.console
        lines = []
        for line in text.split("\n", allow_blank=True):
            line.no_wrap = True
            line.overflow = "ellipsis"
            lines.append(Strip(line.render(console)).crop_extend(0, width, None))
        while lines and not lines[-1].cell_length:
            lines.pop()
        return lines

    def _ensure(self) -> int:
        width = max(1, self.inner_width - 1)
        key = (width, self.record, self.cell_bytes, self.note, self.lost)
        if key != self._lines_for:
            self._lines_for = key
            self._lines = self._build(width)
        return width

    def render_inner(self, y: int, inner_width: int) -> Strip:
        width = self._ensure()
        height = self.inner_height
        total = len(self._lines)
        index = self.top + y
        strip = self._lines[index] if index < total else Strip.blank(width)
        if total > height:
            size = max(1, height * height // total)
            start = (height - size) * self.top // max(1, total - height)
            bar = Segment("▐", _THUMB) if start <= y < start + size else Segment(" ")
        else:
            bar = Segment(" ")
        return Strip([*strip, bar], width + 1)

    def action_scroll_lines(self, delta: int) -> None:
        self._ensure()
        self.top = max(0, min(len(self._lines) - self.inner_height, self.top + delta))
        self.refresh()

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.action_scroll_lines(-3)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.action_scroll_lines(3)

    @property
    def text(self) -> str:
        """Plain text of what is shown (for tests)."""
        if self.record is None:
            return self._placeholder().plain
        return describe_record(
            self.record, cell_bytes=self.cell_bytes, note=self.note, reason=self.reason, lost=self.lost
        ).plain
