"""`?`: what the lab shows and which keys do what."""

from __future__ import annotations

from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from .. import format as fmt
from ..stream import LOST_COLOUR

KEYS: list[tuple[str, str]] = [
    ("q, ctrl+c", "quit: answer in-flight requests, flush, detach, exit"),
    ("?", "this help (esc closes it)"),
    ("tab, shift+tab", "move between the stream, the heatmap and the inspector"),
    ("↑ ↓ pgup pgdn home", "stream: select a request (stops following); the inspector decodes it"),
    ("end, l", "stream: follow the newest requests again (l toggles)"),
    ("click, wheel", "stream: select, scroll back;  heatmap: hover a cell for its range"),
    ("1 2 3 4 5", "show/hide READ, WRITE, FLUSH, TRIM, other ops in the stream"),
    ("0", "show every op again"),
    (
        "/",
        "stream: show only the requests that match, in the breakpoints' words: struct=journal, op=write, "
        "struct=inode-table,op=read (empty: all); the frame's title says the filter",
    ),
    (
        "m",
        "heatmap: heat (recent reads, writes, trims) → offset by time (as iowatcher plots it) → structure"
        " (each cell coloured by what the disk's map says fills most of it; brighter where touched lately;"
        " the legend gives each kind's share of the disk)",
    ),
    ("← → ↑ ↓", "heatmap (focused): move the cell cursor"),
    (
        "] [ g",
        "inspector (focused): next / previous KiB of a held request's whole payload, go to a byte (1080, 0x438, "
        "4K, end, @0x100438 on the disk); a breakpoint's hit opens at the bytes it matched, highlighted; "
        "an answered request keeps its first KiB: past it the pages are the disk's bytes now, and say so",
    ),
    ("p", "pause / resume: requests that arrive are held (the client waits); resume answers them in order"),
    ("n", "step: release the oldest held request; the inspector shows it"),
    ("N (shift+n)", "step with a choice: release, fail it with EIO/ENOSPC/EPERM/..., or delay it N ms"),
    ("k", "breakpoints: add (op=flush, op=write+fua, range=0-1M, ext4-sb, struct=journal ...), on/off, remove"),
    (
        "f",
        "filters: delay, error, throttle, readonly, cache; on/off, remove; cow c/d; ! power cut: a crash, the "
        "cache's unflushed writes are lost and every request fails with EIO until o powers on",
    ),
    (
        "b",
        "switch the backend live: ram, file, cow, null, plugin; copies the disk across (asks before overwriting data)",
    ),
    ("r", "record a trace (./buselab-DATE-TIME.jsonl.zst) / stop recording"),
    ("e", "export: statistics as JSON and this screen as SVG, into the current directory"),
]


INTRO = (
    "Every request a client or the kernel sends passes through buselab's engine; the lab "
    "reads its telemetry a dozen times a second. The disk never waits for the screen."
)

COLOURS = (
    ("READ", fmt.READ_COLOUR),
    ("WRITE", fmt.WRITE_COLOUR),
    ("FLUSH", fmt.OP_COLOURS[3]),
    ("TRIM", fmt.TRIM_COLOUR),
    ("ZERO (write zeroes)", fmt.OP_COLOURS[6]),
    ("lost: answered ok, then thrown away by a power cut (stream and heatmap)", LOST_COLOUR),
)

