"""Booting the VM image under qemu: the command line, the control share, the guest's console.

The guest mounts the host's root read-only over 9p and chroots into it (see image.INIT_SCRIPT),
so it runs the very same Python, buselab and tools as the host. A control share (a private
temporary directory of the host) carries the script the guest runs (``run.sh``), the modules
it loads and its settings in, and the script's output and exit status out.

``run_in_vm()`` runs one script and waits for the guest to power off (the kernel tests);
``start_vm()`` boots one that keeps running (the lesson's VM, see guest.py).

Software emulation (``-accel tcg``) unless ``$BUSELAB_VM_ACCEL`` says otherwise: on some hosts
/dev/kvm opens and the guest then hangs, so KVM is opt-in (``BUSELAB_VM_ACCEL=kvm``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import VmError, VmTimeout, VmUnavailable
from .image import Image, build_image

QEMU = os.environ.get("BUSELAB_VM_QEMU", "qemu-system-x86_64")  # read at import: the tests' fixtures name it

# Four devices are plenty and keep udev-less /dev small; a test that wants to see "nbd not
# loaded" passes modules=().
DEFAULT_RUN_MODULES = ("nbd nbds_max=4",)

GUEST_CTL = "/run/buselab-vm/ctl"  # the control share, inside the chroot
READY_MARKER = "buselab-vm: ready"

# The guest mounts its own tmpfs on these, hiding whatever the host has there.
GUEST_SCRATCH = ("/tmp", "/run", "/var/tmp")


def qemu_binary() -> str:
    """The qemu to run: ``$BUSELAB_VM_QEMU`` (read now, so a test can point it elsewhere) or the usual name."""
    return os.environ.get("BUSELAB_VM_QEMU", "qemu-system-x86_64")


@dataclass(frozen=True)
class VmResult:
    """What one ``run_in_vm`` call produced."""

    returncode: int
    output: str  # the script's stdout and stderr, interleaved
    console: str  # the guest's serial console: kernel messages and init's lines
    boot_seconds: float | None  # qemu start until the chroot was ready
    elapsed: float  # qemu start until qemu exited

    def check(self) -> VmResult:
        """Return self if the script exited 0, else raise VmError with its output."""
        if self.returncode != 0:
            raise VmError(f"script in VM exited with status {self.returncode}", self.console, self.output)
        return self


def run_in_vm(
    script: str,
    *,
    shared_dir: Path | None = None,
    timeout: float = 300.0,
    mem: str = "1G",
    cpus: int = 2,
    image: Image | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = DEFAULT_RUN_MODULES,
    shell: str = "/bin/sh",
) -> VmResult:
    """Boot the VM, run ``script`` with ``shell`` as root in a chroot of the host's root, power off.

    ``shared_dir`` (a host directory) is mounted read-write at the same absolute path in the
    guest and is the script's working directory (else /tmp, a guest tmpfs). ``modules`` are
    ``modprobe`` lines run before the script. ``env`` is added to a copy of the host's PATH,
    HOME, locale and Python variables. Returns the script's exit status and output; raises
    VmTimeout (qemu killed) after ``timeout`` seconds, VmError if the guest never ran it.
    """
    qemu = qemu_binary()
    if shutil.which(qemu) is None:
        raise VmUnavailable(f"missing tool for the VM: {qemu} (apt-get install qemu-system-x86)")
    image = image or build_image()
    shared = Path(shared_dir).resolve() if shared_dir is not None else None
    if shared is not None and not shared.is_dir():
        raise ValueError(f"shared_dir {shared} is not a directory")
    with tempfile.TemporaryDirectory(prefix="buselab-vm-ctl-") as tmp:
        ctl = Path(tmp)
        write_control(ctl, script, shared=shared, env=env, modules=modules, shell=shell)
        cmd = qemu_command(image, ctl, shared=shared, mem=mem, cpus=cpus)
        return _boot(cmd, ctl, timeout)


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the script sees: the host's useful variables, same Python first on PATH."""
    keep = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.setdefault("HOME", "/root")
    path = [
        "/run/buselab-vm/bin",  # the modprobe wrapper, see image.INIT_SCRIPT
        str(Path(sys.executable).parent),  # the very same interpreter, not a pyenv shim
        *os.environ.get("PATH", "").split(os.pathsep),
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    env["PATH"] = ":".join(dict.fromkeys(p for p in path if p))
    # The host root is read-only in the guest: no .pyc writing, and unbuffered so a killed
    # script still leaves its last lines.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["TERM"] = "dumb"
    env["BUSELAB_IN_VM"] = "1"
    env.update(extra or {})
    return env


def write_control(
    ctl: Path,
    script: str,
    *,
    shared: Path | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = DEFAULT_RUN_MODULES,
    shell: str = "/bin/sh",
    network: bool = False,
) -> None:
    """Fill the control share: the script, how to run it, the modules, the settings for init."""
    (ctl / "script.sh").write_text(script)
    (ctl / "modules").write_text("".join(f"{spec}\n" for spec in modules))
    (ctl / "extra_dirs").write_text("".join(f"{path}\n" for path in hidden_dirs()))
    (ctl / "config").write_text(
        f"SHARED_DIR={shlex.quote(str(shared) if shared else '')}\nNETWORK={'1' if network else ''}\n"
    )
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in guest_env(env).items())
    cwd = str(shared) if shared else "/tmp"
    (ctl / "run.sh").write_text(
        exports
        + f"cd {shlex.quote(cwd)} || exit 125\n"
        + f"{shlex.quote(shell)} {GUEST_CTL}/script.sh </dev/null >{GUEST_CTL}/output 2>&1\n"
        + f"echo $? >{GUEST_CTL}/status\n"
    )


