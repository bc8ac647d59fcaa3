"""Boot a Debian kernel that has the nbd driver under qemu and run shell scripts in it.

The host's kernel has no nbd driver, so buselab's kernel-attach tests run in a throwaway VM:

* ``build_image()`` downloads the kernel package that ``linux-image-amd64`` depends on and packs
  the modules we need (virtio, 9p, nbd, ext4, loop, fuse, ...) into a busybox initramfs.
  The result is cached per kernel version, so only the first run pays for it.
  ``build_image(multiconn_kernel())`` does the same for the release's backports kernel
  (bookworm-backports on Debian 12: 6.12), which the multi-connection checks need, since
  Debian 12's 6.1 loses requests with several connections (README, "Known problems").
* ``run_in_vm()`` boots it with qemu (software emulation), mounts the host's root read-only
  over 9p and ``chroot``\\ s into it, so the guest runs the very same Python, packages and
  project checkout as the host. The test's own directory is shared read-write at the same
  absolute path. The script's output and exit status come back through a third 9p share.

Standard library only, so it can run before anything is installed. For humans::

    python -m tests.vm.vm build
    python -m tests.vm.vm build --kernel multiconn     # the backports kernel
    python tests/vm/vm.py run 'modprobe nbd && ls /dev/nbd*'
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
# The release whose backports carry the kernel for the multi-connection checks, when
# /etc/os-release does not say (the guest runs the host's binaries: Debian 12 is the target).
DEFAULT_CODENAME = "bookworm"
QEMU = os.environ.get("BUSELAB_VM_QEMU", "qemu-system-x86_64")

# Modules packed into the initramfs, with everything they depend on (from modules.dep).
# crc32c_generic is only a soft dependency of ext4 (through the crypto API), so depmod does not
# list it; virtio_rng feeds getrandom() so mkfs and Python never wait for entropy.
INITRAMFS_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "loop",
    "fuse",
    "nbd",
)

# Loaded by the init script before anything else: what it needs to reach the host's files,
# plus the drivers that the kernel would otherwise have to auto-load behind our back.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_rng", "crc32c_generic", "ext4", "loop")

# Loaded per run (see run_in_vm(modules=...)). Four devices are plenty and keep udev-less
# /dev small; a test that wants to see "nbd not loaded" passes modules=().
DEFAULT_RUN_MODULES = ("nbd nbds_max=4",)

# Bump when the image layout changes in a way the inputs below do not capture.
RECIPE_VERSION = "1"

GUEST_CTL = "/run/buselab-vm/ctl"  # the control share, inside the chroot
READY_MARKER = "buselab-vm: ready"

# 9p: a large msize makes reads of the host's files (Python imports) much faster.
P9_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

INIT_SCRIPT = r"""#!/bin/busybox sh
# PID 1 of the buselab test VM. Mount the host's root read-only over 9p, run the script that
# the host left in the control share in a chroot of it, power off. Never exit: PID 1 exiting
# panics the kernel (panic=-1 and qemu -no-reboot turn that into an exit, but a slow one).
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "buselab-vm: $*"; }
halt_vm() {
    sync
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Modules the kernel asks for itself (request_module: fs-ext4, char-major-10-237, ...) are
# loaded by a usermode helper that runs in *this* root. Once the chroot is up, hand those to
# the host's kmod there (it reads modules.alias); until then, busybox modprobe.
cat > /sbin/kernel-modprobe <<'END'
#!/bin/sh
[ -x /newroot/run/buselab-vm/bin/modprobe ] &&
    exec chroot /newroot /run/buselab-vm/bin/modprobe "$@"
exec /sbin/modprobe "$@"
END
chmod 755 /sbin/kernel-modprobe
echo /sbin/kernel-modprobe > /proc/sys/kernel/modprobe

for m in @BOOT_MODULES@; do
    modprobe "$m" || say "cannot load module $m"
done
ip link set lo up

R=/newroot
mkdir -p $R
mount -t 9p -o @P9@,ro,cache=loose hostroot $R || { say "cannot mount the host root"; halt_vm; }
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
# The host root is read-only: give tools the writable scratch places they expect.
for d in /tmp /run /var/tmp; do
    [ -d "$R$d" ] && mount -t tmpfs -o mode=1777 tmpfs "$R$d"
done

V=$R/run/buselab-vm
mkdir -p $V/ctl $V/bin $V/modroot/lib/modules
mount -t 9p -o @P9@ ctl $V/ctl || { say "cannot mount the control share"; halt_vm; }
. $V/ctl/config

# The host has no /lib/modules for this kernel, so modprobe in the chroot is a wrapper (first
# on PATH) that points the host's kmod at the initramfs's modules.
mount --bind /lib/modules $V/modroot/lib/modules
for tool in modprobe modinfo; do
    case $tool in modprobe) opt=-d ;; *) opt=-b ;; esac
    printf '#!/bin/sh\nexec /sbin/%s %s /run/buselab-vm/modroot "$@"\n' $tool $opt > $V/bin/$tool
    chmod 755 $V/bin/$tool