# (heading, paragraphs): one string per paragraph, never broken by hand, so the
# help reflows to whatever width the terminal gives it.
SECTIONS: list[tuple[str, list[str]]] = [
    (
        "The stream",
        [
            "One row per request: sequence number, arrival time, op, byte offset, length, flags "
            "(FUA: force unit access), latency and result (the errno name on failure). At very "
            "high rates each tick shows its newest rows and one '+N more' row for the rest.",
            "While the I/O is paused, held requests wait at the bottom with their wait so far.",
            "After a power cut, the writes it threw away say 'lost' (answered ok, never flushed); "
            "until power on every request fails with EIO, as on a crashed disk.",
            "A bracket (┌ │ └) ties rows that are one I/O: violet, one application I/O the kernel "
            "split at the queue's max_sectors_kb (back-to-back pieces, each continuing the last); "
            "green, readahead (sequential READs whose window grows). The bracket's last row says "
            "what the run was; the inspector says which part of it a row is.",
        ],
    ),
    (
        "The heatmap",
        [
            "The disk laid out like a page, offset 0 at the top left. Each half-character cell "
            "covers the bytes the legend names; recent I/O lights it up (reads blue, writes orange "
            "to yellow, trims violet, brighter the more) and fades within seconds; then a dim tint "
            "says what the cell keeps: written, trimmed, only read, or untouched; a loud pink-red one "
            "where a power cut lost written data. Every colour is one of a 256-colour terminal's "
            "own, so tmux and ssh show the same states. m plots offset against time instead.",
        ],
    ),
    (
        "The graphs",
        [
            "Throughput (MB/s, decimal like fio) and IOPS for reads, writes and other ops, one "
            "sample a second; latency p50/p99 on a log scale (16 buckets per power of two: within 2.2%).",
        ],
    ),
    (
        "Steering",
        [
            "The third header line shows a recording (● REC), a replay's progress, the control "
            "socket `buselab ctl` talks to, the breakpoints and the filter stack (top first).",
            "Pause holds new requests; those in a backend finish. A breakpoint pauses by itself and "
            "names itself in the header; the stream marks its request 'break'. Events (pause, step, "
            "filters, switches, power cuts) are ◆ rows in the stream.",
            "In the breakpoints (k) and filters (f) panels you type a spec and press enter; tab "
            "moves to the list, where space, enter, x and the panel's other keys act on it. What "
            "loses data (a power cut, a cow commit or discard, a switch that copies over a file or "
            "device holding data) asks first.",
            "Everything the keys do, `buselab ctl` does from scripts; a request that makes no sense "
            "is refused in one line.",
        ],
    ),
]

KEY_WIDTH = 20  # the keys column; descriptions wrap beside it
TEXT = "#d8dee9"


def help_text(extra_keys: list[tuple[str, str]] | None = None) -> Text:
    """The whole help as one unwrapped Text (for tests and plain output): one line a paragraph."""
    text = Text()
    text.append("buselab lab\n\n", style="bold #4fb3ff")
    text.append(INTRO + "\n\n", style=TEXT)
    text.append("Keys\n", style="bold #d8dee9")
    for key, what in KEYS + (extra_keys or []):
        text.append(f"  {key:<{KEY_WIDTH}}", style=f"bold {fmt.HELD_COLOUR}")
        text.append(what + "\n", style=TEXT)
    text.append("\nColours\n", style="bold #d8dee9")
    for name, colour in COLOURS:
        text.append("  ■ ", style=colour)
        text.append(name + "\n", style=TEXT)
    for heading, paragraphs in SECTIONS:
        text.append(f"\n{heading}\n", style="bold #d8dee9")
        for paragraph in paragraphs:
            text.append(f"  {paragraph}\n", style=TEXT)
    return text


def help_renderable(extra_keys: list[tuple[str, str]] | None = None) -> Group:
    """The help as the screen shows it: paragraphs reflow to the width they get, and key
    descriptions wrap beside their keys, under their own first line."""
    parts: list = [Text("buselab lab\n", style="bold #4fb3ff"), Text(INTRO + "\n", style=TEXT)]
    parts.append(Text("Keys", style="bold #d8dee9"))
    keys = Table.grid(padding=(0, 1))
    keys.add_column(width=KEY_WIDTH, style=f"bold {fmt.HELD_COLOUR}", overflow="fold")
    keys.add_column(ratio=1, style=TEXT, overflow="fold")
    for key, what in KEYS + (extra_keys or []):
        keys.add_row(key, what)
    parts.append(Padding(keys, (0, 0, 0, 2)))
    parts.append(Text("\nColours", style="bold #d8dee9"))
    for name, colour in COLOURS:
        line = Text("  ■ ", style=colour)
        line.append(name, style=TEXT)
        parts.append(line)
    for heading, paragraphs in SECTIONS:
        parts.append(Text(f"\n{heading}", style="bold #d8dee9"))
        for paragraph in paragraphs:
            parts.append(Padding(Text(paragraph, style=TEXT), (0, 0, 0, 2)))
    return Group(*parts)


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: #0f1217 60%; }
    HelpScreen > VerticalScroll {
        width: 104; max-width: 96%; height: 90%;
        border: round #4fb3ff; border-title-color: #4fb3ff; background: #151a21; padding: 0 2;
    }
    HelpScreen Static { width: 100%; }
    """

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, extra_keys: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.extra_keys = extra_keys

    def compose(self) -> ComposeResult:
        with VerticalScroll() as scroll:
            scroll.border_title = "help"
            yield Static(help_renderable(self.extra_keys), id="help")

    @property
    def plain(self) -> str:
        """The help's text, unwrapped (for tests)."""
        return help_text(self.extra_keys).plain

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
