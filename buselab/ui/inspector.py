"""The inspector: one request decoded, with a hexdump of its payload.

Besides finished requests it shows held ones (the request a step released or
a breakpoint caught), with a note saying what happened to it. A held request
carries its whole payload (a step keeps it for the answered request too):
the hexdump shows it a KiB at a time, `]` and `[` page, `g` goes to a byte.
A breakpoint's hit opens at the bytes it matched, highlighted (the ext4-sb
preset: the superblock's magic at byte 1080). Answered requests keep only
their first KiB in telemetry; paging past it (`]`, `g`) reads the rest of the
range from the disk as it is now, through the stack the clients see, and says
so: "first 1,024 bytes as the request carried them; the rest is what the disk
holds now". If the disk no longer holds the first KiB the request carried, it
says that the bytes may have changed since.
"""

from __future__ import annotations

import textwrap
import time
from typing import TYPE_CHECKING

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.strip import Strip
from textual.widgets import Input, Static

from ..engine.telemetry import PREVIEW_BYTES, RequestRecord
from ..errors import UserError
from ..protocol import constants as c
from ..sizes import parse_size
from . import format as fmt
from .pane import Pane
from .stream import LOST_COLOUR

if TYPE_CHECKING:
    from ..engine.gate import HeldRequest

_THUMB = Style.parse("#4a5568")
BLOCK = 4096
SECTOR = 512
PAGE_BYTES = 1024  # of a whole payload, shown at a time
MARK_STYLE = f"bold #101418 on {fmt.HELD_COLOUR}"  # the bytes a breakpoint matched, or the byte gone to

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
    payload: bytes | None = None,
    page_start: int = 0,
    mark: tuple[int, int] | None = None,
    where: dict[str, int] | None = None,
    what: str = "",
    run: str = "",
    payload_note: str = "",
) -> Text:
    """Everything the stream row abbreviates, and the payload as `hexdump -C` shows it.

    `note`: what the lab did with it (stepped, failed, caught by a breakpoint).
    `reason`: why it failed, as the backend said it (wrapped to `width` columns if given).
    `lost`: a power cut threw its write away (it was answered ok).
    `payload`: the whole payload, when the lab has it (a held request's): then one page
    of PAGE_BYTES from `page_start` (an offset in the payload) is dumped, with the bytes
    [mark) highlighted. Without it the record's first KiB is.
    `where`: filled with the line numbers of the "payload" row and of the marked row.
    `what`: the structure the request touched, from the disk's map ("ext4 group 3 inode bitmap").
    `run`: the split I/O or readahead run it is part of ("part 3 of 8 of one 1 MiB WRITE, ..."),
    then lines about the queue's limits.
    `payload_note`: where a whole `payload` came from when the request did not carry it all
    (an answered request paged past its first KiB: the disk now).
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

    if what:
        row("what", what, "bold #88c0d0")
    if run:
        run_style = "bold #a3be8c" if "readahead" in run else "bold #b48ead"
        for i, line in enumerate(run.split("\n")):
            row("" if i else "run", line, run_style if not i else fmt.DIM_COLOUR)
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
    whole = payload is not None and len(payload) == record.length and not record.error
    if where is not None:
        where["payload"] = text.plain.count("\n")
    if whole:
        assert payload is not None
        _append_page(text, record, payload, page_start, mark, hex_width, colour, where, payload_note)
        return text
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
        more = " · ] the rest from the disk now" if not held else ""
        row("payload", f"first {shown:,} of {record.length:,} bytes {what}{more}", fmt.DIM_COLOUR)
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


def _append_page(
    text: Text,
    record: RequestRecord,
    payload: bytes,
    start: int,
    mark: tuple[int, int] | None,
    width: int,
    colour: str,
    where: dict[str, int] | None,
    note: str = "",
) -> None:
    """The payload row, and one page of a whole payload as `hexdump -C` lines, [mark) highlighted."""
    length = len(payload)
    start = max(0, min(start, last_row(length, width)))
    end = min(length, start + PAGE_BYTES)
    pages = -(-length // PAGE_BYTES)
    what = "read" if record.cmd == c.CMD_READ else "written"
    label = f"{length:,} bytes {what}"
    if length > PAGE_BYTES:
        label += f" · bytes {start:,}–{end - 1:,} (page {start // PAGE_BYTES + 1} of {pages}: ] [ page, g goes to)"
    text.append(f"{'payload':<9}", style=fmt.DIM_COLOUR)
    text.append(label + "\n", style=fmt.DIM_COLOUR)
    if note:
        text.append(f"{'':<9}", style=fmt.DIM_COLOUR)
        text.append(note + "\n", style=f"italic {fmt.HELD_COLOUR}")
    if mark is not None:
        text.append(f"{'':<9}", style=fmt.DIM_COLOUR)
        text.append(f"bytes {mark[0]:,}–{mark[1] - 1:,} highlighted", style=MARK_STYLE)
        text.append(f" (at {record.offset + mark[0]:#x} on the disk)\n", style=fmt.DIM_COLOUR)
    page = payload[start:end]
    if not any(page):
        text.append(f"          all zeros ({len(page):,} bytes)\n", style=fmt.DIM_COLOUR)
    half = width // 2
    previous: bytes | None = None
    squeezed = False
    for pos in range(start, end, width):
        chunk = payload[pos : min(end, pos + width)]
        marked = mark is not None and mark[0] < pos + width and mark[1] > pos
        if chunk == previous and len(chunk) == width and not marked:
            if not squeezed:
                text.append("*\n", style=fmt.DIM_COLOUR)
                squeezed = True
            continue
        squeezed = False
        previous = chunk
        if marked and where is not None:
            where.setdefault("mark", text.plain.count("\n"))
        text.append(f"{record.offset + pos:08x}  ", style=fmt.DIM_COLOUR)
        hits = [mark is not None and mark[0] <= pos + i < mark[1] for i in range(len(chunk))]
        for i in range(width):
            if i:
                gap = "  " if i == half else " "
                text.append(gap, style=MARK_STYLE if i < len(chunk) and hits[i] and hits[i - 1] else "")
            text.append(
                f"{chunk[i]:02x}" if i < len(chunk) else "  ",
                style=MARK_STYLE if i < len(chunk) and hits[i] else colour,
            )
        text.append("  |", style="#aeb7c4")
        for i, b in enumerate(chunk):
            text.append(chr(b) if 32 <= b < 127 else ".", style=MARK_STYLE if hits[i] else "#aeb7c4")
        text.append("|\n", style="#aeb7c4")
    if squeezed:
        text.append(f"{record.offset + end:08x}\n", style=fmt.DIM_COLOUR)


def last_row(length: int, width: int = 16) -> int:
    """Where the last hexdump row of a `length`-byte payload starts."""
    return max(0, (length - 1) // width * width)


def parse_payload_offset(text: str, record: RequestRecord, length: int) -> int:
    """Where in a payload `g` goes: '1080', '0x438', '4K', 'end', or '@0x100438' (a disk offset)."""
    value = text.strip().lower()
    if not value:
        raise UserError("give a byte: 1080, 0x438, 4K, end, or @OFFSET on the disk")
    if value == "end":
        return max(0, length - 1)
    on_disk = value.startswith("@")
    value = value.lstrip("@").strip()
    try:
        number = int(value, 0)
    except ValueError:
        number = parse_size(value)
    if on_disk:
        number -= record.offset
    if not 0 <= number < length:
        lo, hi = (record.offset, record.offset + length - 1) if on_disk else (0, length - 1)
        raise UserError(f"{text.strip()} is outside the payload: give {lo:,}–{hi:,}")
    return number


class GotoScreen(ModalScreen[int | None]):
    """`g`: which byte of the payload to show (the page starts at its row)."""

    DEFAULT_CSS = """
    GotoScreen { align: center middle; background: #0f1217 55%; }
    GotoScreen > Vertical {
        width: 64; max-width: 94%; height: auto; border: round #4fb3ff; background: #151a21; padding: 0 1;
    }
    GotoScreen Static { width: 100%; color: #7a8391; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, record: RequestRecord, length: int) -> None:
        super().__init__()
        self.record = record
        self.length = length

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "go to a byte of the payload"
            yield Input(placeholder="1080, 0x438, 4K, end, or @0x100438 on the disk", id="offset", compact=True)
            yield Static(
                f"0 – {self.length - 1:,} in the payload; the disk's {self.record.offset:#x} is its 0", id="hint"
            )

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            offset = parse_payload_offset(event.value, self.record, self.length)
        except UserError as exc:
            self.query_one("#hint", Static).update(Text(str(exc), style=f"bold {fmt.ERROR_COLOUR}"))
            return
        self.dismiss(offset)

    def action_cancel(self) -> None:
        self.dismiss(None)


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
        # Named in the pane's bottom edge and its payload row while there are pages (the
        # lab's footer has no room to spare at 80 columns), and in the help.
        Binding("right_square_bracket", "page(1)", "Next KiB", key_display="]", show=False),
        Binding("left_square_bracket", "page(-1)", "Prev KiB", key_display="[", show=False),
        Binding("g", "goto", "Go to byte", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.record: RequestRecord | None = None
        self.note = ""
        self.reason = ""  # why the shown request failed, when the backend said
        self.what = ""  # the structure it touched, from the disk's map
        self.run = ""  # the split I/O or readahead run it is part of
        self.lost = False  # a power cut threw the shown request's write away
        self.cell_bytes: int | None = None
        self.payload: bytes | None = None  # the whole payload, when the lab has it (held requests)
        self.payload_note = ""  # where `payload` came from when the request did not carry it (the disk now)
        self._disk_failed = False
        self.page_start = 0  # where in it the page shown starts
        self.mark: tuple[int, int] | None = None  # bytes of it highlighted: a breakpoint's match
        self._scroll_to: str | None = None  # after the next build: "mark" or "payload" into view
        self._where: dict[str, int] = {}
        self.top = 0
        self._text: Text = self._placeholder()
        self._lines: list[Strip] = []
        self._lines_for: tuple | None = None

    @staticmethod
    def _placeholder() -> Text:
        return Text(
            "No request yet. Select one in the stream (↑/↓ or click) to decode it here;\n"
            "while the stream follows, this shows the newest request.\n"
            f"Answered requests carry their first {PREVIEW_BYTES:,} bytes of payload (] reads the rest from\n"
            "the disk as it is now); held ones (p, k) all of it: ] and [ page, g goes to a byte.",
            style=fmt.DIM_COLOUR,
        )

    def show(
        self,
        record: RequestRecord | None,
        *,
        cell_bytes: int | None = None,
        note: str = "",
        payload: bytes | bytearray | memoryview | None = None,
        mark: tuple[int, int] | None = None,
    ) -> None:
        """Show `record`; with its whole `payload` (a held request's) it pages through all of it,
        opening at the page that holds `mark` (offsets in the payload), highlighted."""
        lost = self._lost(record)
        run = self._run(record)
        whole = bytes(payload) if payload is not None and record is not None and len(payload) == record.length else None
        if whole is None and record is self.record and self.payload_note:
            whole = self.payload  # paged into the disk's bytes: showing the same request keeps them
        if (
            record is self.record
            and run == self.run
            and cell_bytes == self.cell_bytes
            and note == self.note
            and lost == self.lost
            and whole == self.payload
            and mark == self.mark
        ):
            return
        self.record = record
        self.note = note
        self.reason = self._reason(record)
        self.what = self._what(record)
        self.run = run
        self.lost = lost
        self.cell_bytes = cell_bytes
        if whole is not self.payload:
            self.payload_note = ""
        self.payload = whole
        self.mark = mark if whole is not None else None
        self.page_start = mark[0] // 16 * 16 if self.mark is not None else 0
        self._scroll_to = "mark" if self.mark is not None else None
        self.top = 0
        self._lines_for = None
        self._subtitle()
        self.refresh()

    def refresh_run(self) -> None:
        """Say again which run the shown request is part of (runs grow as their requests arrive)."""
        run = self._run(self.record)
        if run != self.run:
            self.run = run
            self.refresh()  # the lines are built again: `run` is part of their key

    def _subtitle(self) -> None:
        record = self.record
        if record is None:
            self.pane_subtitle = ""
            return
        name = f"#{record.seq}" if record.seq else "held"
        payload = self.payload
        if payload is not None and len(payload) > PAGE_BYTES:
            pages = -(-len(payload) // PAGE_BYTES)
            name += f" · page {self.page_start // PAGE_BYTES + 1}/{pages} · ] [ g"
        self.pane_subtitle = name

    def action_page(self, delta: int) -> None:
        """A page (PAGE_BYTES) further into the payload, or back."""
        payload = self.payload if self.payload is not None else self._from_disk()
        if payload is None or self.record is None:
            self._say_whole_payload()
            return
        if delta > 0 and self.page_start + PAGE_BYTES >= len(payload):
            return  # the last byte is on this page already
        start = max(0, min(self.page_start + delta * PAGE_BYTES, last_row(len(payload))))
        if start != self.page_start:
            self._page_to(start)

    def action_goto(self) -> None:
        payload = self.payload if self.payload is not None else self._from_disk()
        record = self.record
        if payload is None or record is None:
            self._say_whole_payload()
            return

        def chosen(offset: int | None) -> None:
            if offset is not None and self.payload is not None:
                self.mark = (offset, offset + 1)
                self._page_to(offset // 16 * 16, scroll="mark")

        self.app.push_screen(GotoScreen(record, len(payload)), chosen)

    def _page_to(self, start: int, scroll: str = "payload") -> None:
        self.page_start = start
        self._scroll_to = scroll
        self._lines_for = None
        self._subtitle()
        self.refresh()

    def _from_disk(self) -> bytes | None:
        """An answered READ or WRITE's whole range as the disk holds it now, to page past the first
        KiB telemetry kept (None: nothing more to show, or the disk cannot be read now)."""
        record = self.record
        preview = record.preview if record is not None else None
        if (
            record is None
            or not record.seq
            or record.error
            or preview is None
            or record.length <= len(preview)
            or record.cmd not in (c.CMD_READ, c.CMD_WRITE)
        ):
            return None
        disk_now = getattr(self.app, "disk_now", None)
        if disk_now is None:
            return None
        try:
            data = bytes(disk_now(record.offset, record.length))
        except Exception as exc:  # noqa: BLE001 - a power cut, an error filter: say why, keep the preview
            self.app.notify(f"cannot read the disk now to show the rest: {exc}", severity="warning", markup=False)
            self._disk_failed = True
            return None
        if len(data) != record.length:
            return None
        kept = len(preview)
        verb = "read" if record.cmd == c.CMD_READ else "wrote"
        if data[:kept] == preview:
            note = (
                f"bytes 0–{kept - 1:,} as the request {verb} them; the rest is what the disk holds now "
                "(the lab keeps only the first KiB of an answered request)"
            )
            data = preview + data[kept:]
        else:
            note = (
                f"the disk no longer holds what this request {verb} in its first {kept:,} bytes: "
                "all of this is what the disk holds now"
            )
        self.payload = data
        self.payload_note = note
        self._lines_for = None
        return data

    def _say_whole_payload(self) -> None:
        if self._disk_failed:
            self._disk_failed = False  # said already, why
            return
        if self.record is not None and self.record.length > PREVIEW_BYTES and self.record.preview is not None:
            self.app.notify(
                f"the lab keeps the first {PREVIEW_BYTES:,} bytes of an answered request; a held one "
                "(p pauses, k breaks) shows all of its payload",
                markup=False,
            )

    def _reason(self, record: RequestRecord | None) -> str:
        """Why a failed request failed, from the lab's model (only asked for failed ones)."""
        if record is None or not record.error or not self.is_attached:
            return ""
        failure_reason = getattr(getattr(self.app, "model", None), "failure_reason", None)
        return failure_reason(record) if failure_reason is not None else ""

    def _what(self, record: RequestRecord | None) -> str:
        """What the request touched, from the lab's model ("" when the disk's map knows nothing)."""
        if record is None or not self.is_attached:
            return ""
        what = getattr(getattr(self.app, "model", None), "what", None)
        return what(record) if what is not None else ""

    def _run(self, record: RequestRecord | None) -> str:
        """The run the request is part of, from the lab ("" when none, or not in a lab)."""
        if record is None or not record.seq or not self.is_attached:
            return ""
        run_text = getattr(self.app, "run_text", None)
        return run_text(record) if run_text is not None else ""

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
                what=self.what,
                run=self.run,
                payload_note=self.payload_note,
                width=width,
                lost=self.lost,
                payload=self.payload,
                page_start=self.page_start,
                mark=self.mark,
                where=(where := {}),
            )
            self._where = where
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
        key = (
            width,
            self.record,
            self.run,
            self.cell_bytes,
            self.note,
            self.lost,
            self.page_start,
            self.mark,
            self.payload_note,
        )
        if key != self._lines_for:
            self._lines_for = key
            self._lines = self._build(width)
            scroll, self._scroll_to = self._scroll_to, None
            line = self._where.get(scroll or "")
            if line is not None:
                # The marked row (or the page) into view: near the top, the rows above it for context.
                height = self.inner_height
                if scroll == "mark" and line < height - 1:
                    line = 0
                elif scroll == "mark":
                    line -= max(0, min(3, height // 3))
                self.top = max(0, min(len(self._lines) - height, line))
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
            self.record,
            cell_bytes=self.cell_bytes,
            note=self.note,
            reason=self.reason,
            what=self.what,
            run=self.run,
            payload_note=self.payload_note,
            lost=self.lost,
            payload=self.payload,
            page_start=self.page_start,
            mark=self.mark,
        ).plain

    @property
    def screen_text(self) -> str:
        """What the pane shows now, scrolled as it is (for tests)."""
        self._ensure()
        return "\n".join(strip.text for strip in self._lines[self.top : self.top + self.inner_height])
