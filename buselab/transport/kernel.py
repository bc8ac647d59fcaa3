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
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ..engine.engine import Engine
from ..errors import UserError
from ..processes import pid_alive, process_name
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

# With timeout 0 and one connection the kernel waits for ever and only logs "Possible stuck
# request" every 30 s. With several connections it does not: after its default 30 s it marks
# the connection dead and requeues the request elsewhere, so a paused gate would kill every
# connection in turn. There "for ever" has to be a long timeout instead. 30 days: tag_set.timeout
# is an unsigned int of jiffies, and 30 days at HZ=1000 still fits.
LONG_TIMEOUT = 30 * 24 * 3600

_SO_SNDBUFFORCE = 32  # Linux; not in Python's socket module
_KERNEL_SOCKET_BUFFER = 4 << 20

# Signals that must reach the main thread, never interrupt NBD_DO_IT: the kernel treats an
# interrupted DO_IT as "the server went away" and fails every request in flight.
_MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


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


# The request queue's limits that shape what reaches buselab (Documentation/ABI/stable/sysfs-block).
QUEUE_LIMITS = (
    "max_sectors_kb",  # the largest request the kernel sends: bigger I/O is split at this size
    "max_hw_sectors_kb",  # the driver's ceiling for max_sectors_kb
    "read_ahead_kb",  # the page cache's largest readahead window
    "nr_requests",  # requests the queue holds per hardware queue
    "scheduler",  # the I/O scheduler, the one in use in brackets
    "logical_block_size",  # bytes: the smallest unit a request addresses
)


def queue_limits(block: str) -> dict[str, int | str]:
    """The queue limits of /dev/BLOCK (nbd0, loop3, ...) as sysfs has them (numbers as ints)."""
    limits: dict[str, int | str] = {}
    for name in QUEUE_LIMITS:
        try:
            with open(f"/sys/block/{block}/queue/{name}") as f:
                text = f.read().strip()
        except OSError:
            continue
        if name == "scheduler":  # "mq-deadline [none]": the one in brackets is in use
            chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
            limits[name] = chosen[0] if chosen else text
        else:
            limits[name] = int(text) if text.isdigit() else text
    return limits


