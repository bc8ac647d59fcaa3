"""What the lab's steering screens share: a framed panel over the lab, a status
line for one-line answers (and refusals), and a yes/no confirmation."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from .. import format as fmt

PANEL_CSS = """
PanelScreen { align: center middle; background: #0f1217 55%; }
PanelScreen > #panel {
    width: 96; max-width: 96%; height: auto; max-height: 92%;
    border: round #4fb3ff; border-title-color: #4fb3ff; border-subtitle-color: #7a8391;
    background: #151a21; padding: 0 1;
}
PanelScreen .hint { color: #7a8391; width: 100%; }
PanelScreen .status { width: 100%; height: auto; min-height: 1; }
PanelScreen OptionList { height: auto; max-height: 14; background: #0f1217; border: none; margin: 0 0 1 0; }
PanelScreen OptionList:focus { background: #101820; }
PanelScreen Input { margin: 0 0 1 0; }
PanelScreen .row { height: auto; }
PanelScreen .row > .label { width: 10; color: #7a8391; }
PanelScreen .row > Input { width: 1fr; }
"""


class PanelScreen(ModalScreen[object]):
    """A modal panel over the lab; esc closes it. Subclasses compose into #panel."""

    DEFAULT_CSS = PANEL_CSS

    BINDINGS = [Binding("escape", "close", "Close")]

    PANEL_TITLE = ""

    def action_close(self) -> None:
        self.dismiss(None)

    def say(self, message: str, *, error: bool = False) -> None:
        """One line in the panel's status line: what happened, or why not."""
        colour = fmt.ERROR_COLOUR if error else fmt.EVENT_COLOUR
        try:
            status = self.query_one("#status", Static)
        except Exception:  # noqa: BLE001 - the panel closed meanwhile: the lab notifies instead
            self.app.notify(message, severity="error" if error else "information", markup=False)
            return
        status.update(Text(message, style=f"bold {colour}"))

    @property
    def status_text(self) -> str:
        """The status line's text (for tests)."""
        content = self.query_one("#status", Static).content
        return content.plain if isinstance(content, Text) else str(content)


DETAIL_EVERY = 0.25  # seconds between updates of a live detail


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no, for actions that lose data (a power cut, a cow discard).

    `detail` may be a function: it is asked again while the question is on
    screen, so what a yes would lose is what it loses now, not when the
    question opened (writes keep arriving).
    """

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; background: #0f1217 60%; }
    ConfirmScreen > Vertical {
        width: 72; max-width: 94%; height: auto; border: thick #ff5f5f; background: #151a21; padding: 1 2;
    }
    ConfirmScreen Static { width: 100%; margin: 0 0 1 0; }
    ConfirmScreen Horizontal { height: auto; align: center middle; }
    ConfirmScreen Button { margin: 0 2; }
    """

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str | Callable[[], str] = "") -> None:
        super().__init__()
        self.question = question
        self._detail = detail
        self._shown = ""

    @property
    def detail(self) -> str:
        return self._detail() if callable(self._detail) else self._detail

    def _text(self) -> Text:
        self._shown = self.detail
        text = Text(self.question, style=f"bold {fmt.ERROR_COLOUR}")
        if self._shown:
            text.append("\n" + self._shown, style="#d8dee9")
        return text

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self._text(), id="question")
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()
        if callable(self._detail):
            self.set_interval(DETAIL_EVERY, self.refresh_detail, name="confirm detail")

    def refresh_detail(self) -> None:
        if self.detail != self._shown:
            self.query_one("#question", Static).update(self._text())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
