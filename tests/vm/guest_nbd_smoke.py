"""Runs *inside* the test VM (see tests/test_vm_smoke.py): attach a tiny NBD server to /dev/nbd0.

Deliberately independent of buselab: it proves that the VM can do what buselab's kernel tests
need (ioctl attach over a socketpair, mkfs.ext4, mount, fstrim, fsck, a clean detach), so a
failure there points at buselab and not at the harness. Prints one ``ok:`` line per step.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

# ioctls: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_FLAGS = 0xAB0A

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_TRIM = 1 << 0, 1 << 2, 1 << 5
EINVAL = 22

DEVICE = "/dev/nbd0"
SIZE = 16 << 20
BLOCK = 4096
MOUNTPOINT = Path("/mnt")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise EOFError("kernel closed the socket")
        got += chunk
    return bytes(buf)


def serve(sock: socket.socket, disk: bytearray, seen: Counter[int]) -> None:
    """Answer the kernel's requests from ``disk`` until it sends DISC."""
    while True:
        magic, _flags, cmd, handle, offset, length = REQUEST.unpack(recv_exact(sock, REQUEST.size))
        if magic != REQUEST_MAGIC:
            raise ValueError(f"bad request magic {magic:#x}")
        seen[cmd] += 1
        if cmd == CMD_DISC:
            # NBD_DISCONNECT does not shut the socket down: NBD_DO_IT returns only once the
            # server closes its end.
            sock.close()
            return
        error, data = 0, b""
        if cmd == CMD_READ:
            data = disk[offset : offset + length]
        elif cmd == CMD_WRITE:
            disk[offset : offset + length] = recv_exact(sock, length)
        elif cmd == CMD_TRIM:
            disk[offset : offset + length] = bytes(length)
        elif cmd != CMD_FLUSH:
            error = EINVAL
        sock.sendall(REPLY.pack(REPLY_MAGIC, error, handle) + data)


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)} -> {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


def nbd_family_exists() -> bool:
    """Ask generic netlink's controller for the "nbd" family (stdlib only: fast to import)."""
    netlink_generic, genl_id_ctrl, ctrl_cmd_getfamily, ctrl_attr_family_name = 16, 0x10, 3, 2
    name = b"nbd\0"
    attr = struct.pack("=HH", 4 + len(name), ctrl_attr_family_name) + name
    attr += bytes(-len(attr) % 4)
    genl = struct.pack("=BBH", ctrl_cmd_getfamily, 1, 0)
    header = struct.pack("=IHHII", 16 + len(genl) + len(attr), genl_id_ctrl, 1, 1, 0)  # NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_generic) as s:
        s.send(header + genl + attr)
        reply = s.recv(65536)
    msg_type = struct.unpack_from("=H", reply, 4)[0]
    if msg_type == 2:  # NLMSG_ERROR: the family is not registered
        return False
    return msg_type == genl_id_ctrl


def main() -> None:
    if not Path(DEVICE).exists():
        sys.exit(f"FAILED: {DEVICE} does not exist (nbd not loaded?)")
    print(f"ok: {DEVICE} exists")
    print(f"ok: netlink family nbd exists: {nbd_family_exists()}")

    disk = bytearray(SIZE)
    seen: Counter[int] = Counter()
    kernel_end, server_end = socket.socketpair()
    fd = os.open(DEVICE, os.O_RDWR)
    fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK)
    fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, SIZE // BLOCK)
    fcntl.ioctl(fd, NBD_SET_FLAGS, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM)
    fcntl.ioctl(fd, NBD_SET_SOCK, kernel_end.fileno())
    server = threading.Thread(target=serve, args=(server_end, disk, seen), daemon=True)
    server.start()
    # NBD_DO_IT blocks until disconnect; fcntl.ioctl releases the GIL, so a thread is enough.
    do_it = threading.Thread(target=fcntl.ioctl, args=(fd, NBD_DO_IT), daemon=True)
    do_it.start()
    print("ok: attached")

    run("mkfs.ext4", "-q", "-F", DEVICE)
    run("mount", "-t", "ext4", DEVICE, str(MOUNTPOINT))
    payload = os.urandom(1 << 20)
    (MOUNTPOINT / "payload").write_bytes(payload)
    run("sync")
    run("fstrim", str(MOUNTPOINT))
    run("umount", str(MOUNTPOINT))
    print("ok: mkfs, mount, write, fstrim, umount")
    print(run("fsck.ext4", "-fn", DEVICE).strip().splitlines()[-1])
    run("mount", "-t", "ext4", "-o", "ro", DEVICE, str(MOUNTPOINT))
    assert (MOUNTPOINT / "payload").read_bytes() == payload, "payload changed"
    run("umount", str(MOUNTPOINT))
    print("ok: fsck clean, payload read back")

    fcntl.ioctl(fd, NBD_DISCONNECT)
    do_it.join(timeout=30)
    assert not do_it.is_alive(), "NBD_DO_IT did not return after NBD_DISCONNECT"
    fcntl.ioctl(fd, NBD_CLEAR_SOCK)
    os.close(fd)
    size = Path("/sys/block/nbd0/size").read_text().strip()
    print(f"ok: disconnected, size {size}")
    names = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush", CMD_TRIM: "trim"}
    print("requests: " + " ".join(f"{names.get(c, c)}={n}" for c, n in sorted(seen.items())))


if __name__ == "__main__":
    main()
