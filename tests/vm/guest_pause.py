"""Runs *inside* the test VM: a paused device survives a pause longer than the kernel's 30 s.

With timeout 0 the kernel's nbd driver waits for ever on a single connection (it only logs
"Possible stuck request" every 30 s), but with several connections it marks a connection dead
after 30 s and requeues its requests; buselab therefore asks for a very long timeout there.
One device per process, as `buselab` itself serves it: the guest script runs this twice at
once, for the ioctl path with one connection (--ioctl) and for netlink with two
(--connections 2). Reads are held by the gate for --pause seconds (default 40), then
released; they must complete with the right data and the kernel must not have failed
anything on the device.

No CLI for a held read's data, so this drives the engine's gate through the library. Prints
one ``ok:`` or ``FAIL:`` line per check. ``--nofix`` sends timeout 0 on a multi-connection
device too, to show what the kernel does without the long timeout.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import re
import signal
import subprocess
import sys
import time

from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.transport import kernel

SIZE = 16 << 20
failures = 0


def check(ok: bool, what: str) -> None:
    global failures
    print(f"{'ok' if ok else 'FAIL'}: {what}", flush=True)
    failures += not ok


def dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause", type=float, default=40.0)
    parser.add_argument("--device", default="/dev/nbd0")
    parser.add_argument("--ioctl", action="store_true", help="attach with the ioctls (one connection)")
    parser.add_argument("--connections", type=int, default=2, help="netlink connections (default 2)")
    parser.add_argument("--nofix", action="store_true")
    args = parser.parse_args()
    # The run takes about a minute; if it ever hangs, say where before the guest's watchdog kills it.
    faulthandler.dump_traceback_later(args.pause + 200, exit=False)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the guest's watchdog asks for it
    if args.nofix:
        kernel._kernel_timeout = lambda options: options.timeout
    pause = args.pause
    dev = args.device
    name = os.path.basename(dev)
    pattern = f"/tmp/pause-pattern-{os.getpid()}"
    with open(pattern, "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(pattern, "rb") as g:
        expected = g.read()
    options = (
        ServeOptions(device=dev, use_ioctl=True)
        if args.ioctl
        else ServeOptions(device=dev, connections=args.connections)
    )
    session = Session(open_backend("ram", size=SIZE), options)
    kernel_log_start = len(dmesg())
    session.start()
    print(f"attached {dev} via {session.kernel.method}, {session.options.connections} connection(s)", flush=True)
    gate = session.engine.gate
    try:
        subprocess.run(["dd", f"if={pattern}", f"of={dev}", "bs=64k", "oflag=direct", "status=none"], check=True)
        gate.pause()
        # Four readers of 256 KiB each at once (O_DIRECT, 64 KiB requests): several requests
        # in flight, on both CPUs, so over both connections of a netlink device.
        readers = []
        for part in range(4):
            out = f"/tmp/pause-out-{name}-{part}"
            cmd = ["dd", f"if={dev}", f"of={out}", "bs=64k", "count=4", f"skip={4 * part}", "iflag=direct"]
            readers.append((subprocess.Popen([*cmd, "status=none"]), out, part))
        start = time.monotonic()
        time.sleep(pause)
        held = len(gate.held())
        waiting = sum(proc.poll() is None for proc, _, _ in readers)
        check(waiting == 4 and held > 0, f"{dev}: reads held for {pause:.0f} s ({held} held, {waiting} dd waiting)")
        gate.resume()
        codes, same = [], True
        for proc, out, part in readers:
            try:
                codes.append(proc.wait(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("timeout")
            with open(out, "rb") as f:
                same = same and f.read() == expected[part << 18 : (part + 1) << 18]
        ok = codes == [0] * 4 and same
        check(ok, f"{dev}: after resume the reads completed (exit {codes}), data intact: {same}")
        if not ok:  # what the kernel said, before anything else can hang
            for line in dmesg()[kernel_log_start:]:
                if name in line:
                    print(f"dmesg: {line}", flush=True)
            print(f"held now: {len(gate.held())}, releasing: {gate.releasing}", flush=True)
        print(f"{dev}: waited {time.monotonic() - start:.1f} s in all", flush=True)
        again = subprocess.run(
            ["dd", f"if={dev}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct", "status=none"], timeout=60
        )
        check(again.returncode == 0, f"{dev}: the device still works after the pause")
        lines = [line for line in dmesg()[kernel_log_start:] if re.search(rf"\b{name}\b", line)]
        for line in lines:
            print(f"dmesg: {line}")
        bad = [
            line
            for line in lines
            if any(s in line for s in ("timed out", "Dead connection", "I/O error", "Receive control failed"))
        ]
        check(not bad, f"{dev}: the kernel killed nothing ({len(bad)} bad kernel lines)")

        # Stopping while paused answers what is held (Session.stop -> detach releases the gate).
        gate.pause()
        reader = subprocess.Popen(
            ["dd", f"if={dev}", "of=/dev/null", "bs=64k", "count=1", "iflag=direct", "status=none"]
        )
        deadline = time.monotonic() + 30
        while not gate.held() and time.monotonic() < deadline:
            time.sleep(0.1)
        held = len(gate.held())
        t0 = time.monotonic()
        session.stop()
        took = time.monotonic() - t0
        try:
            rc = reader.wait(30)
        except subprocess.TimeoutExpired:
            reader.kill()
            rc = "timeout"
        check(
            held > 0 and rc == 0, f"{dev}: stopped while paused in {took:.1f} s; the held read ({held}) got its answer"
        )
    finally:
        session.stop()
        size = open(f"/sys/block/{name}/size").read().strip()
        check(size == "0", f"{dev}: detached, size {size}")
    print(f"summary: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
