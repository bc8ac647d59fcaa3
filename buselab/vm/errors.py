"""What can go wrong with the VM, each saying what failed (tests skip or fail on these)."""

from __future__ import annotations


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


class KernelUnavailable(VmUnavailable):
    """The kernel package could not be found or downloaded."""


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])
