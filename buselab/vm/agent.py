"""Inside the lesson's VM: attach /dev/nbd0 to buselab on the host, then run what the host asks.

Started by the guest's run.sh (see guest.py) as ``python -m buselab.vm.agent CONFIG``, as root in
the chroot of the host's root. It

1. connects to the host's agent port (qemu's user network: the host's loopback is 10.0.2.2)
   and proves who it is with the token from the private control share;
2. connects a second socket to the host's NBD port, proves itself there with the token too,
   does the NBD handshake and hands that very socket to the guest kernel's nbd driver (netlink NBD_CMD_CONNECT): the requests the host's
   lab shows are the driver's own, with nothing in between;
3. says ``attached`` with the device's queue limits, then serves requests, one JSON object a
   line, each in its own thread: ``run`` a shell command (its status, its output's tail, and
   the queue limits after it, since a command may change them), or ``limits``.

When the host's connection ends, so does the agent, and the guest powers off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from ..client import handshake
from ..transport.kernel import KERNEL_FLAGS, queue_limits

COMMAND_TIMEOUT = 600.0  # seconds one command may run (as the lesson runner allows on a host)
OUTPUT_KEPT = 16 << 10  # bytes of a command's output sent back: the lab shows the last lines


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        config = json.load(f)
    host = config["host"]
    agent = _connect(host, config["agent_port"])
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        with send_lock:
            agent.sendall(data)

    send({"hello": config["token"]})
    device = config["device"]
    try:
        _attach(host, config["nbd_port"], device, config["token"])
    except Exception as exc:  # noqa: BLE001 - every failure goes to the host as one line
        send({"error": f"cannot attach {device} in the VM: {exc}"})
        return 1
    send({"attached": device, "limits": _limits(device), "kernel": os.uname().release})
    for line in agent.makefile("rb"):
        request = json.loads(line)
        threading.Thread(target=_serve, args=(request, device, send), daemon=True).start()
    return 0


def _connect(host: str, port: int, wait: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + wait
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _attach(host: str, port: int, device: str, token: str) -> None:
    from ..transport.netlink import NbdNetlink  # pyroute2: a dependency of buselab

    sock = _connect(host, port)
    sock.sendall((token + "\n").encode())  # the host serves no NBD client that cannot say it
    export = handshake(sock)
    block = next((bs for bs in (4096, 1024, 512) if export.size % bs == 0), 512)
    netlink = NbdNetlink()
    try:
        # Timeout 0: the driver waits for ever, so a lesson's pause never fails a request.
        netlink.connect(
            [sock.fileno()], export.size, block, export.flags & KERNEL_FLAGS, index=int(device.removeprefix("/dev/nbd"))
        )
    finally:
        netlink.close()
    # The kernel holds its own reference to the socket now; ours may go.
    sock.close()
    name = os.path.basename(device)
    deadline = time.monotonic() + 10
    while _size(name) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if _size(name) == 0:
        raise OSError(f"{device} still has size 0 after connecting")


def _size(name: str) -> int:
    try:
        with open(f"/sys/block/{name}/size") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _limits(device: str) -> dict[str, int | str]:
    return queue_limits(os.path.basename(device))


def _serve(request: dict, device: str, send) -> None:
    reply: dict = {"id": request.get("id")}
    if "run" in request:
        reply.update(_run(request["run"], request.get("env") or {}))
    reply["limits"] = _limits(device)
    try:
        send(reply)
    except OSError:
        pass  # the host is gone: the main loop ends too


def _run(line: str, env: dict[str, str]) -> dict:
    try:
        done = subprocess.run(
            ["sh", "-c", line],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT,
            env={**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        return {"status": 124, "output": f"still running after {COMMAND_TIMEOUT:.0f} s: stopped"}
    return {"status": done.returncode, "output": done.stdout[-OUTPUT_KEPT:].decode(errors="replace")}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
