"""`b`: switch the backend live: ram, file (a path), cow (an overlay over the
current backend or over a file), null, or a plugin (FILE[:CLASS]); a size; and
whether to copy the disk's contents across (on by default, so a mounted file
system survives the move).

The screen only checks what it can see at once (a missing path, a bad size,
copying into null); it returns a SwitchChoice and the lab runs the switch in a
thread worker, showing the copy's progress in the header. Before a copy into a
file that holds data, or into a block device, it asks, saying what is there
(its size, and what its first bytes look like: ext4, GPT, ...).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, RadioButton, RadioSet, Static

from ...errors import UserError
from ...sizes import human_bytes, parse_size
from ...storage.registry import SWITCH_KINDS as BACKEND_CHOICES
from .. import format as fmt
from .panel import ConfirmScreen, PanelScreen

if TYPE_CHECKING:
    from ...steering.results import ExistingData

WHAT = {
    "ram": "a RAM disk (sparse, in memory)",
    "file": "a file or block device: give its path (made if missing)",
    "cow": "copy-on-write: changes in memory over the current backend (or over a file path)",
    "null": "reads zeros, keeps nothing",
    "plugin": "your own disk class: FILE.py[:CLASS]",
    "nbd": "another NBD server's export: nbd://HOST[:PORT]/NAME",
}
# File first: moving a live disk into a file is what `b` is for most often, and the
# first button is the one the set highlights, so enter keeps it.
KINDS = ("file", *(kind for kind in BACKEND_CHOICES if kind != "file"))
PATH_HINT = {
    "ram": "no path",
    "file": "path of the file, e.g. ./disk.img",
    "cow": "empty: over the current backend; or a base file",
    "null": "no path",
    "plugin": "FILE.py[:CLASS]",
    "nbd": "nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH",
}


def _something_at(path: str | None) -> bool:
    """Whether `path` may hold something a copy would overwrite (a stat: no read, so no wait)."""
    try:
        st = os.stat(path or "")
    except OSError:
        return False
    return not (stat.S_ISREG(st.st_mode) and st.st_size == 0)


@dataclass(frozen=True)
class SwitchChoice:
    kind: str
    path: str | None
    size: int | None
    copy: bool
    overwrite: bool = False  # asked: copy over the data at path

    def describe(self) -> str:
        where = f" {self.path}" if self.path else ""
        size = f" ({human_bytes(self.size)})" if self.size else ""
        return f"{self.kind}{where}{size}" + ("" if self.copy else ", contents not copied")


class SwitchBackendScreen(PanelScreen):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("ctrl+s", "switch", "Switch", show=False),
    ]

    def __init__(
        self,
        current: str,
        current_kind: str,
        size: int,
        would_overwrite: Callable[[str, str | None], ExistingData | None] | None = None,
    ) -> None:
        """`would_overwrite(kind, path)`: what a copy into it would overwrite (Steering.switch_would_overwrite)."""
        super().__init__()
        self.current = current
        self.current_kind = current_kind
        self.disk_size = size
        self.would_overwrite = would_overwrite
        self._looking = False

    def compose(self) -> ComposeResult:
        with Vertical(id="panel") as panel:
            panel.border_title = "switch backend"
            panel.border_subtitle = "↑↓ enter: kind · tab: next field · enter in a field or ctrl+s: switch · esc"
            head = Text("now: ", style=fmt.DIM_COLOUR)
            head.append(self.current, style="bold #d8dee9")
            head.append(f"  {human_bytes(self.disk_size)}", style="#d8dee9")
            yield Static(head, classes="hint")
            with RadioSet(id="kind", compact=True):
                for kind in KINDS:
                    yield RadioButton(f"{kind:<7} {WHAT[kind]}", value=kind == "file", name=kind)
            with Horizontal(classes="row"):
                yield Static("path", classes="label")
                yield Input(placeholder=PATH_HINT["file"], id="path", compact=True)
            with Horizontal(classes="row"):
                yield Static("size", classes="label")
                yield Input(
                    placeholder=f"empty keeps {human_bytes(self.disk_size)} (512K, 128M, 1G)", id="size", compact=True
                )
            yield Checkbox("copy the disk's contents into the new backend", value=True, id="copy", compact=True)
            with Horizontal(id="buttons"):
                yield Button("Switch", variant="primary", id="switch", compact=True)
            yield Static("", id="status", classes="status")

    DEFAULT_CSS = """
    SwitchBackendScreen RadioSet { width: 100%; border: none; background: #0f1217; margin: 0 0 1 0; }
    SwitchBackendScreen Checkbox { border: none; background: #151a21; }
    SwitchBackendScreen #buttons { height: auto; align: right middle; }
    """

    def on_mount(self) -> None:
        self.query_one(RadioSet).focus()

    @property
    def kind(self) -> str:
        pressed = self.query_one(RadioSet).pressed_button
        return pressed.name if pressed is not None and pressed.name else "file"

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        self.query_one("#path", Input).placeholder = PATH_HINT.get(self.kind, "")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_switch()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_switch()

    def choice(self) -> SwitchChoice:
        """What the form says; UserError with one line if it cannot work."""
        kind = self.kind
        path = self.query_one("#path", Input).value.strip() or None
        size_text = self.query_one("#size", Input).value.strip()
        copy = self.query_one("#copy", Checkbox).value
        size = parse_size(size_text) if size_text else None
        if kind in ("file", "plugin") and not path:
            raise UserError(f"{kind} needs a path: {PATH_HINT[kind]}")
        if kind in ("ram", "null") and path:
            raise UserError(f"{kind} takes no path: clear it")
        if kind == "null" and copy:
            raise UserError("null keeps no data: untick copy if you mean to throw the disk's contents away")
        if size is not None and size < self.disk_size and copy:
            raise UserError(
                f"{human_bytes(size)} is smaller than the disk's {human_bytes(self.disk_size)}: the data would not fit"
            )
        return SwitchChoice(kind, path, size, copy)

    def action_switch(self) -> None:
        if self._looking:
            return
        try:
            choice = self.choice()
        except UserError as exc:
            self.say(str(exc), error=True)
            return
        look = self.would_overwrite
        # A file is looked at only if something is there; another server's export always is
        # (asking it what it holds means connecting to it).
        maybe = choice.kind == "nbd" or (choice.kind == "file" and _something_at(choice.path))
        if look is None or not choice.copy or not maybe:
            self.dismiss(choice)  # type: ignore[arg-type]
            return
        # Reading the target's first bytes can wait on a slow device: off the UI thread.
        self._looking = True
        self.say(f"looking at {choice.path}…")

        def looked(existing: ExistingData | None) -> None:
            self._looking = False
            self._ask(choice, existing)

        def failed(message: str) -> None:
            self._looking = False
            self.say(message, error=True)

        self.app.steer(  # type: ignore[attr-defined]
            f"looking at {choice.path}",
            lambda: look(choice.kind, choice.path),
            done=looked,
            failed=failed,
            busy=False,
        )

    def _ask(self, choice: SwitchChoice, existing: ExistingData | None) -> None:
        if self.app.screen is not self:  # closed (or covered) while the target was looked at
            return
        self.say("")
        if existing is None:
            self.dismiss(choice)  # type: ignore[arg-type]
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.dismiss(replace(choice, overwrite=True))  # type: ignore[arg-type]
            else:
                self.say(f"not switched: {choice.path} is left as it is")

        self.app.push_screen(
            ConfirmScreen(
                f"Overwrite {choice.path}?",
                f"It is {existing.describe()}. Switching copies the disk into it: what it holds now is lost.",
            ),
            answered,
        )
