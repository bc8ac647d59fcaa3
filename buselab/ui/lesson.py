"""The lab with a lesson: the lesson's pane takes the graphs' place, and keys move through it.

`>` next step (releasing the pause a checkpoint made), `<` previous, `y` copies the step's
commands, `x` runs them (in a thread: the lab keeps showing the I/O they cause) where the
lesson's commands run: this machine, or the lesson's VM with --vm, where there is no other
terminal to type them in. With --auto a thread runs each step's commands, waits for the
checkpoint and holds it a few seconds (`>` goes on at once); the lab stays open at the end
until `q`.
"""

from __future__ import annotations

import textwrap
import threading

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.strip import Strip

from ..lessons import LessonError, LessonRunner, run_auto
from . import format as fmt
from .lab import LabApp
from .pane import Pane

TITLE = Style.parse("bold #e5e9f0")
TEXT = Style.parse("#d8dee9")
COMMAND = Style.parse("bold #a3be8c")
DIM = Style.parse(fmt.DIM_COLOUR)
WAIT = Style.parse(f"bold {fmt.HELD_COLOUR}")
DONE = Style.parse("bold #8fbf7a")
FAILED = Style.parse(f"bold {fmt.ERROR_COLOUR}")
STATE_TEXT = {
    "reading": ("read, then > for the next step", DIM),
    "waiting": ("waiting for the requests this step is about…", WAIT),
    "paused": ("PAUSED by the lesson: look at the stream and the inspector", FAILED),
    "reached": ("✓ checkpoint", DONE),
    "finished": ("lesson finished: q to quit", DONE),
}


def fit(lines: list[list[Segment]], height: int) -> list[list[Segment]]:
    """What fits in `height` lines: all of it, or the step's title and then the newest lines.

    The end is what the class is looking at (the checkpoint's explanation, the commands' output:
    dmesg's remount line), so when the pane is short the middle (the step's text) gives way.
    """
    if len(lines) <= height or height < 3:
        return lines[:height] if height < 3 else lines
    tail = lines[len(lines) - (height - 2) :]
    hidden = len(lines) - 1 - len(tail)
    return [lines[0], [Segment(f"… {hidden} lines above (a taller terminal shows them)", DIM)], *tail]