def qemu_command(
    image: Image,
    ctl: Path,
    *,
    shared: Path | None = None,
    mem: str = "1G",
    cpus: int = 2,
    netdev: str | None = None,
) -> list[str]:
    """qemu's command line. ``netdev``: a ``-netdev`` spec (id n0) to give the guest a virtio NIC."""

    def virtfs(path: Path | str, tag: str, readonly: bool = False) -> list[str]:
        spec = f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"
        return ["-virtfs", spec + (",readonly=on" if readonly else "")]

    append = " ".join(
        (
            "console=ttyS0",
            "rdinit=/init",
            "panic=-1",  # a dying init reboots at once, which -no-reboot turns into qemu exiting
            "quiet",
            "mitigations=off",  # nothing to protect in a throwaway guest; faster under emulation
            "random.trust_cpu=on",
        )
    )
    cmd = [
        qemu_binary(),
        # KVM exists on some hosts but the guest hangs with it; software emulation works.
        "-accel", os.environ.get("BUSELAB_VM_ACCEL", "tcg,thread=multi"),
        "-cpu", os.environ.get("BUSELAB_VM_CPU", "max"),
        "-smp", str(cpus),
        "-m", mem,
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-serial", "stdio",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
        "-device", "virtio-rng-pci",
        *virtfs("/", "hostroot", readonly=True),
        *virtfs(ctl, "ctl"),
    ]  # fmt: skip
    for n, path in enumerate(hidden_dirs()):
        cmd += virtfs(path, f"extra{n}", readonly=True)
    if shared is not None:
        cmd += virtfs(shared, "shared")
    if netdev is not None:
        cmd += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    return cmd


def hidden_dirs() -> list[Path]:
    """Where this buselab and its Python environment live, if the guest's scratch mounts hide them.

    A checkout (and its .venv) under /tmp, as CI may clone it, or a venv or ``pip install
    --target`` directory there: the guest needs them at the same paths to run buselab.
    """
    package_root = Path(__file__).resolve().parents[2]  # the checkout, or site-packages
    candidates = [package_root, Path(sys.prefix).resolve()]
    candidates += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    hidden = sorted({p for p in candidates if p.is_dir() and any(p.is_relative_to(s) for s in GUEST_SCRATCH)})
    outermost: list[Path] = []
    for path in hidden:  # sorted: a parent comes before what it holds
        if not any(path.is_relative_to(kept) for kept in outermost):
            outermost.append(path)
    return outermost


def _boot(cmd: list[str], ctl: Path, timeout: float) -> VmResult:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = ConsoleReader(proc, start)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        console.join()
        raise VmTimeout(
            f"VM did not finish within {timeout:.0f} s (qemu killed)",
            console.text(),
            read_text(ctl / "output"),
        ) from None
    console.join()
    elapsed = time.monotonic() - start
    status = read_text(ctl / "status").strip()
    if not status.isdigit():
        raise VmError(
            f"the script did not run to the end (qemu exit {proc.returncode})",
            console.text(),
            read_text(ctl / "output"),
        )
    return VmResult(int(status), read_text(ctl / "output"), console.text(), console.ready_at, elapsed)


class ConsoleReader:
    """Collects qemu's serial output in a thread and notes when the guest became ready."""

    def __init__(self, proc: subprocess.Popen[bytes], start: float) -> None:
        self._proc = proc
        self._start = start
        self._lines: list[str] = []
        self.ready_at: float | None = None
        self._thread = threading.Thread(target=self._read, name="buselab-vm-console", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            if self.ready_at is None and READY_MARKER in line:
                self.ready_at = time.monotonic() - self._start
            self._lines.append(line)

    def join(self) -> None:
        self._thread.join(timeout=5)

    def text(self) -> str:
        return "".join(self._lines)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
