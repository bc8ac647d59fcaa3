"""The lab as a viewer of a running buselab (`buselab attach`).

`AttachedLabApp` is the lab over a `RemoteSession` (remote.py): every pane and
steering key, plus `S` to stop the server (asked first). `q` only closes the
viewer; the server keeps serving whoever else is connected. `run_attached`
runs it and, unlike `run_lab`, never stops what it watched.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from textual.binding import Binding

from ..errors import UserError
from .lab import LabApp
from .remote import RemoteSession
from .screens.panel import ConfirmScreen


class AttachedLabApp(LabApp):
    """The lab over a RemoteSession: q closes this viewer, S stops the server (confirmed)."""

    BINDINGS = [
        Binding("q", "quit", "Detach"),
        Binding("S", "stop_server", "Stop server", show=False),
    ]
    HELP_KEYS = [("q", "close this viewer (the server keeps serving)"), ("S", "stop the server (asks first)")]

    session: RemoteSession  # type: ignore[assignment]

    def __init__(self, session: RemoteSession, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(session, **kwargs)  # type: ignore[arg-type]
        self.stopped_server = False  # S was confirmed and the server said it stops

    def action_stop_server(self) -> None:
        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.session.stop_server()
            except UserError as exc:
                self.say_error(f"the server did not stop: {exc}")
                return
            self.stopped_server = True
            self.exit(0)

        self.push_screen(
            ConfirmScreen(
                "Stop the server?",
                f"The buselab at {self.session.path} stops serving: its clients lose the disk"
                " (a kernel device is detached). q only closes this viewer.",
            ),
            answered,
        )


def run_attached(path: str, *, seconds: float | None = None, headless: bool = False, hz: float = 12.0) -> int:
    """Open the lab on the buselab at `path` until q (or the server goes); the server keeps running."""
    session = RemoteSession(path, hz=hz)  # first: a wrong PATH is the error to hear about
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        session.close()
        raise UserError("buselab attach needs a terminal (use `buselab ctl status` from scripts)")
    app = AttachedLabApp(session, seconds=seconds, hz=hz)
    try:
        app.run(headless=headless)
    finally:
        session.close()
        stats_path = os.environ.get("BUSELAB_LAB_STATS")  # bench/lab_bench.py --attached
        if stats_path:
            Path(stats_path).write_text(json.dumps(app.stats(), indent=1))
    if session.gone is not None and not app.stopped_server:
        print(f"buselab: {session.gone}", file=sys.stderr)
        return 0
    if app.stopped_server:
        print(f"buselab: asked the buselab at {path} to stop", file=sys.stderr)
    else:
        print(f"buselab: detached; the buselab at {path} keeps serving", file=sys.stderr)
    return app.return_code or 0