class LessonPane(Pane):
    """The current step: its text, its commands, what the checkpoint waits for or found."""

    DEFAULT_CSS = """
    LessonPane { row-span: 2; height: 100%; background: #0f1217; }
    """

    def __init__(self, runner: LessonRunner, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.runner = runner
        self.error = ""
        self.auto = False
        self.running = False  # `x`: the step's commands are running
        self._lines: list[list[Segment]] = []
        self._shown: tuple = ()
        self._width = 0

    def update_from_runner(self) -> None:
        """Lay the pane out again if the step or its state changed (cheap to call every tick)."""
        r = self.runner
        key = (
            r.index,
            r.state,
            r.explanation,
            r.held,
            r.holding,
            len(r.results),
            self.running,
            self.error,
            self.size.width,
            self.size.height,
        )
        if key == self._shown:
            return
        self._shown = key
        self._lines = fit(self.layout_lines(max(20, self.size.width - 4)), self.inner_height)
        lesson = r.lesson
        step = min(r.index + 1, len(lesson.steps))
        self.pane_title = f"lesson {lesson.name} · step {step} of {len(lesson.steps)}"
        self.pane_subtitle = "auto · > next" if self.auto else "> next  < back  x run  y copy"
        self.refresh()

    def layout_lines(self, width: int) -> list[list[Segment]]:
        r = self.runner
        lines: list[list[Segment]] = []

        def para(text: str, style: Style, indent: str = "") -> None:
            for paragraph in text.split("\n\n"):
                for line in textwrap.wrap(paragraph, width - len(indent)) or [""]:
                    lines.append([Segment(indent + line, style)])

        step = r.step
        if r.state == "finished" or step is None:
            lines.append([Segment(r.lesson.title, TITLE)])
            para(f"All {len(r.lesson.steps)} steps done; {len(r.reached)} checkpoints reached.", TEXT)
        else:
            lines.append([Segment(f"{r.index + 1}. {step.title}", TITLE)])
            lines.append([])
            if step.text:
                para(step.text, TEXT)
                lines.append([])
            commands = r.command_lines()
            if commands:
                lines.append([Segment(self._commands_heading(), DIM)])
                for command in commands:
                    for i, part in enumerate(textwrap.wrap(command, width - 2) or [""]):
                        lines.append([Segment(("$ " if i == 0 else "  ") + part, COMMAND)])
                lines.append([])
        if self.error:
            para(self.error, FAILED)
        elif r.state in STATE_TEXT:
            text, style = STATE_TEXT[r.state]
            if r.state == "paused" and r.held:
                text += f" (held: {r.held})"
            if r.state == "reached" and r.holding:
                text += " · the device is paused on it: > goes on"
            para(text, style)
            if r.explanation:
                lines.append([])
                para(r.explanation, TEXT)
        for result in r.results:
            lines.append([])
            lines.append([Segment(f"$ {result.command}  → exit {result.status}", DIM)])
            for out in result.output.splitlines()[-4:]:
                lines.append([Segment("  " + out[: width - 2], DIM)])
        return lines

    def _commands_heading(self) -> str:
        where = self.runner.where
        if self.auto:
            return f"running in {where}:" if where else "running:"
        if self.running:
            return f"running in {where}…" if where else "running…"
        return f"x runs them in {where}:" if where else "in the other terminal (or x to run them here):"

    def render_inner(self, y: int, width: int) -> Strip:
        if y < len(self._lines):
            return Strip(self._lines[y]).crop_extend(0, width, None)
        return Strip.blank(width)

    @property
    def text(self) -> str:
        """Plain text of what is shown (for tests)."""
        return "\n".join("".join(seg.text for seg in line) for line in self._lines)


class LessonApp(LabApp):
    """The lab, with a lesson in the graphs' place."""

    BINDINGS = [
        *LabApp.BINDINGS,
        Binding("greater_than_sign", "next_step", "Next step", key_display=">"),
        Binding("less_than_sign", "previous_step", "Back", key_display="<", show=False),
        Binding("y", "copy_commands", "Copy commands", show=False),
        Binding("x", "run_commands", "Run commands", show=False),
    ]

    def __init__(self, session, runner: LessonRunner, *, auto: bool = False, hold: float = 5.0, **kwargs) -> None:
        super().__init__(session, **kwargs)
        self.runner = runner
        self.auto = auto
        self.hold = hold
        self.lesson_pane = LessonPane(runner, id="lesson")
        self.lesson_pane.auto = auto
        self._stop_auto = threading.Event()
        self._skip = threading.Event()
        self._auto_thread: threading.Thread | None = None

    def lower_right_pane(self):
        return self.lesson_pane

    def on_mount(self) -> None:
        super().on_mount()
        if self.auto:
            self._auto_thread = threading.Thread(target=self._run_auto, name="buselab-lesson-auto", daemon=True)
            self._auto_thread.start()
        else:
            try:
                self.runner.goto(0)
            except LessonError as exc:
                self.lesson_pane.error = str(exc)
        self.lesson_pane.update_from_runner()

    def _run_auto(self) -> None:
        try:
            run_auto(self.runner, hold=self.hold, stop=self._stop_auto, skip=self._skip)
        except LessonError as exc:
            self.lesson_pane.error = str(exc)

    def poll(self):
        tick = super().poll()
        if not self.auto:
            try:
                self.runner.poll()
            except LessonError as exc:
                self.lesson_pane.error = str(exc)
        self.lesson_pane.update_from_runner()
        return tick

    # -- keys ---------------------------------------------------------------------------------------
    def action_next_step(self) -> None:
        if self.auto:
            self._skip.set()  # the held checkpoint goes on now
            return
        self._move(self.runner.next)

    def action_previous_step(self) -> None:
        if not self.auto:
            self._move(self.runner.previous)

    def _move(self, move) -> None:
        self.lesson_pane.error = ""
        try:
            move()
        except LessonError as exc:
            self.lesson_pane.error = str(exc)
        self.lesson_pane.update_from_runner()

    def action_copy_commands(self) -> None:
        commands = self.runner.command_lines()
        if commands:
            self.copy_to_clipboard("\n".join(commands) + "\n")
            self.notify(f"copied {len(commands)} command{'s' if len(commands) != 1 else ''}", timeout=2)

    def action_run_commands(self) -> None:
        """Run the current step's commands where the lesson runs them; their output joins the pane."""
        if self.auto:
            self.notify("--auto runs the commands itself", timeout=2)
            return
        if self.lesson_pane.running:
            self.notify("the step's commands are still running", timeout=2)
            return
        if not self.runner.command_lines():
            self.notify("this step has no commands", timeout=2)
            return
        self.lesson_pane.running = True
        self.lesson_pane.update_from_runner()
        threading.Thread(target=self._run_commands, name="buselab-lesson-x", daemon=True).start()

    def _run_commands(self) -> None:
        try:
            self.runner.run_commands()
        finally:
            self.lesson_pane.running = False  # the next tick lays the pane out with the results

    def action_quit(self) -> None:  # type: ignore[override]
        self._stop_auto.set()
        if self._auto_thread is not None:
            self._auto_thread.join(5)
        self.runner.close()
        super().action_quit()


def run_lesson_lab(session, runner: LessonRunner, *, auto: bool = False, hold: float = 5.0) -> int:
    """The lab with the lesson until q; the caller stops the session."""
    import sys

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise LessonError("a lesson's lab needs a terminal: with --auto, --headless prints the steps instead")
    app = LessonApp(session, runner, auto=auto, hold=hold)
    try:
        app.run()
    finally:
        runner.close()
    return 0