done

while read -r spec; do
    [ -n "$spec" ] && { modprobe $spec || say "cannot load module $spec"; }
done < $V/ctl/modules

if [ -n "$PROJECT_DIR" ]; then
    # A checkout under /tmp (CI may clone there) is hidden by the guest's tmpfs too.
    mkdir -p "$R$PROJECT_DIR"
    mount -t 9p -o @P9@,ro project "$R$PROJECT_DIR" || { say "cannot mount $PROJECT_DIR"; halt_vm; }
fi
if [ -n "$SHARED_DIR" ]; then
    # Under /tmp (pytest's tmp_path) the path is hidden by the guest's tmpfs: recreate it.
    mkdir -p "$R$SHARED_DIR"
    mount -t 9p -o @P9@ shared "$R$SHARED_DIR" || { say "cannot mount $SHARED_DIR"; halt_vm; }
fi

say ready
chroot $R /bin/sh /run/buselab-vm/ctl/run.sh
say "done, status $(cat $V/ctl/status 2>/dev/null)"
halt_vm
"""


class VmError(RuntimeError):
    """The VM could not run the script; ``console`` holds what the guest printed."""

    def __init__(self, message: str, console: str = "", output: str = "") -> None:
        details = message
        if output:
            details += "\n--- script output ---\n" + _tail(output)
        if console:
            details += "\n--- console ---\n" + _tail(console)
        super().__init__(details)
        self.console = console
        self.output = output


class VmTimeout(VmError):
    """The guest did not finish in time; qemu was killed."""


class VmUnavailable(VmError):
    """A tool or package the VM needs is missing on this host (tests skip on this)."""


@dataclass(frozen=True)
class Image:
    """A bootable kernel and the initramfs that goes with it."""

    kernel: Path
    initrd: Path
    kernel_version: str


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


# ---------------------------------------------------------------------------------------------
# Building the image


def default_cache_dir() -> Path:
    env = os.environ.get("BUSELAB_VM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "buselab-vm"


def default_kernel() -> str:
    """The kernel for every VM test but the multi-connection ones: the release's own.

    ``BUSELAB_VM_KERNEL`` names another (a package, or a metapackage as ``name/release``).
    """
    return os.environ.get("BUSELAB_VM_KERNEL") or KERNEL_METAPACKAGE


def multiconn_kernel() -> str:
    """The kernel for the multi-connection checks: ``linux-image-amd64/<codename>-backports``.

    Debian 12's 6.1 loses a request now and then on a device with several connections (README,
    "Known problems"); the 6.12 of bookworm-backports does not. scripts/install-test-deps adds
    the backports to apt's sources. ``BUSELAB_VM_MULTICONN_KERNEL`` names another kernel, e.g.
    ``linux-image-amd64`` to watch 6.1 lose requests.
    """
    return os.environ.get("BUSELAB_VM_MULTICONN_KERNEL") or f"{KERNEL_METAPACKAGE}/{_codename()}-backports"


def _codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return DEFAULT_CODENAME
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.MULTILINE)
    return match.group(1) if match else DEFAULT_CODENAME


def build_image(kernel: str | None = None, cache_dir: Path | None = None) -> Image:
    """Return the VM image for ``kernel``, building it first if the cache has none for it.

    ``kernel`` is a kernel package (``linux-image-6.12.95+deb12-amd64``) or a metapackage that
    depends on one, optionally from a given release (``linux-image-amd64/bookworm-backports``);
    the default is default_kernel(). Idempotent and safe to call from several processes at
    once (a lock file serialises builds). A rerun costs one ``apt-cache`` query. Raises
    VmUnavailable when apt, dpkg, depmod or busybox are missing or the kernel package cannot
    be found or downloaded.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "lock"):
        package = _kernel_package(cache, kernel or default_kernel())
        kver = package.removeprefix("linux-image-")
        busybox = _static_busybox(cache)
        key = _recipe_key(busybox)
        target = cache / f"{kver}-{key}"
        if (target / "initrd.img").exists():
            return Image(target / "vmlinuz", target / "initrd.img", kver)
        _require_tools("dpkg-deb", "depmod")
        deb = _download(package, cache / "debs")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
            staging = Path(tmp)
            _build(deb, kver, busybox, staging / "image", staging / "work")
            (staging / "image").rename(target)  # atomic: a half-built image is never seen
        return Image(target / "vmlinuz", target / "initrd.img", kver)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise VmUnavailable(f"missing tool(s) for the test VM: {', '.join(missing)}")


