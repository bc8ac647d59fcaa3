"""`f`: the filter stack over the backend (nbdkit-style layers), top first as
requests meet them: added by spec, toggled, removed; the cache's power cut (a
crash: every request fails until power on) and power on, and the cow backend's
commit and discard.

Every change quiesces the engine (no request in a backend while the stack
changes), which can take a moment under load, so the lab runs it in a thread
worker (`LabApp.steer`) and the panel says how it went.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ...sizes import human_bytes
from ...storage.backends.cow import CowBackend
from ...storage.filters.cache import CacheFilter
from .. import format as fmt
from .panel import ConfirmScreen, PanelScreen

if TYPE_CHECKING:
    from ...steering import Steering
    from ...steering.results import FilterInfo, PowercutResult, PoweronResult

EXAMPLES = "delay:read=5ms · error:rate=0.1,errno=EIO,op=read · throttle:mbps=10 · readonly · cache"
REFRESH_EVERY = 0.5


_STAT_NAMES = {
    "dirty_bytes": "dirty",
    "written_back": "written back",
    "lost_to_powercuts": "lost",
    "waited_seconds": "waited",
    "refused": "refused since the cut",
}


def _stats_text(stats: dict[str, Any]) -> str:
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict):
            continue
        if key.endswith("bytes") or key in ("written_back", "lost_to_powercuts"):
            value = fmt.compact_size(int(value))
        elif key.endswith("seconds"):
            value = f"{float(value):.1f} s"
        parts.append(f"{_STAT_NAMES.get(key, key.replace('_', ' '))} {value}")
    return " · ".join(parts)


def filter_label(f: FilterInfo) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    on = f.enabled
    text.append("● " if on else "○ ", style=f"bold {fmt.EVENT_COLOUR}" if on else fmt.DIM_COLOUR)
    text.append(f"{f.id:>2}  ", style="bold #d8dee9")
    text.append(f"{f.spec:<30} ", style=("bold #d8dee9" if on else f"strike {fmt.DIM_COLOUR}"))
    text.append(_stats_text(f.stats) if on else "disabled", style=fmt.DIM_COLOUR)
    return text


class FiltersScreen(PanelScreen):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("space", "toggle", "On/off", show=False),
        Binding("x,delete", "remove", "Remove", show=False),
        # These act on the list, so only while it has the focus: in the spec input
        # every key is typed (tab moves between the two).
        Binding("exclamation_mark", "powercut", "Power cut", show=False),
        Binding("o", "poweron", "Power on", show=False),
        Binding("c", "cow('commit')", "Commit", show=False),
        Binding("d", "cow('discard')", "Discard", show=False),
    ]

    def __init__(self, steering: Steering) -> None:
        super().__init__()
        self.steering = steering
        self._shown: object = None

    def compose(self) -> ComposeResult:
        with Vertical(id="panel") as panel:
            panel.border_title = "filters · top first, as requests meet them"
            panel.border_subtitle = "enter add · tab list: space on/off · x remove · c/d cow · ! power cut · o on · esc"
            yield OptionList(id="list", compact=True)
            yield Static("", id="actions", classes="hint")
            yield Input(placeholder="a filter spec to add on top (enter)", id="spec", compact=True)
            yield Static(Text("e.g. " + EXAMPLES, style=fmt.DIM_COLOUR), classes="hint")
            yield Static("", id="status", classes="status")

    def on_mount(self) -> None:
        self.refresh_list()
        # Typing a spec is what the panel is for: start there; tab reaches the list.
        self.query_one(Input).focus()
        self.set_interval(REFRESH_EVERY, self.refresh_list, name="filters")

    # -- the list ------------------------------------------------------------------
    def refresh_list(self) -> None:
        steering = self.steering
        listed = list(reversed(steering.list_filters()))  # top first
        base = steering.base
        cow = base if isinstance(base, CowBackend) else None
        key = (
            [(f.id, f.enabled, f.spec, repr(f.stats)) for f in listed],
            base.describe(),
            cow.changed_bytes() if cow is not None else None,
        )
        if key == self._shown:
            return
        self._shown = key
        options = self.query_one(OptionList)
        highlighted = options.highlighted
        options.clear_options()
        options.add_options(Option(filter_label(f), id=str(f.id)) for f in listed)
        bottom = Text("▼ backend  ", style=fmt.DIM_COLOUR)
        bottom.append(base.describe(), style="bold #d8dee9")
        if cow is not None:
            bottom.append(f"  {human_bytes(key[2] or 0)} of changes over the base", style=fmt.HELD_COLOUR)
        options.add_option(Option(bottom, disabled=True))
        if listed:
            options.highlighted = min(highlighted or 0, len(listed) - 1)
        actions = Text()
        caches = self._caches()
        if any(f.powered_off for f in caches):
            actions.append(" POWER OFF ", style=f"bold #101418 on {fmt.ERROR_COLOUR}")
            actions.append("  every request fails with EIO   ")
            actions.append("o ", style=f"bold {fmt.EVENT_COLOUR}")
            actions.append("power on: serve again   ")
        elif caches:
            actions.append("! ", style=f"bold {fmt.ERROR_COLOUR}")
            actions.append("power cut: a crash; the cache's writes that no FLUSH sent down are lost   ")
        if cow is not None:
            actions.append("c ", style=f"bold {fmt.HELD_COLOUR}")
            actions.append("commit the changes into the base   ")
            actions.append("d ", style=f"bold {fmt.ERROR_COLOUR}")
            actions.append("discard them")
        self.query_one("#actions", Static).update(actions)

    def _selected_id(self) -> str | None:
        options = self.query_one(OptionList)
        if options.highlighted is None or not self._list_focused():
            return None
        option = options.get_option_at_index(options.highlighted)
        return option.id

    def _list_focused(self) -> bool:
        """Single-key actions act on the list only when it has the focus (not while a spec is typed)."""
        return isinstance(self.focused, OptionList)

    def _steer(self, what: str, fn, done_message, *, select: bool = False) -> None:  # type: ignore[no-untyped-def]
        """Run a stack change in the lab's thread worker; `select`: highlight the result in the
        list (the focus stays where it is: in the spec input after an add, ready for the next)."""
        self.say(f"{what}…")

        def done(result: object) -> None:
            self.say(done_message(result))
            self._shown = None
            if not self.is_mounted:
                return
            self.refresh_list()
            if select:
                options = self.query_one(OptionList)
                for i in range(options.option_count):
                    if options.get_option_at_index(i).id == str(getattr(result, "id", "")):
                        options.highlighted = i
                        break

        self.app.steer(what, fn, done=done, failed=lambda message: self.say(message, error=True))  # type: ignore[attr-defined]

    # -- actions ----------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        spec = event.value.strip()
        if not spec:
            return
        event.input.value = ""
        self._steer(
            f"adding filter {spec}",
            lambda: self.steering.add_filter(spec),
            lambda f: f"filter {f.id} added on top: {f.spec}",
            select=True,
        )

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_toggle()

    def action_toggle(self) -> None:
        ref = self._selected_id()
        if ref is None:
            return
        self._steer(
            f"toggling filter {ref}",
            lambda: self.steering.toggle_filter(ref),
            lambda f: f"filter {f.id} {'enabled' if f.enabled else 'disabled'}: {f.spec}",
        )

    def action_remove(self) -> None:
        ref = self._selected_id()
        if ref is None:
            return
        self._steer(
            f"removing filter {ref}",
            lambda: self.steering.remove_filter(ref),
            lambda f: f"filter {f.id} removed: {f.spec}",
        )

    def _caches(self) -> list[CacheFilter]:
        return [
            layer.filter for layer in self.steering.layers if isinstance(layer.filter, CacheFilter) and layer.enabled
        ]

    def action_powercut(self) -> None:
        if not self._list_focused():
            return
        if not self._caches():
            self.say("no cache filter to lose writes from: add one (type cache below)", error=True)
            return
        if any(f.powered_off for f in self._caches()):
            self.say("the power is off already: o switches it on", error=True)
            return

        def detail() -> str:
            # Asked again while the dialog is open: writes keep arriving in the cache.
            dirty = sum(f.dirty_bytes() for f in self._caches())
            return (
                f"The cache holds {human_bytes(dirty)} of writes no FLUSH has sent down: they are lost, "
                "as on a disk whose volatile cache loses power. Until power on (o) every request "
                "fails with EIO, as a crashed disk's would."
            )

        def cut(r: PowercutResult) -> str:
            writes = f"{r.lost_writes:,} write{'s' if r.lost_writes != 1 else ''}"
            return (
                f"POWER CUT: {human_bytes(r.lost_bytes)} of writes since the last FLUSH lost ({writes}, "
                "marked lost in the stream); requests fail with EIO until o (power on)"
            )

        def answered(yes: bool | None) -> None:
            if yes:
                self._steer("power cut", self.steering.powercut, cut)
            else:
                self.say("no power cut")

        self.app.push_screen(ConfirmScreen("Cut the power?", detail), answered)

    def action_poweron(self) -> None:
        if not self._list_focused():
            return
        if not any(f.powered_off for f in self._caches()):
            self.say("the power is on: ! cuts it (with a cache filter)", error=True)
            return

        def on(r: PoweronResult) -> str:
            failed = f"{r.refused:,} request{'s' if r.refused != 1 else ''}"
            return f"POWER ON after {r.off_seconds:.1f} s off ({failed} failed meanwhile): serving again"

        self._steer("power on", self.steering.poweron, on)

    def action_cow(self, what: str) -> None:
        if not self._list_focused():
            return
        if not isinstance(self.steering.base, CowBackend):
            self.say(
                f"the backend is {self.steering.base.kind}, not cow: b switches to cow (an overlay over it)",
                error=True,
            )
            return

        def changed() -> str:
            # Asked again while the dialog is open: writes keep changing the overlay.
            base = self.steering.base
            return human_bytes(base.changed_bytes() if isinstance(base, CowBackend) else 0)

        if what == "commit":
            question = "Commit every change into the base?"

            def detail() -> str:
                return f"{changed()} of changes are written into the backend under the overlay; they cannot be undone."

            def run() -> None:
                self._steer(
                    "cow commit",
                    self.steering.cow_commit,
                    lambda r: f"committed {human_bytes(r.committed_bytes)} of changes into the base",
                )

        else:
            question = "Discard every change?"

            def detail() -> str:
                return (
                    f"{changed()} of changes are thrown away: the disk goes back to its base, "
                    "as it was when cow started."
                )

            def run() -> None:
                self._steer(
                    "cow discard",
                    self.steering.cow_discard,
                    lambda r: f"discarded {human_bytes(r.discarded_bytes)} of changes",
                )

        def answered(yes: bool | None) -> None:
            if yes:
                run()
            else:
                self.say(f"no cow {what}")

        self.app.push_screen(ConfirmScreen(question, detail), answered)
