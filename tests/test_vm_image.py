"""The VM image builder's module selection and kernel choice, without building or booting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm import vm  # noqa: E402


def _moddir(tmp_path: Path, builtin: str) -> Path:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/block/nbd.ko.xz:\n"
        "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz\n"
        "kernel/fs/jbd2/jbd2.ko.xz:\n"
    )
    (tmp_path / "modules.builtin").write_text(builtin)
    return tmp_path


def test_modules_the_kernel_builds_in_are_skipped(tmp_path: Path) -> None:
    moddir = _moddir(tmp_path, "kernel/drivers/virtio/virtio_pci.ko\n")
    needed = vm._module_closure(moddir, ["virtio_pci", "ext4", "nbd"])
    assert sorted(needed) == [
        "kernel/drivers/block/nbd.ko.xz",
        "kernel/fs/ext4/ext4.ko.xz",
        "kernel/fs/jbd2/jbd2.ko.xz",
    ]


def test_a_module_neither_built_in_nor_present_is_an_error(tmp_path: Path) -> None:
    moddir = _moddir(tmp_path, "kernel/drivers/virtio/virtio_pci.ko\n")
    with pytest.raises(vm.VmUnavailable, match="kernel has no module 9p"):
        vm._module_closure(moddir, ["nbd", "9p"])


def test_buselab_vm_kernel_picks_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSELAB_VM_KERNEL", "linux-image-6.12.95+deb12-amd64")
    assert vm._kernel_package(tmp_path) == "linux-image-6.12.95+deb12-amd64"
