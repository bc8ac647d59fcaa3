"""The request stream: one row per request, drawn with the line API.

Like toolong's log view, the widget keeps its rows (plain `RequestRecord`s, no
widgets and no text) in a bounded deque and renders only the lines on screen,
caching each rendered row. At tens of thousands of requests a second the model
hands over at most `rows_per_tick` records per tick and a `Gap` for the rest,
which becomes one "+N more" row: the stream coalesces instead of falling behind.

The engine's events (pause, resume, a step, a breakpoint hit, a filter added,
a backend switch, a power cut, recording started) are rows too, in their
place in time, whatever op filter is on. A write that a power cut threw away
says "lost" instead of "ok" (the lab hands the stream the lost requests'
numbers: `lost_source`).

Requests that belong together (one application I/O the kernel split at the queue's
max_sectors_kb, a readahead run of growing sequential READs) are bracketed in a narrow
"run" column (┌ │ └), and the run's last row says what the run was in its "what" cell:
"└ one 1 MiB WRITE, split by the kernel into 8 × 128 KiB". The lab finds the runs once per
tick (`RunTracker`) and hands them over through `run_source`.

Besides the op groups (keys 1-5), a typed filter (`/`: `struct=journal`, `op=write`,
`struct=inode-table,op=read`, the breakpoints' vocabulary) narrows the rows: `row_filter`.
Event rows and "+N more" rows always stay.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip

from ..engine.runs import Run
from ..engine.telemetry import RequestRecord
from ..protocol import constants as c
from . import format as fmt
from .model import Gap
from .pane import Pane

if TYPE_CHECKING:
    from ..engine.gate import HeldRequest


class EventRow(NamedTuple):
    """Something that happened to the device rather than a request."""

    time: float  # wall clock
    message: str
    number: int  # the stream's own count: a unique cache key


Row = RequestRecord | Gap | EventRow

# Filterable op groups, in the order of the 1..5 keys.
OP_GROUPS: tuple[tuple[str, frozenset[int]], ...] = (
    ("READ", frozenset({c.CMD_READ})),
    ("WRITE", frozenset({c.CMD_WRITE})),
    ("FLUSH", frozenset({c.CMD_FLUSH})),
    ("TRIM", frozenset({c.CMD_TRIM})),
    ("OTHER", frozenset({c.CMD_WRITE_ZEROES, c.CMD_CACHE, c.CMD_BLOCK_STATUS, c.CMD_DISC})),
)


class Column(NamedTuple):
    name: str
    title: str
    width: int
    right: bool


ALL_COLUMNS = (
    Column("seq", "seq", 7, True),
    Column("time", "time", 12, False),
    Column("op", "op", 5, False),
    Column("offset", "offset", 13, True),
    Column("length", "length", 6, True),
    Column("flags", "flags", 7, False),
    Column("latency", "latency", 8, True),
    Column("result", "result", 8, False),
    Column("run", "", 1, False),  # ┌ │ └: the rows of one split I/O or readahead run
)
# Dropped first when the stream is narrow (runs' brackets before the flags: FUA matters more).
DROP_ORDER = ("time", "run", "flags", "seq", "result")
MIN_WHAT = 12  # the "what" column (the structure a request touches) only with room for this much
WANT_WHAT = 32  # ... and when the disk holds something known, room for "ext4 group 3 inode bitmap"


def columns_for_width(
    width: int, offset_width: int = 13, want_what: bool = False, want_runs: bool = False
) -> tuple[Column, ...]:
    """The columns that fit `width`; offsets get as many digits as the device needs.

    What is left over goes to "what": the structure each request touches, from the disk's map.
    With `want_what` (the map knows the disk, or runs were seen) the time column gives way to it.
    The runs' bracket column is there only `want_runs` (some run was seen).
    """
    columns = [
        col._replace(width=max(6, offset_width)) if col.name == "offset" else col
        for col in ALL_COLUMNS
        if want_runs or col.name != "run"
    ]
    for name in DROP_ORDER:
        if sum(col.width + 1 for col in columns) <= width:
            break
        columns = [col for col in columns if col.name != name]
    left = width - sum(col.width + 1 for col in columns) - 1
    if want_what and left < WANT_WHAT and any(col.name == "time" for col in columns):
        columns = [col for col in columns if col.name != "time"]
        left = width - sum(col.width + 1 for col in columns) - 1
    if left >= MIN_WHAT:
        columns.append(Column("what", "what", left, False))
    return tuple(columns)


_STYLE_CACHE: dict[str, Style] = {}


def style(spec: str) -> Style:
    cached = _STYLE_CACHE.get(spec)
    if cached is None:
        cached = _STYLE_CACHE[spec] = Style.parse(spec)
    return cached


OP_STYLES = {cmd: style(f"bold {colour}") for cmd, colour in fmt.OP_COLOURS.items()}
DIM = style(fmt.DIM_COLOUR)
PLAIN = style("#d8dee9")
OK_STYLE = style("#6c8a5e")
ERR_STYLE = style(f"bold {fmt.ERROR_COLOUR}")
HELD_STYLE = style(f"bold {fmt.HELD_COLOUR}")
GAP_STYLE = style(f"italic {fmt.DIM_COLOUR}")
HEADER_STYLE = style("bold #aeb7c4 underline")
CURSOR_BG = Style(bgcolor="#2e4a6e")
CURSOR_BG_BLUR = Style(bgcolor="#2a3342")
SCROLL_THUMB = style("#4a5568")
SLOW_STYLE = style("#ffd75f")
VERY_SLOW_STYLE = style(f"bold {fmt.ERROR_COLOUR}")
EVENT_STYLE = style(f"bold {fmt.EVENT_COLOUR}")
EVENT_TIME_STYLE = style(fmt.EVENT_COLOUR)
LOST_COLOUR = "#ff005f"  # a write a power cut threw away (the client was told ok); the heatmap's lost cells too
LOST_STYLE = style(f"bold #101418 on {LOST_COLOUR}")
WHAT_STYLE = style("#88c0d0")
RUN_STYLES = {"split": style("bold #b48ead"), "readahead": style("bold #a3be8c")}


def run_marker(run: Run, seq: int) -> str:
    """The bracket of a run's row: ┌ first, │ between, └ last."""
    if seq == run.seqs[-1]:
        return "└"
    return "┌" if seq == run.seqs[0] else "│"