def _run(cmd: Sequence[str], **kwargs: object) -> str:
    """Run a build step; a failure becomes a VmUnavailable that says what failed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)
    except FileNotFoundError as e:
        raise VmUnavailable(f"missing tool for the test VM: {cmd[0]}") from e
    except subprocess.CalledProcessError as e:
        raise VmUnavailable(f"{shlex.join(cmd)} failed: {e.stderr.strip()}") from e
    return done.stdout


def _kernel_package(cache: Path, spec: str) -> str:
    """The versioned kernel package that ``spec`` names, e.g. linux-image-6.1.0-57-amd64.

    A versioned package (``linux-image-6.12.95+deb12-amd64``) is itself; a metapackage
    (``linux-image-amd64``, ``linux-image-amd64/bookworm-backports``) is what it depends on,
    per apt. Each answer is noted in the cache, so that without apt (or offline with a broken
    apt cache) a warm cache keeps working with the kernel it had.
    """
    name = spec.partition("/")[0]
    if re.fullmatch(r"linux-image-\d\S*", name):
        return name
    note = cache / "kernels" / re.sub(r"[^A-Za-z0-9.+-]", "_", spec)
    try:
        out = _run(["apt-cache", "depends", spec])
    except VmUnavailable as e:
        failure: VmUnavailable | None = e
    else:
        match = re.search(r"Depends:\s*(linux-image-\S+)", out)
        if match:
            note.parent.mkdir(exist_ok=True)
            note.write_text(match.group(1) + "\n")
            return match.group(1)
        failure = None
    if note.exists():
        return note.read_text().strip()
    if spec == KERNEL_METAPACKAGE and not note.parent.exists():  # a cache from before the notes
        cached = sorted((cache / "debs").glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime)
        if cached:
            return cached[-1].name.split("_")[0]
    hint = " (scripts/install-test-deps adds the backports to apt's sources)" if "-backports" in spec else ""
    why = f": {failure}" if failure else ""
    raise VmUnavailable(f"cannot find the kernel package: `apt-cache depends {spec}`{hint}{why}")


def _download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise VmUnavailable(f"apt-get download {package} produced no .deb")
    return found[-1]


def _is_static_elf(path: Path) -> bool:
    """True if the ELF file has no program interpreter (PT_INTERP), i.e. runs without libc."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only: we boot x86_64
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        entry = phoff + i * phentsize
        if int.from_bytes(data[entry : entry + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def _static_busybox(cache: Path) -> Path:
    """A statically linked busybox: the host's (busybox-static) or one downloaded into the cache."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    cached = cache / "busybox-static" / "bin" / "busybox"
    if not cached.exists():
        deb = _download("busybox-static", cache / "debs")
        _run(["dpkg-deb", "-x", str(deb), str(cache / "busybox-static")])
    if not _is_static_elf(cached):
        raise VmUnavailable("no statically linked busybox (install busybox-static)")
    return cached


def _recipe_key(busybox: Path) -> str:
    """Short hash of everything that shapes the initramfs, so a change rebuilds it."""
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, INIT_SCRIPT, repr(INITRAMFS_MODULES), repr(BOOT_MODULES)):
        digest.update(part.encode())
    digest.update(busybox.read_bytes())
    return digest.hexdigest()[:12]


def _build(deb: Path, kver: str, busybox: Path, image: Path, work: Path) -> None:
    extracted = work / "deb"
    extracted.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(extracted)])
    _run(["depmod", "-b", str(extracted), kver])
    moddir = extracted / "lib" / "modules" / kver
    needed = _module_closure(moddir, INITRAMFS_MODULES)

    root = work / "initramfs"
    target_moddir = root / "lib" / "modules" / kver
    for rel in needed:
        _copy_module(moddir / rel, target_moddir / _strip_compression(rel))
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / name).exists():
            shutil.copy2(moddir / name, target_moddir / name)
    # A modules.dep that matches the decompressed subset, for busybox modprobe and kmod alike.
    _run(["depmod", "-b", str(root), kver])

    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    init = INIT_SCRIPT.replace("@BOOT_MODULES@", " ".join(BOOT_MODULES)).replace("@P9@", P9_OPTIONS)
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    for name in ("proc", "sys", "dev", "newroot", "tmp", "etc"):
        (root / name).mkdir(exist_ok=True)

    image.mkdir(parents=True)
    shutil.copy2(extracted / "boot" / f"vmlinuz-{kver}", image / "vmlinuz")
    with gzip.open(image / "initrd.img", "wb", compresslevel=6) as out:
        out.write(_newc_archive(root))


def _module_closure(moddir: Path, roots: Iterable[str]) -> list[str]:
    """Paths (relative to moddir) of the named modules and all they depend on, from modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin_list = moddir / "modules.builtin"
    builtin = {_module_name(line) for line in builtin_list.read_text().split()} if builtin_list.exists() else set()
    needed: list[str] = []
    todo = []
    for name in roots:
        key = name.replace("-", "_")
        if key not in by_name:
            if key in builtin:  # newer kernels build some of them in (6.12: virtio_pci, fuse)
                continue
            raise VmUnavailable(f"kernel has no module {name} (built in or missing?)")
        todo.append(by_name[key])
    while todo:
        path = todo.pop()
        if path not in needed:
            needed.append(path)
            todo.extend(deps[path])
    return needed


def _module_name(path: str) -> str:
    return _strip_compression(Path(path).name).removesuffix(".ko").replace("-", "_")


def _strip_compression(name: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if name.endswith(".ko" + suffix):
            return name.removesuffix(suffix)
    return name


def _copy_module(source: Path, dest: Path) -> None:
    """Copy a module, decompressing it: busybox modprobe cannot load compressed modules."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = source.name
    if name.endswith(".xz"):
        dest.write_bytes(lzma.decompress(source.read_bytes()))
    elif name.endswith(".gz"):
        dest.write_bytes(gzip.decompress(source.read_bytes()))
    elif name.endswith(".zst"):
        _require_tools("zstd")
        _run(["zstd", "-q", "-d", "-f", str(source), "-o", str(dest)])
    else:
        shutil.copy2(source, dest)


def _newc_archive(root: Path) -> bytes:
    """The tree under root as a cpio "newc" archive, everything owned by root.

    Written here rather than with cpio(1) so that a non-root build still yields root-owned files
    and a /dev/console node (the kernel needs it to give init a console).
    """
    chunks: list[bytes] = []
    inode = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal inode
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        chunks.append(_pad4(header + encoded))
        chunks.append(_pad4(data))
        inode += 1

    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        mode = path.lstat().st_mode
        if path.is_symlink():
            add(name, mode, os.readlink(path).encode())
        elif path.is_dir():
            add(name, mode)
        else:
            add(name, mode, path.read_bytes())
    add("dev/console", 0o020600, rdev=(5, 1))
    add("TRAILER!!!", 0)
    return b"".join(chunks)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------------------------------------
# Running a script


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
    _require_tools(QEMU)
    image = image or build_image()
    shared = Path(shared_dir).resolve() if shared_dir is not None else None
    if shared is not None and not shared.is_dir():
        raise ValueError(f"shared_dir {shared} is not a directory")
    with tempfile.TemporaryDirectory(prefix="buselab-vm-ctl-") as tmp:
        ctl = Path(tmp)
        _write_control(ctl, script, shared, env, modules, shell)
        cmd = _qemu_command(image, ctl, shared, mem, cpus)
        return _boot(cmd, ctl, timeout)


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the script sees: the host's useful variables, same Python first on PATH."""
    keep = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.setdefault("HOME", "/root")
    path = [
        "/run/buselab-vm/bin",  # the modprobe wrapper, see INIT_SCRIPT
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


def _write_control(
    ctl: Path,
    script: str,
    shared: Path | None,
    env: Mapping[str, str] | None,
    modules: Sequence[str],
    shell: str,
) -> None:
    (ctl / "script.sh").write_text(script)
    (ctl / "modules").write_text("".join(f"{spec}\n" for spec in modules))
    project = hidden_project_dir()
    (ctl / "config").write_text(
        f"SHARED_DIR={shlex.quote(str(shared) if shared else '')}\n"
        f"PROJECT_DIR={shlex.quote(str(project) if project else '')}\n"
    )
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in guest_env(env).items())
    cwd = str(shared) if shared else "/tmp"
    (ctl / "run.sh").write_text(
        exports
        + f"cd {shlex.quote(cwd)} || exit 125\n"
        + f"{shlex.quote(shell)} {GUEST_CTL}/script.sh </dev/null >{GUEST_CTL}/output 2>&1\n"
        + f"echo $? >{GUEST_CTL}/status\n"
    )


def _qemu_command(image: Image, ctl: Path, shared: Path | None, mem: str, cpus: int) -> list[str]:
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
        QEMU,
        # KVM exists on this host but the guest hangs with it; software emulation works.
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
    project = hidden_project_dir()
    if project is not None:
        cmd += virtfs(project, "project", readonly=True)
    if shared is not None:
        cmd += virtfs(shared, "shared")
    return cmd


# The guest mounts its own tmpfs on these, hiding whatever the host has there.
GUEST_SCRATCH = ("/tmp", "/run", "/var/tmp")


def hidden_project_dir() -> Path | None:
    """The checkout (and its .venv) if it lies where the guest's scratch mounts would hide it."""
    project = Path(__file__).resolve().parents[2]
    for scratch in GUEST_SCRATCH:
        if project.is_relative_to(scratch):
            return project
    return None


def _boot(cmd: list[str], ctl: Path, timeout: float) -> VmResult:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = _ConsoleReader(proc, start)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        console.join()
        raise VmTimeout(
            f"VM did not finish within {timeout:.0f} s (qemu killed)",
            console.text(),
            _read(ctl / "output"),
        ) from None
    console.join()
    elapsed = time.monotonic() - start
    status = _read(ctl / "status").strip()
    if not status.isdigit():
        raise VmError(
            f"the script did not run to the end (qemu exit {proc.returncode})",
            console.text(),
            _read(ctl / "output"),
        )
    return VmResult(int(status), _read(ctl / "output"), console.text(), console.ready_at, elapsed)


class _ConsoleReader:
    """Collects qemu's serial output in a thread and notes when the guest became ready."""

    def __init__(self, proc: subprocess.Popen[bytes], start: float) -> None:
        self._proc = proc
        self._start = start
        self._lines: list[str] = []
        self.ready_at: float | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
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


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--kernel",
        default=None,
        help="kernel package or metapackage[/release]; 'multiconn' for the multi-connection"
        " tests' (default: $BUSELAB_VM_KERNEL or linux-image-amd64)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", parents=[common], help="build (or find in the cache) the kernel and initramfs")
    run = sub.add_parser("run", parents=[common], help="boot the VM and run a shell command in it")
    run.add_argument("script", help="shell commands, run by /bin/sh as root in the guest")
    run.add_argument(
        "--shared-dir",
        type=Path,
        default=Path.cwd(),
        help="host directory shared read-write, the cwd (default: current dir)",
    )
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("--mem", default="1G")
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--console", action="store_true", help="also print the guest console")
    args = parser.parse_args(argv)

    try:
        t0 = time.monotonic()
        image = build_image(multiconn_kernel() if args.kernel == "multiconn" else args.kernel)
        print(
            f"image: kernel {image.kernel_version} ({time.monotonic() - t0:.1f} s)\n  {image.kernel}\n  {image.initrd}",
            file=sys.stderr,
        )
        if args.command == "build":
            return 0
        result = run_in_vm(
            args.script, shared_dir=args.shared_dir, timeout=args.timeout, mem=args.mem, cpus=args.cpus, image=image
        )
    except VmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.console:
        sys.stderr.write(result.console)
    sys.stdout.write(result.output)
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "?"
    print(f"[vm: exit {result.returncode}, boot {boot}, total {result.elapsed:.1f} s]", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
