"""`/`: which requests the stream shows, typed in the breakpoints' language.

    struct=journal   op=write   struct=inode-table,op=read   range=0-1M   jbd2

One parser for both (steering.breakpoints.parse_match): what stops the device as a
breakpoint filters the stream here. An empty line shows every request again. A spec
that makes no sense gets one line saying why, and the filter in use stays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Static

from ...errors import UserError
from ...steering.breakpoints import Breakpoint, parse_match
from .. import format as fmt
from .panel import PanelScreen

if TYPE_CHECKING:
    from ...engine.telemetry import RequestRecord
    from ...fsmap import FsMap

EXAMPLES = "struct=journal · op=write · struct=inode-table,op=read · struct=bitmap+group-desc · range=0-1M · op=flush"


class StreamFilterScreen(PanelScreen):
    """Dismisses with the parsed filter, "" to clear it, or None (esc) to keep the one in use."""

    def __init__(self, current: str, size: int) -> None:
        super().__init__()
        self.current = current
        self.disk_size = size

    def compose(self) -> ComposeResult:
        with Vertical(id="panel") as panel:
            panel.border_title = "filter the stream"
            panel.border_subtitle = "enter apply · empty enter shows all · esc keep"
            yield Static(
                "Show only the requests that match, in the breakpoints' words; struct= names a\n"
                "structure of the disk's map (superblock, group-desc, bitmap, inode-table, journal,\n"
                "directory, extent-tree, data, free, partition-table, fat, boot; jbd2, gdt, dir ...).\n"
                "Events and '+N more' rows stay. Keys 1-5 still hide whole ops.",
                classes="hint",
            )
            yield Input(value=self.current, placeholder="struct=journal, op=write, ... (empty: all)", id="spec")
            yield Static(Text("e.g. " + EXAMPLES, style=fmt.DIM_COLOUR), classes="hint")
            yield Static("", id="status", classes="status")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        spec = event.value.strip()
        if not spec:
            self.dismiss("")
            return
        try:
            match = parse_match(spec, self.disk_size, what="filter")
        except UserError as exc:  # a bad value (range=, pattern=) or a bad key: one line
            self.say(str(exc), error=True)
            return
        self.dismiss(match)


def filter_passes(match: Breakpoint, current_map: Callable[[], FsMap | None]) -> Callable[[RequestRecord], bool]:
    """The stream's row test for `match`: the disk's map as it is when the row is looked at."""

    def passes(record: RequestRecord) -> bool:
        return match.matches_record(record, current_map())

    return passes