def _cell(text: str, col: Column) -> str:
    if len(text) > col.width:
        text = text[: col.width - 1] + "…"
    return text.rjust(col.width) if col.right else text.ljust(col.width)


def join_cells(parts: list[tuple[str, Style]], width: int) -> Strip:
    """One row from (text, style) cells: same-style neighbours share a segment.

    Every character the stream prints is one cell wide, so len() is the cell
    length and the strip is built at its final width without measuring.
    """
    segments: list[Segment] = []
    acc: list[str] = []
    acc_style: Style | None = None
    used = 0
    for text, st in parts:
        if st is not acc_style and acc:
            segments.append(Segment("".join(acc), acc_style))
            acc = []
        acc_style = st
        acc.append(text)
        acc.append(" ")
        used += len(text) + 1
    if acc:
        segments.append(Segment("".join(acc), acc_style))
    if used < width:
        # Pad inside the last segment rather than adding one more.
        last = segments.pop()
        segments.append(Segment(last.text + " " * (width - used), last.style))
        return Strip(segments, width)
    return Strip(segments, used).crop(0, width)


def record_cells(
    record: RequestRecord, columns: Iterable[Column], lost: bool = False, what: str = "", run: Run | None = None
) -> list[tuple[str, Style]]:
    """The (text, style) cells of one request row; `lost`: a power cut threw its write away;
    `what`: the structure it touched ("ext4 group 3 inode bitmap"); `run`: the split I/O or
    readahead run it belongs to (bracketed; its last row says what the run was instead of `what`)."""
    ranged = record.cmd in fmt.RANGED_OPS
    run_style = RUN_STYLES[run.kind] if run is not None else PLAIN
    if run is not None and record.seq == run.seqs[-1]:
        what = run.describe()
        for col in columns:
            if col.name == "what" and len(what) > col.width:
                what = run.brief()  # the stream's half of a 160-column lab: the short form
    parts: list[tuple[str, Style]] = []
    for col in columns:
        name = col.name
        if name == "seq":
            part = (_cell(str(record.seq), col), DIM)
        elif name == "time":
            part = (_cell(fmt.clock_text(record.time), col), DIM)
        elif name == "op":
            part = (_cell(fmt.op_short(record.cmd), col), OP_STYLES.get(record.cmd, PLAIN))
        elif name == "offset":
            part = (_cell(str(record.offset) if ranged else "", col), PLAIN)
        elif name == "length":
            part = (_cell(fmt.compact_size(record.length) if ranged else "", col), PLAIN)
        elif name == "flags":
            # Unflagged rows keep the plain style so the row stays a few segments long.
            part = (_cell(fmt.flags_short(record.flags), col), HELD_STYLE) if record.flags else (" " * col.width, PLAIN)
        elif name == "latency":
            latency = record.latency
            lat_style = VERY_SLOW_STYLE if latency >= 0.1 else SLOW_STYLE if latency >= 0.01 else PLAIN
            part = (_cell(fmt.latency_text(latency), col), lat_style)
        elif name == "what":
            part = (_cell(what, col), run_style if run is not None and record.seq == run.seqs[-1] else WHAT_STYLE)
        elif name == "run":
            part = (run_marker(run, record.seq), run_style) if run is not None else (" ", PLAIN)
        elif record.error:  # result
            part = (_cell(fmt.errno_name(record.error), col), ERR_STYLE)
        elif lost:
            part = (_cell("lost", col), LOST_STYLE)
        else:
            part = (_cell("ok", col), OK_STYLE)
        parts.append(part)
    return parts


