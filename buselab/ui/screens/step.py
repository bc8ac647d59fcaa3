"""`N`: what to do with the oldest held request: release it, fail it with an
errno, or run it late. The lab does it (Steering.step) with the choice."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from .. import format as fmt
from .panel import PanelScreen

FAIL_ERRNOS = ("EIO", "ENOSPC", "EPERM", "ENOMEM", "ENOTSUP")
DEFAULT_DELAY_MS = 500


@dataclass(frozen=True)
class StepChoice:
    action: str  # release, fail, delay
    errno: str | None = None
    delay_ms: float | None = None

    def describe(self) -> str:
        if self.action == "fail":
            return f"fail with {self.errno}"
        if self.action == "delay":
            return f"delay {self.delay_ms:g} ms"
        return "release"


class StepScreen(PanelScreen):
    """The choice for the oldest held request; dismissed with a StepChoice (None: esc)."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("r", "choose('release')", "Release", show=False),
        Binding("e", "choose('fail:EIO')", "EIO", show=False),
        Binding("s", "choose('fail:ENOSPC')", "ENOSPC", show=False),
        Binding("p", "choose('fail:EPERM')", "EPERM", show=False),
        Binding("d", "choose('delay')", "Delay", show=False),
    ]

    def __init__(self, oldest: str, held: int) -> None:
        super().__init__()
        self.oldest = oldest
        self.held = held

    def compose(self) -> ComposeResult:
        with Vertical(id="panel") as panel:
            panel.border_title = "step"
            panel.border_subtitle = "enter choose · tab delay · esc cancel"
            head = Text("the oldest held request: ", style=fmt.DIM_COLOUR)
            head.append(self.oldest, style=f"bold {fmt.HELD_COLOUR}")
            if self.held > 1:
                head.append(f"  ({self.held - 1} more held behind it)", style=fmt.DIM_COLOUR)
            yield Static(head, classes="hint")
            options = [Option(Text.assemble(("r ", "bold"), "release it: run it now"), id="release")]
            keys = {"EIO": "e", "ENOSPC": "s", "EPERM": "p"}
            for name in FAIL_ERRNOS:
                key = keys.get(name, " ")
                options.append(
                    Option(
                        Text.assemble((f"{key} ", "bold"), "fail it with ", (name, f"bold {fmt.ERROR_COLOUR}")),
                        id=f"fail:{name}",
                    )
                )
            options.append(
                Option(Text.assemble(("d ", "bold"), "delay it by the milliseconds below, then run it"), id="delay")
            )
            yield OptionList(*options, id="choices", compact=True)
            with Horizontal(classes="row"):
                yield Static("delay ms", classes="label")
                yield Input(
                    str(DEFAULT_DELAY_MS), placeholder="milliseconds", id="delay_ms", type="number", compact=True
                )
            yield Static("", id="status", classes="status")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_choose(event.option.id or "release")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_choose("delay")

    def action_choose(self, choice: str) -> None:
        if choice == "release":
            self.dismiss(StepChoice("release"))
        elif choice.startswith("fail:"):
            self.dismiss(StepChoice("fail", errno=choice.split(":", 1)[1]))
        else:
            text = self.query_one("#delay_ms", Input).value.strip()
            try:
                ms = float(text)
            except ValueError:
                ms = -1.0
            if not 0 < ms <= 3_600_000:
                self.say(f"bad delay {text!r}: give milliseconds between 1 and 3600000", error=True)
                return
            self.dismiss(StepChoice("delay", delay_ms=ms))
