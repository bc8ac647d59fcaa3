"""buselab attached to the real kernel nbd driver, in the test VM (tests/vm/vm.py).

Three boots, each running one guest script that prints an ``ok:`` or ``FAIL:`` line per check
(tests/vm/guest_kernel_*.sh, helpers in tests/vm/guest_lib.sh), so one boot covers many checks.
The first two boot the release's kernel (Debian 12: 6.1), with one connection per device:

* ioctl (booted without nbd): the "module not loaded" error, buselab loading the module itself,
  ext4 on /dev/nbd0 (mkfs, files with known checksums, fsck -fn, remount and verify), FLUSH and
  TRIM seen, SIGINT -> exit 0 and size 0; one-line errors (busy, no such device, not an nbd
  device, size not a multiple of 512); kill -9 recovery, idle and while mounted; the file
  backend across a restart.
* netlink: the same ext4 check, `buselab ctl` pause/resume, chaining (lo /dev/nbd0 /dev/nbd1),
  --device auto, busy, kill -9 recovery (freed by netlink and by ioctls alone, and "held" while
  mounted), a 40 s pause of the gate that the devices survive (ioctl and netlink), and a stop
  while paused that answers the held reads (tests/vm/guest_pause.py, in the background while
  the rest runs).

The third boots the backports kernel (bookworm-backports: 6.12), because 6.1 loses a request
now and then on a device with several connections (README, "Known problems"):

* multiconn: two connections per device while other nbd devices are busy (the conditions of
  6.1's bug): ext4, a read from each CPU (each hardware queue) on three attaches, ctl
  pause/resume, and the 40 s pause.

Each test boots once. Nothing is retried: a guest that hangs is stopped by its watchdog (or by
the host's timeout) and the test fails with what the watchdog saw. About 1 + 2.5 + 1.5 minutes
on 2 quiet cores under software emulation (Python in the guest is ~11x slower, and importing
pyroute2 there takes seconds), plus a download and an image build per kernel on a fresh
machine. The non-root check runs on the host.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# pytest's default import mode puts tests/ (not the repo root) on sys.path: make `tests.vm`
# importable either way (as tests/test_vm_smoke.py does).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import (  # noqa: E402, F401  (pytest fixtures)
    multiconn_vm,
    multiconn_vm_image,
    require_tool,
    unavailable,
    vm,
    vm_image,
)
from tests.vm.vm import Image, VmError, VmResult  # noqa: E402

GUEST = Path(__file__).resolve().parent / "vm"
GUEST_TOOLS = ("mkfs.ext4", "fsck.ext4", "fstrim", "sha256sum", "timeout", "dd", "mount", "umount")

# The guest scripts' watchdog (guest_lib.sh) powers the guest off, with a report of what is
# stuck, once the script has printed nothing for WATCHDOG_QUIET seconds, or at the latest
# WATCHDOG seconds after it started; the host kills qemu HOST_SLACK later if even that fails.
# A quiet machine runs each script in 1-3 minutes, printing every few seconds; a busy one
# (other VMs and test suites on the same 2 cores) took 5-10 minutes, with silences of 2.
WATCHDOG = 1200
WATCHDOG_QUIET = 300
HOST_SLACK = 180
# pytest's own limit for a VM test: the above, plus building a kernel image on a fresh machine.
TEST_TIMEOUT = WATCHDOG + HOST_SLACK + 300


def _boot_once(run, image: Image, script: Path, env: dict[str, str] | None = None, **options: object) -> VmResult:
    """Boot once and run ``script``; a guest that did not finish fails the test, never reboots."""
    env = {"WATCHDOG": str(WATCHDOG), "WATCHDOG_QUIET": str(WATCHDOG_QUIET), **(env or {})}
    try:
        return run(f"sh {script}\n", timeout=WATCHDOG + HOST_SLACK, env=env, **options)
    except VmError as exc:
        seen = [line for line in exc.output.splitlines() if line.startswith(("ok:", "FAIL:", "hang:", "=="))]
        stuck = [line for line in seen if line.startswith("hang: still running")]
        if stuck:
            what = f"{stuck[0].removeprefix('hang: ')}: its watchdog powered it off"
        elif "hang: a lost request, powering off" in seen:
            what = "a request was lost (never completed), so it powered itself off"
        else:
            what = str(exc).splitlines()[0]
        pytest.fail(
            f"the VM (kernel {image.kernel_version}) did not finish {script.name}: {what}."
            " Not retried: a hang is a failure. What it printed (ok, FAIL, hang and section lines):\n"
            + "\n".join(seen[:250])
            + f"\n\n{exc}",
            pytrace=False,
        )


def _guest_checks(result: VmResult, image: Image, expected: list[str]) -> None:
    """Every guest check passed, and the ones named in `expected` (regexes) did run."""
    out = result.output
    print(out)
    print(f"kernel {image.kernel_version}: boot {result.boot_seconds or 0:.1f} s, total {result.elapsed:.1f} s")
    failures = [line for line in out.splitlines() if line.startswith(("FAIL:", "hang:"))]
    assert not failures, f"kernel {image.kernel_version}:\n" + "\n".join(failures)
    oks = [line for line in out.splitlines() if line.startswith("ok:")]
    missing = [pattern for pattern in expected if not any(re.search(pattern, line) for line in oks)]
    assert not missing, f"checks that did not run: {missing}"
    assert "summary: 0 failure(s)" in out
    result.check()


@pytest.mark.vm
@pytest.mark.timeout(TEST_TIMEOUT)  # about 1 minute on a quiet machine; see WATCHDOG
def test_kernel_ioctl_in_vm(vm, vm_image) -> None:  # noqa: F811
    require_tool(*GUEST_TOOLS)
    result = _boot_once(vm, vm_image, GUEST / "guest_kernel_ioctl.sh", modules=())
    _guest_checks(
        result,
        vm_image,
        [
            r"^ok: no module: buselab: error: the nbd kernel module is not loaded",
            r"^ok: buselab loaded the nbd module",
            r"^ok: ram: fsck.ext4 -fn clean",
            r"^ok: ram: checksums match after remount",
            r"^ok: ram: the kernel sent FLUSH and TRIM: flush=[1-9]\d* trim=[1-9]",
            r"^ok: ram: SIGINT -> exit 0, nbd0 size 0",
            r"^ok: busy device: buselab: error: /dev/nbd0 is busy",
            r"^ok: no such device: buselab: error: /dev/nbd20 does not exist",
            r"^ok: not an nbd device \(/dev/null\)",
            r"^ok: not an nbd device \(/dev/loop0\)",
            r"^ok: size not a multiple of 512",
            r"^ok: k9b: SIGTERM -> exit 0, nbd1 size 0",
            r"^ok: held after kill -9: buselab: error: /dev/nbd2 is still held.*umount",
            r"^ok: km2: SIGTERM -> exit 0, nbd2 size 0",
            r"^ok: file2: files still there after restart",
            r"^ok: file2: SIGINT -> exit 0, nbd3 size 0",
        ],
    )


def _require_pyroute2() -> None:
    if importlib.util.find_spec("pyroute2") is None:
        unavailable("needs pyroute2 (pip install 'buselab[kernel]') for the netlink path")


@pytest.mark.vm
@pytest.mark.timeout(TEST_TIMEOUT)  # 1.5 minutes on a quiet machine; see WATCHDOG
def test_kernel_netlink_in_vm(vm, vm_image) -> None:  # noqa: F811
    """The netlink path with one connection per device, on the release's kernel."""
    require_tool(*GUEST_TOOLS, "nbdkit")
    _require_pyroute2()
    # Six devices: the pause check runs on nbd4 and nbd5 in the background.
    result = _boot_once(
        vm, vm_image, GUEST / "guest_kernel_netlink.sh", modules=("nbd nbds_max=6",), env={"PAUSE": "40"}
    )
    _guest_checks(
        result,
        vm_image,
        [
            r"^ok: nl: attached via netlink with 1 connection",
            r"^ok: nl: nbd0 has 1 hardware queue",
            r"^ok: nl: fsck.ext4 -fn clean",
            r"^ok: nl: checksums match after remount",
            r"^ok: nl: the kernel sent FLUSH and TRIM: flush=[1-9]\d* trim=[1-9]",
            r"^ok: ctl: a read waits while paused",
            r"^ok: ctl: the read completed after resume",
            r"^ok: busy device \(netlink\): buselab: error: /dev/nbd0 is busy",
            r"^ok: chain: checksums match after remount",
            r"^ok: chain: SIGINT -> exit 0, nbd1 size 0",
            r"^ok: auto: picked /dev/nbd1",
            r"^ok: nl: SIGINT -> exit 0, nbd0 size 0",
            r"^ok: px: serves the upstream's export",
            r"^ok: px: checksums match after remount",
            r"^ok: px: the kernel sent FLUSH and TRIM",
            r"^ok: px: SIGINT -> exit 0, nbd0 size 0",
            r"^ok: px2: fsck.ext4 -fn clean",
            r"^ok: k9b: said it freed nbd2",
            r"^ok: k9c: --ioctl freed a netlink leftover",
            r"^ok: k9c: SIGTERM -> exit 0, nbd2 size 0",
            r"^ok: held after kill -9: buselab: error: /dev/nbd3 is still held.*umount",
            r"^ok: km2: SIGTERM -> exit 0, nbd3 size 0",
            r"^ok: pause: guest_pause.py passed",
        ],
    )
    out = result.output
    assert "pause: attached /dev/nbd5 via netlink, 1 connection(s)" in out
    assert re.search(r"pause: ok: /dev/nbd5: reads held for 40 s", out)
    assert "pause: ok: /dev/nbd5: the kernel killed nothing" in out
    assert re.search(r"pause: ok: /dev/nbd4: after resume the reads completed", out)
    assert re.search(r"pause: ok: /dev/nbd5: stopped while paused in .*the held read \(\d+\) got its answer", out)