def held_cells(held: HeldRequest, columns: Iterable[Column], now: float) -> list[tuple[str, Style]]:
    """A request the gate is holding: it has no seq yet, only a wait."""
    req = held.req
    ranged = req.cmd in fmt.RANGED_OPS
    wait = now - held.held_since
    arrived = time.time() - wait
    parts: list[tuple[str, Style]] = []
    for col in columns:
        name = col.name
        if name == "seq":
            part = (_cell("held", col), HELD_STYLE)
        elif name == "time":
            part = (_cell(fmt.clock_text(arrived), col), DIM)
        elif name == "op":
            part = (_cell(fmt.op_short(req.cmd), col), OP_STYLES.get(req.cmd, PLAIN))
        elif name == "offset":
            part = (_cell(str(req.offset) if ranged else "", col), PLAIN)
        elif name == "length":
            part = (_cell(fmt.compact_size(req.length) if ranged else "", col), PLAIN)
        elif name == "flags":
            part = (_cell(fmt.flags_short(req.flags), col), HELD_STYLE)
        elif name == "latency":
            part = (_cell(fmt.latency_text(wait), col), HELD_STYLE)
        elif name in ("what", "run"):
            part = (" " * col.width, PLAIN)  # known once it is answered (the inspector says it now)
        else:
            part = (_cell("break" if getattr(held, "breakpoint", None) else "waiting", col), HELD_STYLE)
        parts.append(part)
    return parts