def device_size(index: int) -> int:
    """Size in bytes the kernel reports for nbdN (0 when detached)."""
    sectors = _sys(index, "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def holder_pid(index: int) -> int | None:
    """The process that attached nbdN, if the device is attached.

    The kernel records the task that started the device: with ioctls that is the thread
    blocked in NBD_DO_IT, so map a thread id to its process.
    """
    pid = _sys(index, "pid")
    if not (pid and pid.isdigit()):
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(pid)


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


def _mount_points(device: str) -> list[str]:
    """Where `device` is mounted (in this mount namespace)."""
    try:
        real = os.path.realpath(device)
        with open("/proc/self/mounts") as f:
            return [fields[1] for fields in (line.split() for line in f) if os.path.realpath(fields[0]) == real]
    except OSError:
        return []


def _what_holds(device: str, index: int) -> str:
    """A short phrase on what keeps `device` open, for error messages."""
    mounts = _mount_points(device)
    if mounts:
        return f"it is mounted at {', '.join(mounts)}: unmount it (umount {device})"
    try:
        holders = os.listdir(f"/sys/block/nbd{index}/holders")
    except OSError:
        holders = []
    if holders:
        return f"{', '.join(holders)} sits on top of it: remove that first"
    return f"something still has it open (see `fuser -vm {device}`): close that"


def _release_stale(device: str, index: int, netlink: object | None) -> None:
    """Free a device left attached by a process that no longer exists (kill -9).

    An ioctl attach mostly cleans up after itself when its process dies; a netlink
    attach keeps the device configured, with dead sockets, until someone disconnects it.
    """
    pid = holder_pid(index)
    if pid is not None and pid_alive(pid):
        raise UserError(
            f"{device} is busy: process {pid} ({process_name(pid)}) has attached it; stop that, or use --device auto"
        )
    if pid is None and device_size(index) == 0:
        return
    who = f"process {pid}, which is gone" if pid else "a process that is gone"
    log.info("%s was left attached by %s: freeing it", device, who)
    if netlink is not None:
        try:
            netlink.disconnect(index)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - the ioctls below are the fallback
            log.info("netlink disconnect of %s failed: %s", device, exc)
    # NBD_CLEAR_SOCK also drops the reference a netlink connect holds, so this frees a
    # device that either interface attached.
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {device} to free it: {exc.strerror}") from None
    try:
        for request in (NBD_DISCONNECT, NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
            try:
                fcntl.ioctl(fd, request)
            except OSError:
                pass
    finally:
        os.close(fd)
    # The kernel lets go once the last opener is gone: a few ms, unless someone holds it.
    deadline = time.monotonic() + 5.0
    while holder_pid(index) is not None or device_size(index):
        if time.monotonic() > deadline:
            raise UserError(
                f"{device} is still held after its server died: {_what_holds(device, index)}, then run buselab again"
            )
        time.sleep(0.05)
    print(f"buselab: freed {device}, which was left attached by {who}", file=sys.stderr, flush=True)


def _block_size(size: int, wanted: int | None) -> int:
    if size <= 0:
        raise UserError("the disk is empty: give it a --size")
    for bs in [wanted] if wanted else [4096, 1024, 512]:
        if size % bs == 0:
            return bs
    if wanted:
        raise UserError(f"the disk size {size} is not a multiple of the block size {wanted}")
    raise UserError(f"the disk size {size} is not a multiple of 512: the kernel needs whole sectors (try --size 1M)")


def _block_signals() -> None:
    """Keep the signals meant for the main thread away from this thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


class KernelAttachment:
    """An engine attached to /dev/nbdN; `detach` undoes everything."""

    def __init__(self, device: str, index: int, method: str, engine: Engine | None = None) -> None:
        self.device = device
        self.index = index
        self.method = method  # "netlink" or "ioctl"
        self.connections = 1
        self._engine = engine
        self._fd: int | None = None  # ioctl: the open device
        self._do_it: threading.Thread | None = None
        self._do_it_error: OSError | None = None
        self._netlink = None
        self._connections: list = []
        self._detached = False

    def queue_limits(self) -> dict[str, int | str]:
        """The device's queue limits now (read_ahead_kb and the scheduler can change at any time)."""
        return queue_limits(f"nbd{self.index}")

    def _flush_device(self) -> None:
        """Push dirty pages to us before we go (a mounted filesystem's too, with sync)."""
        _block_signals()
        if _mount_points(self.device):
            os.sync()
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
        """Answer what is held, flush, disconnect, and wait until the device is free."""
        if self._detached:
            return
        self._detached = True
        deadline = time.monotonic() + timeout
        mounts = _mount_points(self.device)
        if mounts:
            print(
                f"buselab: warning: {self.device} is still mounted at {', '.join(mounts)}; detaching anyway",
                file=sys.stderr,
                flush=True,
            )
        if self._engine is not None:
            # Requests held by a paused gate would otherwise wait for ever (the flush
            # below among them): let them through, as Engine.close would.
            self._engine.gate.set_matcher(None)
            self._engine.gate.resume()
        # The flush can hang on a device that is already broken: never wait for ever.
        flusher = threading.Thread(target=self._flush_device, name="buselab-flush", daemon=True)
        flusher.start()
        flusher.join(timeout / 2)
        if flusher.is_alive():
            log.warning("flushing %s did not finish; detaching anyway", self.device)
        if self.method == "netlink":
            try:
                # Sends DISC on every socket, shuts them down and waits for the kernel's
                # receive threads; the device is cleared once the last opener is gone.
                self._netlink.disconnect(self.index)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001
                log.warning("netlink disconnect of %s failed: %s", self.device, exc)
        elif self._fd is not None:
            try:
                # Sends DISC; our connection closes its end on DISC, which ends NBD_DO_IT.
                fcntl.ioctl(self._fd, NBD_DISCONNECT)
            except OSError as exc:
                log.warning("NBD_DISCONNECT on %s failed: %s", self.device, exc)
        if self._do_it is not None:
            self._do_it.join(max(0.0, deadline - time.monotonic()))
            if self._do_it.is_alive():
                log.warning("NBD_DO_IT on %s did not return; closing our sockets", self.device)
        # Our serving threads end when the kernel sends DISC or shuts the socket down.
        for conn in self._connections:
            while conn.sock.fileno() != -1 and time.monotonic() < deadline:
                time.sleep(0.01)
            if conn.sock.fileno() != -1:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._do_it is not None and self._do_it.is_alive():
            self._do_it.join(max(1.0, deadline - time.monotonic()))
        if self._fd is not None:
            for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
                try:
                    fcntl.ioctl(self._fd, request)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = None
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
        # The kernel clears the size once its last reference goes; wait for it.
        while (device_size(self.index) or holder_pid(self.index) is not None) and time.monotonic() < deadline:
            time.sleep(0.02)
        if device_size(self.index) or holder_pid(self.index) is not None:
            log.warning("%s is still configured after detaching: %s", self.device, _what_holds(self.device, self.index))


def _open_netlink(options: KernelOptions):
    """The nbd netlink interface, or None to use ioctls (asked for, or not available)."""
    if options.use_ioctl:
        return None
    try:
        from .netlink import NbdNetlink  # pyroute2: a dependency, but slow to import (and maybe removed)
    except ImportError as exc:
        if options.connections > 1:
            raise UserError(
                "--connections needs the nbd netlink interface, which needs pyroute2: pip install pyroute2"
            ) from None
        log.info("pyroute2 is not installed (%s); using ioctls", exc)
        return None
    try:
        return NbdNetlink()
    except Exception as exc:  # noqa: BLE001 - no family: old kernel, fall back to ioctls
        log.info("nbd netlink unavailable (%s); using ioctls", exc)
        return None


def attach(
    device: str, engine: Engine, network: NetworkServer, options: KernelOptions | None = None
) -> KernelAttachment:
    """Attach `engine` to `device` (/dev/nbdN, or "auto" / "/dev/nbd" for any free one)."""
    options = options or KernelOptions()
    auto = device in ("auto", "/dev/nbd")
    if not auto:
        device_index(device)  # "not an nbd device" needs neither root nor the module
    if os.geteuid() != 0:
        raise UserError(f"attaching {device} needs root: run it with sudo (or leave DEVICE out to serve over NBD)")
    if options.connections < 1:
        raise UserError("--connections must be at least 1")
    if options.timeout < 0:
        raise UserError("--timeout must be 0 (wait for ever) or a number of seconds")
    size = engine.size
    block_size = _block_size(size, options.block_size)
    flags = engine.flags & KERNEL_FLAGS
    if options.connections > 1 and not flags & c.TF_CAN_MULTI_CONN:
        raise UserError(
            f"--connections {options.connections} needs a backend that is safe with several connections"
            f" ({engine.backend.kind} is not): use one connection"
        )
    ensure_module()
    if not auto:
        check_device(device)
    netlink = _open_netlink(options)
    try:
        if options.connections > 1 and netlink is None:
            if options.use_ioctl:
                raise UserError("--connections needs netlink: drop --ioctl, or use one connection")
            raise UserError("--connections needs the nbd netlink interface, which this kernel does not offer")
        if auto:
            device = free_device()
            print(f"buselab: using {device}", flush=True)
        index = check_device(device)
        _release_stale(device, index, netlink)
        if netlink is not None:
            attachment = _attach_netlink(device, index, engine, network, netlink, size, block_size, flags, options)
        else:
            attachment = _attach_ioctl(device, index, engine, network, size, block_size, flags, options)
    except BaseException:
        if netlink is not None:
            netlink.close()
        raise
    how = f"{attachment.method}, {options.connections} connections" if options.connections > 1 else attachment.method
    engine.telemetry.event(f"attached {device} via {how}")
    print(f"buselab: attached {device} via {how}", flush=True)
    return attachment


def _socketpair() -> tuple[socket.socket, socket.socket]:
    """The pair the kernel and we talk over, with room for several whole 1 MiB requests.

    With the default ~200 KiB the kernel's sender stops a few times in every 1 MiB write
    until we have read what it sent, and we stop for it in turn; with 4 MiB it sends the
    next request while we copy the last one into the backend. Measured in the VM: fio 1 MiB
    libaio writes went from 0.73x to 0.78x of nbdkit with this alone. SO_SNDBUFFORCE, as
    root (attaching needs root anyway), is not capped by net.core.wmem_max.
    """
    pair = socket.socketpair()
    for sock in pair:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _KERNEL_SOCKET_BUFFER)
        except OSError:
            pass  # the default buffer works, only slower
    return pair


def _kernel_timeout(options: KernelOptions) -> int:
    if options.timeout == 0 and options.connections > 1:
        return LONG_TIMEOUT
    return options.timeout


def _busy_message(device: str, index: int) -> str:
    pid = holder_pid(index)
    if pid is not None:
        return f"{device} is busy: process {pid} ({process_name(pid)}) has attached it; stop that, or use --device auto"
    return f"{device} is busy: another program has it open or is attaching it; close that, or use --device auto"


def _attach_netlink(device, index, engine, network, netlink, size, block_size, flags, options) -> KernelAttachment:
    attachment = KernelAttachment(device, index, "netlink", engine)
    attachment.connections = options.connections
    pairs = [_socketpair() for _ in range(options.connections)]
    try:
        netlink.connect(
            [kernel_end.fileno() for _, kernel_end in pairs],
            size,
            block_size,
            flags,
            index=index,
            timeout=_kernel_timeout(options),
        )
    except Exception as exc:
        for ours, _ in pairs:
            ours.close()
        if getattr(exc, "code", None) == errno.EBUSY:
            raise UserError(_busy_message(device, index)) from None
        raise UserError(f"the kernel refused to attach {device}: {exc}") from None
    finally:
        # The kernel took its own reference to each socket it was given.
        for _, kernel_end in pairs:
            kernel_end.close()
    attachment._netlink = netlink
    for number, (ours, _) in enumerate(pairs):
        label = f"kernel {device}" if len(pairs) == 1 else f"kernel {device} #{number + 1}"
        attachment._connections.append(network.serve_socket(ours, label, kernel=True))
    return attachment


def _attach_ioctl(device, index, engine, network, size, block_size, flags, options) -> KernelAttachment:
    attachment = KernelAttachment(device, index, "ioctl", engine)
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot open {device}: {exc.strerror}") from None
    ours, kernel_end = _socketpair()
    try:
        # Order matters: block size before the size in blocks, both before the socket.
        fcntl.ioctl(fd, NBD_SET_BLKSIZE, block_size)
        fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size // block_size)
        fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
        fcntl.ioctl(fd, NBD_SET_TIMEOUT, _kernel_timeout(options))
        fcntl.ioctl(fd, NBD_SET_SOCK, kernel_end.fileno())
    except OSError as exc:
        ours.close()
        kernel_end.close()
        # Nothing to undo: closing our fd drops what we configured (and an EBUSY device is
        # someone else's, not ours to clear).
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise UserError(_busy_message(device, index)) from None
        if exc.errno == errno.EINVAL and holder_pid(index) is not None:
            raise UserError(_busy_message(device, index)) from None
        raise UserError(f"the kernel refused to attach {device}: {exc.strerror}") from None
    kernel_end.close()  # the kernel holds its own reference
    attachment._fd = fd
    attachment._connections.append(network.serve_socket(ours, f"kernel {device}", kernel=True))
    started = threading.Event()

    def do_it() -> None:
        _block_signals()
        started.set()
        try:
            fcntl.ioctl(fd, NBD_DO_IT)  # blocks (without the GIL) while attached
        except OSError as exc:
            attachment._do_it_error = exc

    attachment._do_it = threading.Thread(target=do_it, name=f"buselab-do-it-{index}", daemon=True)
    attachment._do_it.start()
    started.wait()
    # NBD_DO_IT sets the size and the pid file, then blocks: wait for that, so that the
    # device is usable once we return, and a failure is an error and not a silent exit.
    deadline = time.monotonic() + 30.0
    while holder_pid(index) is None:
        if not attachment._do_it.is_alive() or time.monotonic() > deadline:
            error = attachment._do_it_error
            attachment._detached = True
            ours.shutdown(socket.SHUT_RDWR)
            try:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
            except OSError:
                pass
            os.close(fd)
            attachment._fd = None
            if error is not None and error.errno == errno.EBUSY:
                raise UserError(_busy_message(device, index))
            reason = error.strerror if error is not None else "NBD_DO_IT did not start"
            raise UserError(f"the kernel refused to attach {device}: {reason}")
        time.sleep(0.01)
    return attachment
