"""Every built-in lesson, run with --auto on the real nbd driver in the test VM (tests/vm).

One boot runs them all (tests/vm/guest_lessons.sh): each must reach every checkpoint, in
order, with the I/O it waits for; a checkpoint that never fires fails with the step's name.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from buselab.lessons import builtin_paths, find_lesson  # noqa: E402
from tests.vm.fixtures import require_tool, vm, vm_image  # noqa: E402, F401  (pytest fixtures)
from tests.vm.vm import VmError  # noqa: E402

GUEST = Path(__file__).resolve().parent / "vm" / "guest_lessons.sh"
WATCHDOG, WATCHDOG_QUIET, HOST_SLACK = 1500, 300, 180


@pytest.mark.vm
@pytest.mark.timeout(WATCHDOG + HOST_SLACK + 300)
def test_every_lesson_reaches_every_checkpoint_on_the_nbd_driver(vm, vm_image) -> None:  # noqa: F811
    require_tool("mkfs.ext4", "fsck.ext4", "fstrim", "fio", "dd", "mount", "umount", "dumpe2fs", "blkid")
    env = {"WATCHDOG": str(WATCHDOG), "WATCHDOG_QUIET": str(WATCHDOG_QUIET)}
    names = list(builtin_paths())
    if os.environ.get("BUSELAB_VM_LESSONS"):  # while writing a lesson: only these
        names = os.environ["BUSELAB_VM_LESSONS"].split()
    env["LESSONS"] = " ".join(names)
    try:
        result = vm(f"sh {GUEST}\n", timeout=WATCHDOG + HOST_SLACK, env=env, modules=("nbd nbds_max=2",))
    except VmError as exc:
        pytest.fail(f"the lessons' VM did not finish: {str(exc).splitlines()[0]}\n{exc.output[-6000:]}", pytrace=False)
    out = result.output
    print(out)
    failures = [line for line in out.splitlines() if line.startswith(("FAIL:", "hang:"))]
    assert not failures, "\n".join(failures)
    for name in names:
        lesson = find_lesson(name)
        checkpoints = sum(1 for step in lesson.steps if step.checkpoint is not None)
        pattern = (
            rf"^ok: lesson {re.escape(name)}: lesson {re.escape(name)}: finished, {checkpoints} checkpoints reached"
        )
        assert re.search(pattern, out, re.M), f"lesson {name}: not every checkpoint was reached"
        explained = re.findall(r"^\s+checkpoint: (.*)$", out.split(f"== lesson {name}")[1].split("== lesson")[0], re.M)
        assert len(explained) == checkpoints and all("{" not in text for text in explained), explained
    assert "summary: 0 failure(s)" in out
    result.check()
