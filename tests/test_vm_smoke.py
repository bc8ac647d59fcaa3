"""The VM harness works: the real nbd driver, an ioctl attach, ext4 on top, a clean detach.

Boots the test VM (tests/vm/vm.py) once and runs tests/vm/guest_nbd_smoke.py in it, a tiny
NBD server that does not use buselab. About 15 s under software emulation (boot ~5-7 s).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

# The harness lives in tests/vm; pytest's default import mode puts tests/ (not the repo root)
# on sys.path when tests/ has no __init__.py, so make `tests.vm` importable either way.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import vm, vm_image  # noqa: E402, F401  (pytest fixtures)

pytestmark = pytest.mark.vm

GUEST_SCRIPT = Path(__file__).resolve().parent / "vm" / "guest_nbd_smoke.py"


def test_nbd_ioctl_attach_ext4_and_detach_in_vm(vm) -> None:  # noqa: F811
    # The host root is the guest's root, so the guest runs this very file by its host path.
    result = vm(f"set -e\nls /dev/nbd0 /dev/nbd3\nexec python3 {GUEST_SCRIPT}\n", timeout=240)
    print(result.output)
    print(f"boot {result.boot_seconds:.1f} s, total {result.elapsed:.1f} s")
    result.check()
    out = result.output
    assert "ok: /dev/nbd0 exists" in out
    assert "ok: netlink family nbd exists: True" in out
    assert re.search(r"/dev/nbd0: \d+/\d+ files", out), "fsck summary missing"
    assert "ok: fsck clean, payload read back" in out
    assert "ok: disconnected, size 0" in out
    # FLUSH and TRIM were advertised, so the kernel must have sent some (BUSE never got FLUSH).
    assert re.search(r"\bflush=[1-9]", out) and re.search(r"\btrim=[1-9]", out), out
