"""The real `buselab demo` in a real terminal (tmux), read back with capture-pane.

The lab must come up by itself, show live requests (sequence numbers that
grow between two looks), pause on p (the demo's request held), step one on n
(the inspector says so), serve again on p, and end cleanly on q with the
session stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from helpers import require_tool, tmux, tmux_capture, tmux_seqs, tmux_wait_for


def test_buselab_demo_in_tmux(tmp_path: Path):
    require_tool("tmux")
    name = f"buselab-test-{os.getpid()}"
    done = tmp_path / "exit-status"
    buselab = shutil.which("buselab")
    command = shlex.quote(buselab) if buselab else f"{shlex.quote(sys.executable)} -m buselab"
    # The shell records how the lab ended, and keeps the pane for a last look.
    # COLUMNS/LINES exported by whoever runs the tests would override the pane's
    # real size (Textual asks shutil.get_terminal_size, which reads them first).
    shell = f"unset COLUMNS LINES; {command} demo; echo $? > {shlex.quote(str(done))}; sleep 30"
    # The pane first runs a placeholder: the lab starts only once the window has
    # its final size (no client ever attaches, so nothing resizes it later).
    tmux(name, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", "sleep 600", check=True)
    try:
        tmux(name, "set-option", "-t", name, "window-size", "manual", check=True)
        tmux(name, "resize-window", "-t", name, "-x", "160", "-y", "50", check=True)
        size = tmux(
            name,
            "display-message",
            "-p",
            "-t",
            name,
            "#{window_width}x#{window_height}",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert size == "160x50", f"tmux gave a {size} window, not 160x50"
        tmux(name, "respawn-pane", "-k", "-t", name, shell, check=True)
        first = tmux_wait_for(name, lambda s: len(tmux_seqs(s)) > 5 and "address space" in s)
        assert "buselab" in first and "SERVING" in first and "demo round" in first
        assert "requests" in first and "inspector" in first and "graphs" in first
        assert re.search(r"\b(READ|WRITE|FLUSH|TRIM|ZERO)\b", first)
        second = tmux_wait_for(name, lambda s: tmux_seqs(s) and max(tmux_seqs(s)) > max(tmux_seqs(first)), timeout=10)
        assert max(tmux_seqs(second)) > max(tmux_seqs(first)), "the stream did not move"
        assert re.search(r"^ ctl /\S+\.ctl ", second, re.M), "the header does not show the control socket"
        tmux(name, "send-keys", "-t", name, "p", check=True)
        paused = tmux_wait_for(name, lambda s: "PAUSED" in s and re.search(r"^│\s+held ", s, re.M), timeout=10)
        assert "1 held, oldest" in paused and "paused: new requests are held" in paused
        tmux(name, "send-keys", "-t", name, "n", check=True)
        tmux_wait_for(name, lambda s: "stepped: release" in s, timeout=10)
        # Hide READ, WRITE, FLUSH and TRIM (1-4) so the burst of requests that
        # follows the resume does not scroll its event away at once; events stay
        # in a filtered stream (hiding the last group, 5, is refused).
        for key in "1234":
            tmux(name, "send-keys", "-t", name, key, check=True)
        tmux_wait_for(name, lambda s: "requests · only OTHER" in s, timeout=10)
        tmux(name, "send-keys", "-t", name, "p", check=True)
        resumed = tmux_wait_for(name, lambda s: "SERVING" in s and "resumed: released" in s, timeout=10)
        assert not re.search(r"^│\s+\d+ \S+ (READ|WRITE|FLUSH|TRIM) ", resumed, re.M), "hidden ops still shown"
        tmux(name, "send-keys", "-t", name, "0", check=True)
        tmux_wait_for(name, lambda s: tmux_seqs(s) and max(tmux_seqs(s)) > max(tmux_seqs(paused) or [0]), timeout=10)
        tmux(name, "send-keys", "-t", name, "q", check=True)
        deadline = time.monotonic() + 20
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.exists(), f"q did not end the lab:\n{tmux_capture(name)}"
        assert done.read_text().strip() == "0"
        final = tmux_capture(name)
        assert "stopped cleanly" in final, final
    finally:
        tmux(name, "kill-server", capture_output=True)
