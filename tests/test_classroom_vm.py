"""The block-I/O class of issue 14 on the real kernel nbd driver: ten phenomena, one boot.

tests/vm/guest_classroom.py serves /dev/nbd0 from a RAM disk (a Session in the guest, as
`buselab ram --size 64M /dev/nbd0` would, driven by `buselab ctl` where a user would type it)
and runs the sequence docs/CLASSROOM.md describes: mkfs.ext4, a small write and sync, fstrim,
a cold-cache read, dd oflag=direct bs=1M, fio at iodepth 1 and 32 under a 25 ms delay filter,
a power cut and e2fsck. Each phenomenon is asserted with this run's numbers, and a failure
names the phenomenon:

 1 mkfs         superblock (primary and the backups dumpe2fs lists), group descriptors,
                bitmaps, inode tables and the journal written and labelled; no write left unknown
 2 journal      a jbd2 descriptor and a commit of one transaction; the file's data before them
 3 flush/fua    a FLUSH, answered before the commit block arrives; the commit block has FUA
 4 fstrim       fstrim's TRIMs labelled free; mkfs's discard labelled otherwise
 5 readahead    a cold-cache read found as a readahead run whose window grows
 6 split        queue_limits from sysfs (max_sectors_kb 128); a 1 MiB direct write split 8 x 128 KiB
 7 queue depth  fio iodepth 32: max_in_flight >= 16; Little's law at buselab and at fio
 8 pattern      the sequential share of WRITEs: high after dd, low after fio randwrite
 9 latency      a 25 ms delay, fio randread at iodepth 1: p50 at least 25 ms and at most 5% + 5 ms
                more (buselab's own time in the guest), and within 5% of the exact median
10 power cut    lost writes named; EIO for dd, sync and reads; poweron; e2fsck -fy fixes what
                the crash left; the flushed file survives

One boot of the release's kernel (Debian 12: 6.1), about 2 minutes on 2 quiet cores under
software emulation. Nothing is retried; a stuck guest is powered off by its watchdog and the
test fails with what the watchdog saw.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

# pytest's default import mode puts tests/ (not the repo root) on sys.path: make `tests.vm`
# importable either way (as tests/test_kernel_vm.py does).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import require_tool, vm, vm_image  # noqa: E402, F401  (pytest fixtures)
from tests.vm.vm import VmError  # noqa: E402

GUEST = Path(__file__).resolve().parent / "vm" / "guest_classroom.sh"
GUEST_TOOLS = ("mkfs.ext4", "e2fsck", "dumpe2fs", "fstrim", "fio", "dd", "mount", "umount", "timeout")

PHENOMENA = {
    1: "mkfs",
    2: "journal",
    3: "flush/fua",
    4: "fstrim",
    5: "readahead",
    6: "split",
    7: "queue depth",
    8: "pattern",
    9: "latency",
    10: "power cut",
}

# What must have been checked (and passed), by phenomenon: the guest's "ok:" lines.
EXPECTED = [
    r"^ok: 1 mkfs: primary superblock \(offset 1024\) written",
    r"^ok: 1 mkfs: backup superblock at block \d+ .* written and labelled: .*ext4 superblock backup, group 1",
    r"^ok: 1 mkfs: backup superblock at block \d+ .* written and labelled: .*ext4 superblock backup, group 3",
    r"^ok: 1 mkfs: writes to the group-desc",
    r"^ok: 1 mkfs: writes to the bitmap",
    r"^ok: 1 mkfs: writes to the inode-table",
    r"^ok: 1 mkfs: writes labelled journal",
    r"^ok: 1 mkfs: no write left unknown",
    r"^ok: 2 journal: transaction \d+: descriptor .* before commit",
    r"^ok: 2 journal: hello.txt's data written before the commit",
    r"^ok: 3 flush/fua: transaction \d+'s blocks \(requests .*\) answered, then FLUSH \(request \d+\), answered .* before the commit block arrived",
    r"^ok: 3 flush/fua: the commit block \(request \d+\) is a FUA write",
    r"^ok: 4 fstrim: [1-9]\d* TRIMs .*labelled \['free'\]",
    r"^ok: 4 fstrim: mkfs's discard",
    r"^ok: 5 readahead: a readahead run",
    r"^ok: 5 readahead: the window grows to read_ahead_kb \(128 KiB\)",
    r"^ok: 6 split: ctl status queue_limits: .*'max_sectors_kb': 128",
    r"^ok: 6 split: 1 MiB direct write split into 8 × 128 KiB: one 1 MiB WRITE, split by the kernel into 8 × 128 KiB$",
    r"^ok: 7 queue depth: fio iodepth 32 -> ctl status max_in_flight",
    r"^ok: 7 queue depth: Little's law in buselab",
    r"^ok: 7 queue depth: Little's law at fio",
    r"^ok: 8 pattern: sequential share of WRITEs",
    r"^ok: 9 latency: delay 25 ms -> ctl status READ p50",
    r"^ok: 9 latency: p50 .* within 5% of the exact median",
    r"^ok: 10 power cut: [1-9]\d* bytes in [1-9]\d* writes lost",
    r"^ok: 10 power cut: a write after the cut fails: .*Input/output error",
    r"^ok: 10 power cut: sync -> [1-9]",
    r"^ok: 10 power cut: a read fails too",
    r"^ok: 10 power cut: poweron after",
    r"^ok: 10 power cut: e2fsck -fy on what the crash left",
    r"^ok: 10 power cut: the flushed file survived",
]

# The guest's watchdog (guest_lib.sh) powers it off with a report once the script has printed
# nothing for WATCHDOG_QUIET seconds, or WATCHDOG seconds after it started; the host kills qemu
# HOST_SLACK later. A quiet machine runs the whole sequence in about 2 minutes.
WATCHDOG = 900
WATCHDOG_QUIET = 240
HOST_SLACK = 120


def _phenomenon(line: str) -> str:
    match = re.match(r"^(?:ok|FAIL): (\d+) ", line)
    if not match:
        return line
    number = int(match.group(1))
    return f"phenomenon {number} ({PHENOMENA.get(number, '?')}): {line}"


@pytest.mark.vm
@pytest.mark.timeout(WATCHDOG + HOST_SLACK + 300)  # + building the image on a fresh machine
def test_the_ten_phenomena_of_a_block_io_class_on_the_kernel_nbd_driver(vm, vm_image) -> None:  # noqa: F811
    require_tool(*GUEST_TOOLS)
    env = {"WATCHDOG": str(WATCHDOG), "WATCHDOG_QUIET": str(WATCHDOG_QUIET), "CLASSROOM_TIMEOUT": str(WATCHDOG)}
    try:
        result = vm(f"sh {GUEST}\n", timeout=WATCHDOG + HOST_SLACK, env=env)
    except VmError as exc:
        seen = [line for line in exc.output.splitlines() if line.startswith(("ok:", "FAIL:", "hang:", "note:"))]
        pytest.fail(
            f"the VM (kernel {vm_image.kernel_version}) did not finish the classroom sequence: "
            f"{str(exc).splitlines()[0]}. Not retried. What it printed:\n" + "\n".join(seen[:250]) + f"\n\n{exc}",
            pytrace=False,
        )
    out = result.output
    print(out)
    print(f"kernel {vm_image.kernel_version}: boot {result.boot_seconds or 0:.1f} s, total {result.elapsed:.1f} s")
    lines = out.splitlines()
    failures = [_phenomenon(line) for line in lines if line.startswith(("FAIL:", "hang:"))]
    assert not failures, f"kernel {vm_image.kernel_version}:\n" + "\n".join(failures)
    oks = [line for line in lines if line.startswith("ok:")]
    missing = [
        _phenomenon(p.replace("^", "").replace("\\", ""))
        for p in EXPECTED
        if not any(re.search(p, line) for line in oks)
    ]
    assert not missing, "checks that did not run or said something else:\n" + "\n".join(missing)
    assert "classroom: 0 failure(s)" in out
    assert "summary: 0 failure(s)" in out
    result.check()
