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
import subprocess
import sys
import time
from pathlib import Path

from conftest import require_tool


def capture(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait_for(name: str, predicate, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = capture(name)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"the screen never got there; last capture:\n{screen}")


def seqs(screen: str) -> list[int]:
    """Sequence numbers of the stream rows on screen."""
    return [int(m) for m in re.findall(r"^│\s+(\d+) \d\d:\d\d:\d\d\.\d{3} ", screen, re.M)]


def test_buselab_demo_in_tmux(tmp_path: Path):
    require_tool("tmux")
    name = f"buselab-test-{os.getpid()}"
    done = tmp_path / "exit-status"
    buselab = shutil.which("buselab")
    command = shlex.quote(buselab) if buselab else f"{shlex.quote(sys.executable)} -m buselab"
    # The shell records how the lab ended, and keeps the pane for a last look.
    shell = f"{command} demo; echo $? > {shlex.quote(str(done))}; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "50", shell], check=True)
    try:
        first = wait_for(name, lambda s: len(seqs(s)) > 5 and "address space" in s)
        assert "buselab" in first and "SERVING" in first and "demo round" in first
        assert "requests" in first and "inspector" in first and "graphs" in first
        assert re.search(r"\b(READ|WRITE|FLUSH|TRIM|ZERO)\b", first)
        second = wait_for(name, lambda s: seqs(s) and max(seqs(s)) > max(seqs(first)), timeout=10)
        assert max(seqs(second)) > max(seqs(first)), "the stream did not move"
        assert re.search(r"^ ctl /\S+\.ctl ", second, re.M), "the header does not show the control socket"
        subprocess.run(["tmux", "send-keys", "-t", name, "p"], check=True)
        paused = wait_for(name, lambda s: "PAUSED" in s and re.search(r"^│\s+held ", s, re.M), timeout=10)
        assert "1 held, oldest" in paused and "paused: new requests are held" in paused
        subprocess.run(["tmux", "send-keys", "-t", name, "n"], check=True)
        wait_for(name, lambda s: "stepped: release" in s, timeout=10)
        subprocess.run(["tmux", "send-keys", "-t", name, "p"], check=True)
        wait_for(name, lambda s: "SERVING" in s and "resumed: released" in s, timeout=10)
        subprocess.run(["tmux", "send-keys", "-t", name, "q"], check=True)
        deadline = time.monotonic() + 20
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.exists(), f"q did not end the lab:\n{capture(name)}"
        assert done.read_text().strip() == "0"
        final = capture(name)
        assert "stopped cleanly" in final, final
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
