"""pytest fixtures for tests that run in the VM: ``vm_image`` and ``vm``, on the release's kernel
(Debian 12: 6.1), and ``multiconn_vm_image`` and ``multiconn_vm``, on its backports kernel (6.12),
for the checks with several connections per device, which 6.1 fails now and then by a bug of
its own (README, "Known problems").

Import them into a test module (``from tests.vm.fixtures import vm, vm_image``) or a conftest.
A missing tool, or a kernel that cannot be downloaded, skips the test with the reason, except
under ``BUSELAB_REQUIRE_ALL=1`` (as CI sets it), where it fails instead: CI must not skip
silently.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from .vm import QEMU, Image, VmResult, VmUnavailable, build_image, default_kernel, multiconn_kernel, run_in_vm


def require_all() -> bool:
    """True when every test must run (CI): then a missing tool is a failure, not a skip."""
    return os.environ.get("BUSELAB_REQUIRE_ALL") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the current test because of ``reason``, or fail it under BUSELAB_REQUIRE_ALL=1."""
    if require_all():
        pytest.fail(f"{reason} (BUSELAB_REQUIRE_ALL is set, so this is not skipped)", pytrace=False)
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    """Skip (or fail, see unavailable) unless every named program is on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} on PATH")


def _image(kernel: str) -> Image:
    # The guest runs the host's own binaries in a chroot, so the host must be x86_64 too.
    if platform.machine() != "x86_64":
        unavailable(f"the test VM needs an x86_64 host, not {platform.machine()}")
    require_tool(QEMU)
    try:
        return build_image(kernel)
    except VmUnavailable as e:
        unavailable(f"cannot build the test VM ({kernel}): {e}")


def _runner(image: Image, tmp_path: Path) -> Callable[..., VmResult]:
    def run(script: str, *, timeout: float = 240.0, **options: object) -> VmResult:
        return run_in_vm(script, shared_dir=tmp_path, timeout=timeout, image=image, **options)

    return run


@pytest.fixture(scope="session")
def vm_image() -> Image:
    """The kernel + initramfs for run_in_vm, built once per cache (see tests/vm/vm.py)."""
    return _image(default_kernel())


@pytest.fixture(scope="session")
def multiconn_vm_image() -> Image:
    """The same for the backports kernel (tests/vm/vm.py's multiconn_kernel())."""
    return _image(multiconn_kernel())


@pytest.fixture
def vm(vm_image: Image, tmp_path: Path) -> Callable[..., VmResult]:
    """``vm(script, timeout=..., **run_in_vm_options)``: run a script in a fresh VM.

    The test's tmp_path is shared read-write at the same path and is the script's cwd.
    """
    return _runner(vm_image, tmp_path)


@pytest.fixture
def multiconn_vm(multiconn_vm_image: Image, tmp_path: Path) -> Callable[..., VmResult]:
    """Like ``vm``, booting the backports kernel: for devices with several connections."""
    return _runner(multiconn_vm_image, tmp_path)
