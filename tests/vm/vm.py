"""Boot a Debian kernel that has the nbd driver under qemu and run shell scripts in it.

The host's kernel has no nbd driver, so buselab's kernel-attach tests run in a throwaway VM.
The machinery is buselab's own (buselab/vm: `buselab lesson NAME --vm` boots the same VM); this
module is the tests' name for it, plus the multi-connection kernel and a command line:

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

Standard library only (buselab.vm is too), so it can run before anything is installed. For humans::

    python -m tests.vm.vm build
    python -m tests.vm.vm build --kernel multiconn     # the backports kernel
    python tests/vm/vm.py run 'modprobe nbd && ls /dev/nbd*'
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's buselab, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from buselab.vm.errors import VmError, VmTimeout, VmUnavailable  # noqa: E402
from buselab.vm.image import (  # noqa: E402
    BOOT_MODULES,
    DEFAULT_CODENAME,
    INIT_SCRIPT,
    INITRAMFS_MODULES,
    KERNEL_METAPACKAGE,
    P9_OPTIONS,
    RECIPE_VERSION,
    Image,
    build_image,
    default_cache_dir,
    default_kernel,
    multiconn_kernel,
)
from buselab.vm.machine import (  # noqa: E402
    DEFAULT_RUN_MODULES,
    GUEST_CTL,
    GUEST_SCRATCH,
    QEMU,
    READY_MARKER,
    VmResult,
    guest_env,
    hidden_dirs,
    run_in_vm,
)

__all__ = [
    "BOOT_MODULES",
    "DEFAULT_CODENAME",
    "DEFAULT_RUN_MODULES",
    "GUEST_CTL",
    "GUEST_SCRATCH",
    "INITRAMFS_MODULES",
    "INIT_SCRIPT",
    "KERNEL_METAPACKAGE",
    "P9_OPTIONS",
    "QEMU",
    "READY_MARKER",
    "RECIPE_VERSION",
    "Image",
    "VmError",
    "VmResult",
    "VmTimeout",
    "VmUnavailable",
    "build_image",
    "default_cache_dir",
    "default_kernel",
    "guest_env",
    "hidden_dirs",
    "multiconn_kernel",
    "run_in_vm",
]


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
