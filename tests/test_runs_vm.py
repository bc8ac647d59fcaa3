"""The lab's runs on the real kernel nbd driver: a split direct write and readahead.

Boots the test VM (tests/vm/vm.py) once and runs tests/vm/guest_runs.py in it: buselab on
/dev/nbd0 with the lab headless, max_sectors_kb 128, `dd oflag=direct bs=1M count=1` and a
cold buffered `dd` read. About 40-60 s under software emulation (importing Textual in the
guest is most of it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import require_tool, vm, vm_image  # noqa: E402, F401  (pytest fixtures)

pytestmark = pytest.mark.vm

GUEST_SCRIPT = Path(__file__).resolve().parent / "vm" / "guest_runs.py"


def test_split_write_and_readahead_on_the_kernel_device(vm) -> None:  # noqa: F811
    require_tool("dd")
    result = vm(f"set -e\nexec python3 {GUEST_SCRIPT}\n", timeout=400)
    print(result.output)
    print(f"boot {result.boot_seconds:.1f} s, total {result.elapsed:.1f} s")
    out = result.output
    assert "FAIL:" not in out, out
    assert "ok: runs in the VM done (0 failed)" in out, out
    result.check()