@pytest.mark.vm
@pytest.mark.timeout(TEST_TIMEOUT)  # 2 minutes on a quiet machine; see WATCHDOG
def test_kernel_multiconn_in_vm(multiconn_vm, multiconn_vm_image) -> None:  # noqa: F811
    """Two connections per device, on the backports kernel, with other nbd devices busy."""
    require_tool(*GUEST_TOOLS, "taskset")
    _require_pyroute2()
    result = _boot_once(
        multiconn_vm,
        multiconn_vm_image,
        GUEST / "guest_kernel_multiconn.sh",
        modules=("nbd nbds_max=4",),
    )
    _guest_checks(
        result,
        multiconn_vm_image,
        [
            r"^ok: load1: buselab ram .*--ioctl is serving",
            r"^ok: load2: buselab ram .*--connections 2 is serving",
            r"^ok: mc: attached via netlink with 2 connections",
            r"^ok: mc: nbd0 has 2 hardware queues",
            r"^ok: mc: reads from CPU 0, 1, 0, 1 completed",
            r"^ok: mc: fsck.ext4 -fn clean",
            r"^ok: mc: checksums match after remount",
            r"^ok: mc: the kernel sent FLUSH and TRIM: flush=[1-9]\d* trim=[1-9]",
            r"^ok: mc: stats show 2 kernel connections",
            r"^ok: ctl: reads from both CPUs wait while paused",
            r"^ok: ctl: the reads completed after resume",
            r"^ok: mc: SIGINT -> exit 0, nbd0 size 0",
            r"^ok: re1: reads from CPU 0, 1, 0, 1 completed",
            r"^ok: re2: reads from CPU 0, 1, 0, 1 completed",
            r"^ok: re2: SIGINT -> exit 0, nbd0 size 0",
            r"^ok: load1: [1-9]\d* dd runs on nbd1, none failed",
            r"^ok: load2: [1-9]\d* dd runs on nbd2, none failed",
            r"^ok: load2: SIGTERM -> exit 0, nbd2 size 0",
            r"^ok: pause: guest_pause.py passed",
        ],
    )
    out = result.output
    assert "pause: attached /dev/nbd3 via netlink, 2 connection(s)" in out
    assert re.search(r"pause: ok: /dev/nbd3: reads held for 40 s", out)
    assert re.search(r"pause: ok: /dev/nbd3: after resume the reads completed", out)
    assert "pause: ok: /dev/nbd3: the kernel killed nothing" in out
    assert re.search(r"pause: ok: /dev/nbd3: stopped while paused in .*the held read \(\d+\) got its answer", out)


def test_kernel_attach_as_non_root_says_use_sudo(tmp_path: Path) -> None:
    """No VM needed: the root check comes before anything touches the kernel."""
    cmd = [sys.executable, "-m", "buselab", "ram", "--size", "16M", "/dev/nbd0", "--headless", "--seconds", "1"]
    if os.geteuid() == 0:
        require_tool("setpriv")
        # nobody, but allowed to read and search directories, so that it can reach this
        # interpreter and checkout even under /root: a real non-root euid all the same.
        caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        cmd = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups", *caps, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    if os.geteuid() == 0 and "setpriv" in done.stderr:
        unavailable(f"cannot drop to user nobody here: {done.stderr.strip()}")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("buselab: error: attaching /dev/nbd0 needs root: run it with sudo")