class RequestStream(Pane, can_focus=True):
    """Every request, newest at the bottom; follows unless you scroll or select.

    A plain line-API widget that keeps its own scroll position: changing a
    ScrollView's virtual size or offset makes Textual lay out the whole screen,
    and at 12 ticks a second under load that costs the server real throughput.
    """

    BINDINGS = [
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "follow", "Follow", show=False),
        Binding("l", "toggle_follow", "Live"),
    ]

    follow: reactive[bool] = reactive(True)
    """Keep the newest request in view (and in the inspector)."""

    class Selected(Message):
        """The cursor moved to a request (None: following the newest)."""

        def __init__(self, record: RequestRecord | None) -> None:
            super().__init__()
            self.record = record

    def __init__(self, *, capacity: int = 10_000, device_size: int = 1 << 40, id: str | None = None) -> None:
        super().__init__(id=id)
        self.capacity = capacity
        self.offset_width = len(str(max(0, device_size - 1)))
        self._all: deque[Row] = deque(maxlen=capacity)
        self._view: deque[Row] = deque(maxlen=capacity)
        self._dropped = 0  # rows that fell off the front of _view (keeps indexes absolute)
        self._total_appended = 0
        self.top = 0  # index in _view of the first row on screen
        self.hidden_ops: frozenset[int] = frozenset()
        self.cursor: int | None = None  # absolute index into the view
        self.held: list[HeldRequest] = []
        self._cache: dict[int, Strip] = {}
        self._columns: tuple[Column, ...] = ALL_COLUMNS
        self._width = 0
        self._held_now = time.monotonic()
        self.rows_added = 0
        self.gaps_added = 0
        self.events_added = 0
        # The numbers of requests a power cut threw away, asked once per tick (the lab's model).
        self.lost_source: Callable[[], frozenset[int]] = frozenset
        self.lost: frozenset[int] = frozenset()
        # What a request touched, from the disk's map (the lab's model); "" when nothing known.
        self.what_source: Callable[[RequestRecord], str] = lambda record: ""
        self.want_what = False  # the disk holds something the map knows: make room for "what"
        self.want_runs = False  # a run was seen: the bracket column is drawn
        # The split I/O or readahead run a request belongs to (the lab's RunTracker), by seq.
        self.run_source: Callable[[int], Run | None] = lambda seq: None
        # A typed filter (`/`): only requests it passes are rows; None shows every request.
        self.row_filter: Callable[[RequestRecord], bool] | None = None

    # -- data ------------------------------------------------------------------
    def add(
        self,
        records: list[RequestRecord],
        gap: Gap | None = None,
        held: list | None = None,
        events: list[tuple[float, str]] | None = None,
    ) -> None:
        """Append one tick's rows; called by the app's timer, never per request."""
        held = held if held is not None else self.held
        if not records and gap is None and not held and not self.held and not events:
            return
        lost = self.lost_source()
        if lost is not self.lost:
            self.mark_lost(lost)
        requests = len(records)
        if events:
            records = self._merge_events(records, events)
        view = self._view
        appended = 0
        if gap is not None:
            self._all.append(gap)
            view.append(gap)
            appended += 1
            self.gaps_added += 1
        if records:
            self._all.extend(records)
            shown = [r for r in records if self._shows(r)] if self.hidden_ops or self.row_filter else records
            view.extend(shown)
            appended += len(shown)
            self.rows_added += requests
        # Rows that fell off the front keep absolute indexes (the cursor) stable.
        dropped = max(0, self._total_appended + appended - self._dropped - len(view))
        self._total_appended += appended
        self._dropped += dropped
        self.held = held
        self._held_now = time.monotonic()
        if not self.follow and dropped:
            self.top = max(0, self.top - dropped)
        self._after_change()

    def _merge_events(self, records: list, events: list[tuple[float, str]]) -> list:
        """Events among the tick's records by time (records are nearly in arrival order)."""
        merged: list = []
        i = 0
        n = len(records)
        for t, message in events:
            while i < n and records[i].time <= t:
                merged.append(records[i])
                i += 1
            self.events_added += 1
            merged.append(EventRow(t, message, self.events_added))
        merged.extend(records[i:])
        return merged

    def _shows(self, row: Row) -> bool:
        """Is `row` in the view: not a request, or one of an op shown that the typed filter passes."""
        if row.__class__ is not RequestRecord:
            return True
        if row.cmd in self.hidden_ops:  # type: ignore[union-attr]
            return False
        passes = self.row_filter
        if passes is None:
            return True
        try:
            return passes(row)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a filter must not break the stream: show the row
            return True

    def runs_changed(self, seqs: Iterable[int]) -> None:
        """These requests joined a run (or theirs grew): draw their rows again."""
        cache = self._cache
        for seq in seqs:
            cache.pop(seq, None)
        self.refresh()

    def mark_lost(self, seqs: frozenset[int]) -> None:
        """Rows of these requests say "lost" (a power cut threw their writes away)."""
        self.lost = seqs
        self._cache.clear()
        self.refresh()

    @property
    def events(self) -> list[EventRow]:
        return [row for row in self._all if row.__class__ is EventRow]

    @property
    def page(self) -> int:
        """Rows that fit under the column header."""
        return max(1, self.inner_height - 1)

    @property
    def total_rows(self) -> int:
        return len(self._view) + len(self.held)

    @property
    def max_top(self) -> int:
        return max(0, self.total_rows - self.page)

    def _after_change(self) -> None:
        if self.follow:
            self.top = self.max_top
        else:
            self.top = min(self.top, self.max_top)
        self.refresh()

    def set_hidden_ops(self, hidden: frozenset[int]) -> None:
        """Show only the ops not in `hidden`; rebuilds the view from the kept rows."""
        if hidden == self.hidden_ops:
            return
        self.hidden_ops = hidden
        self._rebuild_view()

    def set_row_filter(self, passes: Callable[[RequestRecord], bool] | None) -> None:
        """Show only the requests `passes` accepts (None: all); rebuilds the view from the kept rows."""
        self.row_filter = passes
        self._rebuild_view()

    def _rebuild_view(self) -> None:
        selected = self.selected_record
        self._view = deque((row for row in self._all if self._shows(row)), maxlen=self.capacity)
        self._dropped = 0
        self._total_appended = len(self._view)
        self._cache.clear()
        self.cursor = None
        if selected is not None and not self.follow:
            for i, row in enumerate(self._view):
                if row is selected:
                    self.cursor = i
                    break
        self._after_change()
        if self.cursor is not None:
            self._scroll_to_cursor()

    def clear(self) -> None:
        self._all.clear()
        self._view.clear()
        self._dropped = 0
        self._total_appended = 0
        self.cursor = None
        self.top = 0
        self._cache.clear()
        self._after_change()

    # -- questions -----------------------------------------------------------------
    @property
    def rows(self) -> list[Row]:
        return list(self._view)

    @property
    def selected_record(self) -> RequestRecord | None:
        if self.cursor is None:
            return None
        i = self.cursor - self._dropped
        if 0 <= i < len(self._view):
            row = self._view[i]
            return row if isinstance(row, RequestRecord) else None
        return None

    @property
    def newest_record(self) -> RequestRecord | None:
        for row in reversed(self._view):
            if isinstance(row, RequestRecord):
                return row
        return None

    # -- rendering -------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        width = max(1, self.inner_width - 1)  # the last column is the scrollbar
        if width != self._width:
            self._width = width
            self._columns = columns_for_width(width, self.offset_width, self.want_what, self.want_runs)
            self._cache.clear()
        self._after_change()

    def set_want_what(self, want: bool, runs: bool | None = None) -> None:
        """Give the "what" column room (the map knows the disk) or not, and the runs' brackets
        a column (`runs`: one was seen; None leaves it); rows are drawn again."""
        runs = self.want_runs if runs is None else runs
        if want != self.want_what or runs != self.want_runs:
            self.want_what = want
            self.want_runs = runs
            if self._width:
                self._columns = columns_for_width(self._width, self.offset_width, want, runs)
            self._cache.clear()
            self.refresh()

    def header_strip(self) -> Strip:
        return join_cells([(_cell(col.title, col), HEADER_STYLE) for col in self._columns], self._width or 1)

    def _scrollbar(self, y: int) -> Segment:
        total = self.total_rows
        page = self.page
        if total <= page or y == 0:
            return Segment(" ")
        size = max(1, page * page // total)
        start = (page - size) * self.top // max(1, total - page)
        if start <= y - 1 < start + size:
            return Segment("▐", SCROLL_THUMB)
        return Segment(" ")

    def render_inner(self, y: int, inner_width: int) -> Strip:
        width = max(1, inner_width - 1)
        if width != self._width:
            self._width = width
            self._columns = columns_for_width(width, self.offset_width, self.want_what, self.want_runs)
            self._cache.clear()
        bar = self._scrollbar(y)
        if y == 0:
            return Strip([*self.header_strip(), bar], width + 1)
        index = self.top + y - 1
        n = len(self._view)
        if index >= n:
            h = index - n
            if h < len(self.held):
                strip = join_cells(held_cells(self.held[h], self._columns, self._held_now), width)
                return Strip([*strip, bar], width + 1)
            return Strip([Segment(" " * width), bar], width + 1)
        row = self._view[index]
        selected = self.cursor is not None and index == self.cursor - self._dropped
        if selected:
            strip = self._render_row(row, width, True)
        else:
            if isinstance(row, RequestRecord):
                key: int | tuple = row.seq
            elif isinstance(row, Gap):
                key = -row.first_seq
            else:
                key = ("event", row.number)
            strip = self._cache.get(key)
            if strip is None:
                strip = self._render_row(row, width, False)
                if len(self._cache) > 2000:
                    self._cache.clear()
                self._cache[key] = strip
        return Strip([*strip, bar], width + 1)

    def _render_row(self, row: Row, width: int, selected: bool) -> Strip:
        if isinstance(row, Gap):
            text = f"  ⋯ +{row.count:,} more requests not shown (seq {row.first_seq}–{row.last_seq})"
            strip = Strip([Segment(text, GAP_STYLE)]).crop_extend(0, width, None)
        elif isinstance(row, EventRow):
            when = fmt.clock_text(row.time)
            strip = Strip([Segment(f"  ◆ {when} ", EVENT_TIME_STYLE), Segment(row.message, EVENT_STYLE)]).crop_extend(
                0, width, None
            )
        else:
            what = self.what_source(row) if self._columns[-1].name == "what" else ""
            run = self.run_source(row.seq)
            strip = join_cells(record_cells(row, self._columns, row.seq in self.lost, what, run), width)
        if selected:
            strip = strip.apply_style(CURSOR_BG if self.has_focus else CURSOR_BG_BLUR)
        return strip

    # -- moving around --------------------------------------------------------------
    def _select(self, index: int | None) -> None:
        n = len(self._view)
        if index is None or n == 0:
            self.cursor = None
        else:
            index = max(0, min(n - 1, index))
            self.cursor = index + self._dropped
            self.follow = False
            self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.Selected(self.selected_record))

    def _scroll_to_cursor(self) -> None:
        if self.cursor is None:
            return
        i = self.cursor - self._dropped
        if i < self.top:
            self.top = i
        elif i >= self.top + self.page:
            self.top = i - self.page + 1
        self.refresh()

    def scroll_rows(self, delta: int) -> None:
        """Move the view without moving the cursor (the mouse wheel)."""
        if delta < 0 and self.follow:
            self.follow = False
        self.top = max(0, min(self.max_top, self.top + delta))
        if delta > 0 and self.cursor is None and self.top >= self.max_top:
            self.follow = True
        self.refresh()

    def _current_index(self) -> int:
        if self.cursor is not None:
            return self.cursor - self._dropped
        # No selection yet: start from the bottom row on screen.
        return min(len(self._view), self.top + self.page) - 1

    def action_cursor_up(self) -> None:
        i = self._current_index()
        self._select(i - 1 if self.cursor is not None else i)

    def action_cursor_down(self) -> None:
        i = self._current_index()
        if self.cursor is not None and i >= len(self._view) - 1:
            return
        self._select(i + 1 if self.cursor is not None else i)

    def action_page_up(self) -> None:
        self._select(self._current_index() - max(1, self.page - 1))

    def action_page_down(self) -> None:
        self._select(self._current_index() + max(1, self.page - 1))

    def action_first(self) -> None:
        self._select(0)

    def action_follow(self) -> None:
        self.follow = True

    def action_toggle_follow(self) -> None:
        if self.follow:
            self._select(self._current_index())
        else:
            self.follow = True

    def watch_follow(self, follow: bool) -> None:
        if follow:
            self.cursor = None
            self._after_change()
            self.post_message(self.Selected(None))
        self.pane_subtitle = "following · l to stop" if follow else "scrollback · end/l to follow"

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        inner = offset and self.inner_offset(offset.x, offset.y)
        if not inner or inner[1] == 0:
            return
        index = self.top + inner[1] - 1
        if 0 <= index < len(self._view):
            self._select(index)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.scroll_rows(-3)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.scroll_rows(3)
