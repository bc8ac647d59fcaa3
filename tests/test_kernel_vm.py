"""buselab attached to the real kernel nbd driver, in the test VM (tests/vm/vm.py).

Two boots, each running one guest script that prints an ``ok:`` or ``FAIL:`` line per check
(tests/vm/guest_kernel_*.sh, helpers in tests/vm/guest_lib.sh), so one boot covers many checks:

* ioctl (booted without nbd): the "module not loaded" error, buselab loading the module itself,
  ext4 on /dev/nbd0 (mkfs, files with known checksums, fsck -fn, remount and verify), FLUSH and
  TRIM seen, SIGINT -> exit 0 and size 0; one-line errors (busy, no such device, not an nbd
  device, size not a multiple of 512); kill -9 recovery, idle and while mounted; the file
  backend across a restart.
* netlink: the same ext4 check over 2 connections, `buselab ctl` pause/resume, chaining
  (lo /dev/nbd0 /dev/nbd1), --device auto, busy, kill -9 recovery (freed by netlink and by
  ioctls alone, and "held" while mounted),
  a 40 s pause of the gate that the devices survive, one connection and two, and a stop
  while paused that answers the held reads (tests/vm/guest_pause.py, in the background while
  the rest runs).

About 1 + 2.5 minutes on 2 quiet cores under software emulation (Python in the guest is ~11x
slower, and importing pyroute2 there takes seconds). The non-root check runs on the host.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

# pytest's default import mode puts tests/ (not the repo root) on sys.path: make `tests.vm`
# importable either way (as tests/test_vm_smoke.py does).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import require_tool, unavailable, vm, vm_image  # noqa: E402, F401  (pytest fixtures)
from tests.vm.vm import VmError  # noqa: E402

GUEST = Path(__file__).resolve().parent / "vm"
GUEST_TOOLS = ("mkfs.ext4", "fsck.ext4", "fstrim", "sha256sum", "timeout", "dd", "mount", "umount")


def _guest_checks(result, expected: list[str]) -> None:
    """Every guest check passed, and the ones named in `expected` (regexes) did run."""
    out = result.output
    print(out)
    print(f"boot {result.boot_seconds or 0:.1f} s, total {result.elapsed:.1f} s")
    failures = [line for line in out.splitlines() if line.startswith("FAIL:")]
    assert not failures, "\n".join(failures)
    oks = [line for line in out.splitlines() if line.startswith("ok:")]
    missing = [pattern for pattern in expected if not any(re.search(pattern, line) for line in oks)]
    assert not missing, f"checks that did not run: {missing}"
    assert "summary: 0 failure(s)" in out
    result.check()


@pytest.mark.vm
@pytest.mark.timeout(900)  # about 1 minute on a quiet machine, twice that when it is busy
def test_kernel_ioctl_in_vm(vm) -> None:  # noqa: F811
    require_tool(*GUEST_TOOLS)
    result = vm(f"sh {GUEST / 'guest_kernel_ioctl.sh'}\n", timeout=600, modules=())
    _guest_checks(
        result,
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


@pytest.mark.vm
@pytest.mark.timeout(1500)  # 1-3 minutes a boot; a boot the kernel's bug hangs takes about 5.5
def test_kernel_netlink_in_vm(vm) -> None:  # noqa: F811
    require_tool(*GUEST_TOOLS)
    if importlib.util.find_spec("pyroute2") is None:
        unavailable("needs pyroute2 (pip install 'buselab[kernel]') for the netlink path")

    # Six devices: the pause check runs on nbd4 and nbd5 in the background.
    def boot():
        return vm(
            f"sh {GUEST / 'guest_kernel_netlink.sh'}\n", timeout=840, modules=("nbd nbds_max=6",), env={"PAUSE": "40"}
        )

    boots = 4
    for attempt in range(boots):
        # A bug of the guest's kernel (Debian 6.1; README, "Known problems"): in about 1 run
        # of 4, with several nbd devices busy, a device with two connections loses a request
        # on its second hardware queue -- it never reaches the socket. nbdkit + nbd-client
        # -C 2 lose it the same way (tests/vm/repro_multiconn_hang.sh). The guest's watchdog
        # prints what it can see ("hang: ..."); then either the guest is stopped (VmError) or
        # the check that waited gives up and the run ends with its FAIL line. Either way the
        # test boots again, at most three times: in the full suite, on a busy 2-core machine,
        # stop 10 saw the first boot hang in 2 runs of 4. Any other failure fails at once.
        try:
            result = boot()
            output = result.output
            if "hang: still running" not in output or attempt == boots - 1:
                break
        except VmError as exc:
            if "hang: still running" not in exc.output or attempt == boots - 1:
                raise
            output = exc.output
        print(output)
        # A warning, so that CI's summary shows what the watchdog saw even when a later
        # boot passes (a passing test's output is not shown).
        seen = "\n".join(line for line in output.splitlines() if line.startswith(("hang:", "FAIL:", "==")))
        warnings.warn(f"the netlink VM test's guest hung; booting again. It saw:\n{seen}", stacklevel=1)
    _guest_checks(
        result,
        [
            r"^ok: nl: attached via netlink with 2 connections",
            r"^ok: nl: nbd0 has 2 hardware queues",
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
            r"^ok: k9b: said it freed nbd2",
            r"^ok: k9c: --ioctl freed a netlink leftover",
            r"^ok: k9c: SIGTERM -> exit 0, nbd2 size 0",
            r"^ok: held after kill -9: buselab: error: /dev/nbd3 is still held.*umount",
            r"^ok: km2: SIGTERM -> exit 0, nbd3 size 0",
            r"^ok: pause: guest_pause.py passed",
        ],
    )
    assert re.search(r"pause: ok: /dev/nbd5: reads held for 40 s", result.output)
    assert "pause: ok: /dev/nbd5: the kernel killed nothing" in result.output
    assert re.search(r"pause: ok: /dev/nbd4: after resume the reads completed", result.output)
    assert re.search(
        r"pause: ok: /dev/nbd5: stopped while paused in .*the held read \(\d+\) got its answer", result.output
    )


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
