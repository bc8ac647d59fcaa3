"""Attaching a buselab engine to /dev/nbdN through the kernel's nbd driver.

Two ways, as the kernel offers them:

- netlink (preferred where the `nbd` generic-netlink family exists): hand the
  kernel one end of N socketpairs with NBD_CMD_CONNECT; several connections
  give the device several hardware queues.
- ioctl (BUSE's way, `--ioctl`): NBD_SET_BLKSIZE, NBD_SET_SIZE_BLOCKS,
  NBD_SET_FLAGS, NBD_SET_TIMEOUT, NBD_SET_SOCK, then NBD_DO_IT blocks in its
  own thread for as long as the device is attached.

Either way the engine serves our end of each pair exactly like a network
client in the transmission phase (no handshake, simple replies only), and
`detach` flushes the device, disconnects, waits for the kernel to let go and
leaves the device at size 0 and free (BUSE left nbd0 attached, issue #29).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass

from ..engine.engine import Engine
from ..errors import UserError
from ..protocol import constants as c
from .network import NetworkServer

log = logging.getLogger("buselab")

NBD_MAJOR = 43
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A

# The flags the kernel client understands; the rest of our export flags mean
# nothing to it.
KERNEL_FLAGS = (
    c.TF_HAS_FLAGS
    | c.TF_READ_ONLY
    | c.TF_SEND_FLUSH
    | c.TF_SEND_FUA
    | c.TF_ROTATIONAL
    | c.TF_SEND_TRIM
    | c.TF_SEND_WRITE_ZEROES
    | c.TF_CAN_MULTI_CONN
)


@dataclass
class KernelOptions:
    connections: int = 1
    use_ioctl: bool = False
    timeout: int = 0  # seconds; 0 = wait forever, so a paused device is never killed
    block_size: int | None = None


def _sys(index: int, name: str) -> str | None:
    try:
        with open(f"/sys/block/nbd{index}/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def device_size(index: int) -> int:
    """Size in bytes the kernel reports for nbdN (0 when detached)."""
    sectors = _sys(index, "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def holder_pid(index: int) -> int | None:
    """The pid that attached nbdN, if the device is attached."""
    pid = _sys(index, "pid")
    return int(pid) if pid and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def ensure_module() -> None:
    """Load nbd if it is not loaded; one clear line if that is impossible."""
    if os.path.isdir("/sys/module/nbd"):
        return
    try:
        subprocess.run(["modprobe", "nbd"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass
    if not os.path.isdir("/sys/module/nbd"):
        raise UserError("the nbd kernel module is not loaded and could not be loaded: run `sudo modprobe nbd`")
    # udev may take a moment to create the nodes.
    for _ in range(50):
        if os.path.exists("/dev/nbd0"):
            return
        time.sleep(0.05)


def device_index(device: str) -> int:
    match = re.fullmatch(r"/dev/nbd(\d+)", device)
    if not match:
        raise UserError(f"{device} is not an nbd device: use /dev/nbdN, or --device auto")
    return int(match.group(1))


def check_device(device: str) -> int:
    """The index of an existing nbd device node, or a UserError saying what is wrong."""
    index = device_index(device)
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise UserError(
            f"{device} does not exist: the nbd module made fewer devices (modprobe nbd nbds_max=N), or use --device auto"
        ) from None
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != NBD_MAJOR:
        raise UserError(f"{device} is not an nbd device (block major {NBD_MAJOR})")
    return index


def free_device() -> str:
    """The first /dev/nbdN that nobody has attached."""
    indexes = sorted(int(m.group(1)) for name in os.listdir("/sys/block") if (m := re.fullmatch(r"nbd(\d+)", name)))
    for index in indexes:
        if holder_pid(index) is None and device_size(index) == 0 and os.path.exists(f"/dev/nbd{index}"):
            return f"/dev/nbd{index}"
    raise UserError("every nbd device is in use: detach one, or load more with `modprobe nbd nbds_max=N`")


def _release_stale(device: str, index: int, netlink: object | None) -> None:
    """Free a device left attached by a process that no longer exists."""
    pid = holder_pid(index)
    if pid is not None and _alive(pid):
        raise UserError(
            f"{device} is in use by process {pid} ({_process_name(pid)}): stop it first, or pick another device with --device auto"
        )
    if pid is None and device_size(index) == 0:
        return
    log.warning("%s was left attached by process %s, which is gone: freeing it", device, pid if pid else "?")
    print(f"buselab: {device} was left attached by a process that is gone (pid {pid}); freeing it", flush=True)
    if netlink is not None:
        try:
            netlink.disconnect(index)  # type: ignore[attr-defined]
        except OSError:
            pass
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        for request in (NBD_DISCONNECT, NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
            try:
                fcntl.ioctl(fd, request)
            except OSError:
                pass
    finally:
        os.close(fd)
    for _ in range(100):
        if holder_pid(index) is None:
            return
        time.sleep(0.05)
    raise UserError(f"{device} is still held after trying to free it: run `sudo nbd-client -d {device}` and try again")


def _block_size(size: int, wanted: int | None) -> int:
    for bs in [wanted] if wanted else [4096, 1024, 512]:
        if size % bs == 0:
            return bs
    if wanted:
        raise UserError(f"the disk size {size} is not a multiple of the block size {wanted}")
    raise UserError(f"the disk size {size} is not a multiple of 512: the kernel needs whole sectors")


class KernelAttachment:
    """An engine attached to /dev/nbdN; `detach` undoes everything."""

    def __init__(self, device: str, index: int, method: str) -> None:
        self.device = device
        self.index = index
        self.method = method  # "netlink" or "ioctl"
        self._fd: int | None = None  # ioctl: the open device
        self._do_it: threading.Thread | None = None
        self._do_it_error: OSError | None = None
        self._netlink = None
        self._kernel_ends: list[socket.socket] = []
        self._connections: list = []
        self._detached = False

    def _flush_device(self) -> None:
        """Push the block layer's dirty pages to us before we go."""
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def detach(self, timeout: float = 20.0) -> None:
        if self._detached:
            return
        self._detached = True
        flusher = threading.Thread(target=self._flush_device, daemon=True)
        flusher.start()
        flusher.join(timeout / 2)
        if self.method == "netlink":
            try:
                self._netlink.disconnect(self.index)  # type: ignore[union-attr]
            except OSError as exc:
                log.warning("netlink disconnect of %s failed: %s", self.device, exc)
        elif self._fd is not None:
            try:
                fcntl.ioctl(self._fd, NBD_DISCONNECT)
            except OSError as exc:
                log.warning("NBD_DISCONNECT on %s failed: %s", self.device, exc)
        deadline = time.monotonic() + timeout
        if self._do_it is not None:
            self._do_it.join(max(0.0, deadline - time.monotonic()))
        # Our serving threads end when the kernel sends DISC or drops the socket.
        for conn in self._connections:
            while conn.sock.fileno() != -1 and time.monotonic() < deadline:
                time.sleep(0.01)
        if self._fd is not None:
            for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
                try:
                    fcntl.ioctl(self._fd, request)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = None
        for sock in self._kernel_ends:
            sock.close()
        if self._netlink is not None:
            self._netlink.close()
        # The kernel clears the size once its last reference goes; wait for it.
        while device_size(self.index) and time.monotonic() < deadline:
            time.sleep(0.02)
        if device_size(self.index):
            log.warning("%s still reports a size after detaching", self.device)


