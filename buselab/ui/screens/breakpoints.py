"""`k`: the breakpoints: listed with their state and hits, added by spec, enabled,
disabled and removed. A request that matches an enabled one pauses the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ...errors import UserError
from .. import format as fmt
from .panel import PanelScreen

if TYPE_CHECKING:
    from ...steering import Steering
    from ...steering.results import BreakpointInfo

EXAMPLES = "op=flush · op=write+fua · range=0-1M · pattern=53ef,at=1080 · ext4-sb · struct=journal · struct=inode-table,op=write"
REFRESH_EVERY = 0.5  # seconds: hit counts move while the panel is open


def breakpoint_label(bp: BreakpointInfo, last_hit: int | None) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    on = bp.enabled
    text.append("● " if on else "○ ", style=f"bold {fmt.HELD_COLOUR}" if on else fmt.DIM_COLOUR)
    text.append(f"{bp.id:>2}  ", style="bold #d8dee9")
    text.append(f"{bp.spec:<36} ", style="#d8dee9" if on else fmt.DIM_COLOUR)
    hits = bp.hits
    text.append(
        f"{hits:>5,} hit{'s' if hits != 1 else ' '}", style=f"bold {fmt.EVENT_COLOUR}" if hits else fmt.DIM_COLOUR
    )
    text.append("  enabled " if on else "  disabled", style=fmt.DIM_COLOUR)
    if last_hit == bp.id:
        text.append("  ◀ fired last", style=f"bold {fmt.ERROR_COLOUR}")
    return text


class BreakpointsScreen(PanelScreen):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("space", "toggle", "Enable/disable", show=False),
        Binding("x,delete", "remove", "Remove", show=False),
        Binding("X", "remove_all", "Remove all", show=False),
    ]

    def __init__(self, steering: Steering) -> None:
        super().__init__()
        self.steering = steering
        self._shown: list | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="panel") as panel:
            panel.border_title = "breakpoints"
            panel.border_subtitle = "enter add · tab list: space on/off · x remove · X all · esc close"
            yield Static(
                "A request that matches an enabled breakpoint is held and the device pauses:\n"
                "n steps, N steps with a choice, p resumes.",
                classes="hint",
            )
            yield Static("", id="last", classes="hint")
            yield OptionList(id="list", compact=True)
            yield Input(placeholder="a breakpoint spec to add (enter)", id="spec", compact=True)
            yield Static(Text("e.g. " + EXAMPLES, style=fmt.DIM_COLOUR), classes="hint")
            yield Static("", id="status", classes="status")

    def on_mount(self) -> None:
        self.refresh_list()
        # Typing a spec is what the panel is for: start there; tab reaches the list.
        self.query_one(Input).focus()
        self.set_interval(REFRESH_EVERY, self.refresh_list, name="breakpoints")

    # -- the list ------------------------------------------------------------------
    def refresh_list(self) -> None:
        steering = self.steering
        listed = steering.list_breakpoints()
        last = steering.last_break
        last_id = last.breakpoint if last else None
        key = ([(b.id, b.enabled, b.hits, b.spec) for b in listed], last_id)
        if key == self._shown:
            return
        self._shown = key
        options = self.query_one(OptionList)
        highlighted = options.highlighted
        options.clear_options()
        if not listed:
            options.add_option(
                Option(Text("no breakpoints yet: type a spec below", style=fmt.DIM_COLOUR), disabled=True)
            )
        else:
            options.add_options(Option(breakpoint_label(bp, last_id), id=str(bp.id)) for bp in listed)
            options.highlighted = min(highlighted or 0, len(listed) - 1)
        if last:
            line = Text("last hit: ", style=fmt.DIM_COLOUR)
            line.append(
                f"breakpoint {last.breakpoint} ({last.spec}) by {last.op} {last.offset:,}+{last.length:,}",
                style=f"bold {fmt.ERROR_COLOUR}",
            )
            self.query_one("#last", Static).update(line)

    def _selected_id(self) -> str | None:
        options = self.query_one(OptionList)
        if options.highlighted is None or not len(self.steering.breakpoints):
            return None
        return options.get_option_at_index(options.highlighted).id

    # -- actions ----------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        spec = event.value.strip()
        if not spec:
            return
        try:
            bp = self.steering.add_breakpoint(spec)
        except UserError as exc:
            self.say(str(exc), error=True)
            return
        event.input.value = ""
        self.say(f"breakpoint {bp.id} set: {bp.spec}")
        self.refresh_list()
        options = self.query_one(OptionList)
        options.highlighted = options.option_count - 1  # the new one, for space or x after a tab
        # The focus stays in the input: the next spec can be typed at once.

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_toggle()

    def _focus_is_list(self) -> bool:
        return isinstance(self.focused, OptionList)

    def action_toggle(self) -> None:
        ref = self._selected_id()
        if ref is None or not self._focus_is_list():
            return
        try:
            bp = self.steering.toggle_breakpoint(ref)
        except UserError as exc:
            self.say(str(exc), error=True)
            return
        self.say(f"breakpoint {bp.id} {'enabled' if bp.enabled else 'disabled'}: {bp.spec}")
        self.refresh_list()

    def action_remove(self) -> None:
        ref = self._selected_id()
        if ref is None or not self._focus_is_list():
            return
        try:
            self.steering.remove_breakpoint(ref)
        except UserError as exc:
            self.say(str(exc), error=True)
            return
        self.say(f"breakpoint {ref} removed")
        self.refresh_list()

    def action_remove_all(self) -> None:
        if not self._focus_is_list():
            return
        removed = self.steering.remove_breakpoint("all").removed
        self.say(f"removed {len(removed)} breakpoint{'s' if len(removed) != 1 else ''}")
        self.refresh_list()
