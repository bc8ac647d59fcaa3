"""A small qemu VM with a Debian kernel that has the nbd driver, for whoever cannot attach /dev/nbdN.

- image: the kernel and a busybox initramfs, built once per user into a cache.
- machine: qemu's command line and the control share; run one script (the tests) or keep a
  guest running.
- guest (host side) and agent (inside the guest): the lesson's VM, where /dev/nbd0 is attached
  to this buselab's server and the lesson's commands run (`buselab lesson NAME --vm`).
"""

from .errors import KernelUnavailable, VmError, VmTimeout, VmUnavailable
from .image import Image, build_image, default_cache_dir, default_kernel, multiconn_kernel
from .machine import VmResult, guest_env, qemu_binary, run_in_vm

__all__ = [
    "Image",
    "KernelUnavailable",
    "VmError",
    "VmResult",
    "VmTimeout",
    "VmUnavailable",
    "build_image",
    "default_cache_dir",
    "default_kernel",
    "guest_env",
    "multiconn_kernel",
    "qemu_binary",
    "run_in_vm",
]