def attach(
    device: str, engine: Engine, network: NetworkServer, options: KernelOptions | None = None
) -> KernelAttachment:
    """Attach `engine` to `device` (/dev/nbdN, or "auto" / "/dev/nbd" for any free one)."""
    options = options or KernelOptions()
    if os.geteuid() != 0:
        raise UserError(f"attaching {device} needs root: run it with sudo (or leave DEVICE out to serve over NBD)")
    ensure_module()
    from .netlink import NbdNetlink

    netlink = None
    if not options.use_ioctl:
        try:
            netlink = NbdNetlink()
        except Exception as exc:  # noqa: BLE001 - no family: old kernel, fall back to ioctls
            log.info("nbd netlink unavailable (%s); using ioctls", exc)
            netlink = None
    if options.connections > 1 and netlink is None:
        raise UserError("--connections needs the nbd netlink interface, which this kernel does not offer")
    if device in ("auto", "/dev/nbd"):
        device = free_device()
        print(f"buselab: using {device}", flush=True)
    index = check_device(device)
    _release_stale(device, index, netlink)
    size = engine.size
    block_size = _block_size(size, options.block_size)
    flags = engine.flags & KERNEL_FLAGS
    if netlink is not None:
        attachment = _attach_netlink(device, index, engine, network, netlink, size, block_size, flags, options)
    else:
        attachment = _attach_ioctl(device, index, engine, network, size, block_size, flags, options)
    engine.telemetry.event(f"attached {device} via {attachment.method}")
    return attachment


def _attach_netlink(device, index, engine, network, netlink, size, block_size, flags, options) -> KernelAttachment:
    attachment = KernelAttachment(device, index, "netlink")
    attachment._netlink = netlink
    pairs = [socket.socketpair() for _ in range(options.connections)]
    try:
        netlink.connect(
            [kernel_end.fileno() for _, kernel_end in pairs],
            size,
            block_size,
            flags,
            index=index,
            timeout=options.timeout,
        )
    except Exception as exc:
        for ours, kernel_end in pairs:
            ours.close()
            kernel_end.close()
        netlink.close()
        if getattr(exc, "code", None) == errno.EBUSY:
            raise UserError(f"{device} is busy: another program has attached it") from None
        raise UserError(f"the kernel refused to attach {device}: {exc}") from None
    for ours, kernel_end in pairs:
        attachment._kernel_ends.append(kernel_end)  # the kernel holds its own reference too
        attachment._connections.append(network.serve_socket(ours, f"kernel {device}", kernel=True))
    return attachment


def _attach_ioctl(device, index, engine, network, size, block_size, flags, options) -> KernelAttachment:
    attachment = KernelAttachment(device, index, "ioctl")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {device}: {exc.strerror}") from None
    ours, kernel_end = socket.socketpair()
    try:
        # Order matters: block size before the size in blocks, both before the socket.
        fcntl.ioctl(fd, NBD_SET_BLKSIZE, block_size)
        fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size // block_size)
        fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
        fcntl.ioctl(fd, NBD_SET_TIMEOUT, options.timeout)
        fcntl.ioctl(fd, NBD_SET_SOCK, kernel_end.fileno())
    except OSError as exc:
        ours.close()
        kernel_end.close()
        try:
            fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        except OSError:
            pass
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise UserError(f"{device} is busy: another program has attached it") from None
        raise UserError(f"the kernel refused to attach {device}: {exc.strerror}") from None
    attachment._fd = fd
    attachment._kernel_ends.append(kernel_end)
    attachment._connections.append(network.serve_socket(ours, f"kernel {device}", kernel=True))

    def do_it() -> None:
        try:
            fcntl.ioctl(fd, NBD_DO_IT)  # blocks (without the GIL) while attached
        except OSError as exc:
            attachment._do_it_error = exc

    attachment._do_it = threading.Thread(target=do_it, name=f"buselab-do-it-{index}", daemon=True)
    attachment._do_it.start()
    return attachment
