"""A line-API widget that draws its own rounded frame and title.

Textual's CSS borders recompute their colours for every line of every frame;
on the stream, redrawn a dozen times a second, that was a quarter of the lab's
rendering time, all of it taken from the server under the GIL. A Pane draws
the same frame from cached segments, and its subclasses only render the
inside (`render_inner`).
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.strip import Strip
from textual.widget import Widget

FRAME = Style.parse("#3b4455")
FRAME_FOCUS = Style.parse("#4fb3ff")
TITLE = Style.parse("bold #aeb7c4")
TITLE_FOCUS = Style.parse("bold #4fb3ff")
SUBTITLE = Style.parse("#7a8391")


class Pane(Widget):
    """A framed pane: `pane_title` top left, `pane_subtitle` bottom right."""

    DEFAULT_CSS = """
    Pane { padding: 0; border: none; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._pane_title = ""
        self._pane_subtitle = ""
        self._frame: dict[tuple, Strip] = {}
        self._pane_size: tuple[int, int] | None = None

    # -- titles -----------------------------------------------------------------
    @property
    def pane_title(self) -> str:
        return self._pane_title

    @pane_title.setter
    def pane_title(self, text: str) -> None:
        if text != self._pane_title:
            self._pane_title = text
            self.refresh()

    @property
    def pane_subtitle(self) -> str:
        return self._pane_subtitle

    @pane_subtitle.setter
    def pane_subtitle(self, text: str) -> None:
        if text != self._pane_subtitle:
            self._pane_subtitle = text
            self.refresh()

    # -- geometry -------------------------------------------------------------------
    # Widget.size walks the compositor's map on every call and the stream asks
    # for its height on every line: keep the size the last Resize gave.
    def on_resize(self, event: events.Resize) -> None:
        self._pane_size = (event.size.width, event.size.height)

    @property
    def pane_size(self) -> tuple[int, int]:
        if self._pane_size is None:
            size = self.size
            return size.width, size.height
        return self._pane_size

    @property
    def inner_width(self) -> int:
        return max(1, self.pane_size[0] - 2)

    @property
    def inner_height(self) -> int:
        return max(1, self.pane_size[1] - 2)

    def inner_offset(self, x: int, y: int) -> tuple[int, int] | None:
        """Widget coordinates -> coordinates inside the frame (None on the frame)."""
        x, y = x - 1, y - 1
        if 0 <= x < self.inner_width and 0 <= y < self.inner_height:
            return x, y
        return None

    # -- drawing ----------------------------------------------------------------------
    def render_inner(self, y: int, width: int) -> Strip:
        """Line `y` inside the frame, `width` cells wide."""
        return Strip.blank(width)

    def _edge(self, top: bool, width: int) -> Strip:
        focused = self.has_focus
        text = self._pane_title if top else self._pane_subtitle
        key = (top, width, text, focused)
        strip = self._frame.get(key)
        if strip is not None:
            return strip
        if len(self._frame) > 32:
            self._frame.clear()
        frame = FRAME_FOCUS if focused else FRAME
        left, right = ("╭", "╮") if top else ("╰", "╯")
        inner = max(0, width - 2)
        if text and inner >= 6:
            label = f" {text} "
            if len(label) > inner - 2:
                label = label[: inner - 3] + "… "
            rest = inner - 1 - len(label)
            if top:
                segments = [
                    Segment(left + "─", frame),
                    Segment(label, TITLE_FOCUS if focused else TITLE),
                    Segment("─" * rest + right, frame),
                ]
            else:
                segments = [
                    Segment(left + "─" * rest, frame),
                    Segment(label, SUBTITLE),
                    Segment("─" + right, frame),
                ]
        else:
            segments = [Segment(left + "─" * inner + right, frame)]
        strip = self._frame[key] = Strip(segments, width)
        return strip

    def render_line(self, y: int) -> Strip:
        width, height = self.pane_size
        if width < 2 or height < 2:
            return Strip.blank(width)
        if y == 0:
            return self._edge(True, width)
        if y == height - 1:
            return self._edge(False, width)
        side = FRAME_FOCUS if self.has_focus else FRAME
        inner = self.render_inner(y - 1, width - 2)
        return Strip([Segment("│", side), *inner, Segment("│", side)], width)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()
