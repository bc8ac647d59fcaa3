"""The VM image: a Debian kernel that has the nbd driver, and a busybox initramfs to boot it.

The host's kernel may have no nbd driver (or the user no root), so buselab boots a throwaway
VM for it: ``buselab lesson NAME --vm`` and the kernel tests (tests/vm) alike.
``build_image()`` downloads the kernel package that ``linux-image-amd64`` depends on (``apt-get
download``: no root needed) and packs the modules the guest needs (virtio, 9p, nbd, ext4, loop,
fuse, virtio_net, ...) into a busybox initramfs whose init mounts the host's root read-only over
9p and chroots into it, so the guest runs the host's own Python, buselab and tools.

The result is cached per user and per kernel version (``~/.cache/buselab-vm``, or
``$BUSELAB_VM_CACHE``, which may be a prebuilt cache the user can only read), so only the
first run pays for it. Standard library only: the tests build it before anything is installed.
"""

from __future__ import annotations

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
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelUnavailable, VmUnavailable

KERNEL_METAPACKAGE = "linux-image-amd64"
# The release whose backports carry the kernel for the multi-connection checks, when
# /etc/os-release does not say (the guest runs the host's binaries: Debian 12 is the target).
DEFAULT_CODENAME = "bookworm"

# Modules packed into the initramfs, with everything they depend on (from modules.dep).
# crc32c_generic is only a soft dependency of ext4 (through the crypto API), so depmod does not
# list it; virtio_rng feeds getrandom() so mkfs and Python never wait for entropy. virtio_net
# is loaded only by a run that asks for the network (the lesson's VM reaches buselab on the host).
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
    "virtio_net",
)

# Loaded by the init script before anything else: what it needs to reach the host's files,
# plus the drivers that the kernel would otherwise have to auto-load behind our back.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_rng", "crc32c_generic", "ext4", "loop")

# Bump when the image layout changes in a way the inputs below do not capture.
RECIPE_VERSION = "2"

# 9p: a large msize makes reads of the host's files (Python imports) much faster.
P9_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

INIT_SCRIPT = r"""#!/bin/busybox sh
# PID 1 of the buselab VM. Mount the host's root read-only over 9p, run the script that
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

# Host directories that the guest's scratch mounts hide (a checkout or a venv under /tmp: CI
# may clone there), one a line, shared read-only as extra0, extra1, ...
n=0
while read -r dir; do
    [ -n "$dir" ] || continue
    mkdir -p "$R$dir"
    mount -t 9p -o @P9@,ro "extra$n" "$R$dir" || { say "cannot mount $dir"; halt_vm; }
    n=$((n + 1))
done < $V/ctl/extra_dirs
if [ -n "$NETWORK" ]; then
    # qemu's user networking: we are 10.0.2.15, the host's loopback is 10.0.2.2. No default
    # route: the host is all the guest has to reach.
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || say "cannot set up the network"
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


@dataclass(frozen=True)
class Image:
    """A bootable kernel and the initramfs that goes with it."""

    kernel: Path
    initrd: Path
    kernel_version: str


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
    try:
        return _build_image(cache, kernel)
    except PermissionError as exc:  # another user's cache (root's, say), or a part of it
        raise VmUnavailable(
            f"cannot read the VM image cache {cache} ({exc.filename}: {exc.strerror}): {_CACHE_HINT}"
        ) from None


# Where a user who cannot use the default cache gets one (docs/lessons.md, "Without root").
_CACHE_HINT = (
    "set BUSELAB_VM_CACHE to a directory of your own (empty: the image is built there once) or to a readable"
    " copy of a prebuilt cache"
)


def _build_image(cache: Path, kernel: str | None) -> Image:
    with contextlib.suppress(OSError):  # a prebuilt cache may be read-only: it only has to hold the image
        cache.mkdir(parents=True, exist_ok=True)
    package = _kernel_package(cache, kernel or default_kernel())
    kver = package.removeprefix("linux-image-")
    found = _cached_image(cache, kver)
    if found is not None:
        return found
    if not os.access(cache, os.W_OK):
        raise VmUnavailable(
            f"the VM image cache {cache} has no image for kernel {kver} and is not writable: {_CACHE_HINT}"
        )
    with _locked(cache / "lock"):
        busybox = _static_busybox(cache)
        target = cache / f"{kver}-{_recipe_key(busybox)}"
        if (target / "initrd.img").exists():  # another process built it while we waited
            return Image(target / "vmlinuz", target / "initrd.img", kver)
        _require_tools("dpkg-deb", "depmod")
        deb = _download(package, cache / "debs")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
            staging = Path(tmp)
            _build(deb, kver, busybox, staging / "image", staging / "work")
            (staging / "image").rename(target)  # atomic: a half-built image is never seen
        return Image(target / "vmlinuz", target / "initrd.img", kver)


def _cached_image(cache: Path, kver: str) -> Image | None:
    """The image of this recipe for ``kver`` if the cache has it (no lock, no writes: may be read-only)."""
    try:
        busybox = _static_busybox(cache, download=False)
    except VmUnavailable:
        return None
    target = cache / f"{kver}-{_recipe_key(busybox)}"
    if (target / "initrd.img").exists():
        return Image(target / "vmlinuz", target / "initrd.img", kver)
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise VmUnavailable(f"missing tool(s) for the VM image: {', '.join(missing)} ({_install_hint(missing)})")


def _run(cmd: Sequence[str], **kwargs: object) -> str:
    """Run a build step; a failure becomes a VmUnavailable that says what failed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)
    except FileNotFoundError as e:
        raise VmUnavailable(f"missing tool for the VM image: {cmd[0]} ({_install_hint([cmd[0]])})") from e
    except subprocess.CalledProcessError as e:
        raise VmUnavailable(f"{shlex.join(cmd)} failed: {_last_line(e.stderr)}") from e
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
            with contextlib.suppress(OSError):  # a read-only prebuilt cache: nothing to note
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
    raise KernelUnavailable(f"cannot find the kernel package: `apt-cache depends {spec}`{hint}{why}")


def _download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        try:
            _run(["apt-get", "download", package], cwd=debs)
        except VmUnavailable as e:
            raise KernelUnavailable(str(e)) if package.startswith("linux-image-") else e from None
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


def _static_busybox(cache: Path, download: bool = True) -> Path:
    """A statically linked busybox: the host's (busybox-static) or one downloaded into the cache."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    cached = cache / "busybox-static" / "bin" / "busybox"
    if not cached.exists() and download:
        deb = _download("busybox-static", cache / "debs")
        _run(["dpkg-deb", "-x", str(deb), str(cache / "busybox-static")])
    if not cached.exists() or not _is_static_elf(cached):
        raise VmUnavailable("no statically linked busybox (apt-get install busybox-static)")
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


# Debian packages that bring the tools the image is built with.
_TOOL_PACKAGES = {"dpkg-deb": "dpkg", "depmod": "kmod", "apt-get": "apt", "apt-cache": "apt", "zstd": "zstd"}


def _install_hint(tools: Sequence[str]) -> str:
    packages = dict.fromkeys(_TOOL_PACKAGES.get(tool, tool) for tool in tools)
    return "apt-get install " + " ".join(packages)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
