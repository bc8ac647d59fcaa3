"""The VM image builder's module selection and kernel choice, without building or booting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from buselab.vm import image as vm  # noqa: E402  (the image builder lives in the package)


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
    assert vm._kernel_package(tmp_path, vm.default_kernel()) == "linux-image-6.12.95+deb12-amd64"


def test_the_multiconn_kernel_comes_from_the_backports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUSELAB_VM_MULTICONN_KERNEL", raising=False)
    monkeypatch.delenv("BUSELAB_VM_KERNEL", raising=False)
    monkeypatch.setattr(vm, "_codename", lambda: "bookworm")
    assert vm.multiconn_kernel() == "linux-image-amd64/bookworm-backports"
    assert vm.default_kernel() == "linux-image-amd64"
    monkeypatch.setenv("BUSELAB_VM_MULTICONN_KERNEL", "linux-image-amd64")
    assert vm.multiconn_kernel() == "linux-image-amd64"


def _apt_cache(answers: dict[str, str]):
    """A stand-in for vm._run: `apt-cache depends SPEC` answers from the dict, else fails."""

    def run(cmd, **kwargs):
        if cmd[:2] == ["apt-cache", "depends"] and cmd[2] in answers:
            return answers[cmd[2]]
        raise vm.VmUnavailable(f"{cmd} failed")

    return run


def test_each_kernel_is_resolved_and_remembered_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backports = "linux-image-amd64/bookworm-backports"
    answers = {
        "linux-image-amd64": "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n",
        backports: "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n",
    }
    monkeypatch.setattr(vm, "_run", _apt_cache(answers))
    assert vm._kernel_package(tmp_path, "linux-image-amd64") == "linux-image-6.1.0-57-amd64"
    assert vm._kernel_package(tmp_path, backports) == "linux-image-6.12.95+deb12-amd64"
    # Offline (apt fails): each keeps the kernel it had, even with a newer .deb in the cache.
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "linux-image-6.12.95+deb12-amd64_6.12.95-1_amd64.deb").write_bytes(b"")
    monkeypatch.setattr(vm, "_run", _apt_cache({}))
    assert vm._kernel_package(tmp_path, "linux-image-amd64") == "linux-image-6.1.0-57-amd64"
    assert vm._kernel_package(tmp_path, backports) == "linux-image-6.12.95+deb12-amd64"


def test_a_backports_kernel_apt_does_not_know_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # apt-cache prints "<linux-image-amd64>" and exits 0 for a release it has no lists of.
    monkeypatch.setattr(vm, "_run", lambda cmd, **kwargs: "<linux-image-amd64>\n")
    with pytest.raises(vm.VmUnavailable, match="install-test-deps adds the backports"):
        vm._kernel_package(tmp_path, "linux-image-amd64/bookworm-backports")
