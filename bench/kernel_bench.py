#!/usr/bin/env python3
"""buselab vs nbdkit through the kernel's nbd driver, side by side, in the test VM.

Boots the test VM (tests/vm/vm.py), and in it:

* /dev/nbd0: ``buselab ram --size SIZE /dev/nbd0 --headless`` (netlink, one connection, or
  ``--ioctl``);
* /dev/nbd1: ``nbdkit memory SIZE`` on a Unix socket, attached with
  ``nbd-client -unix SOCK /dev/nbd1 -b 4096`` (one connection too);

then runs the same direct-I/O workloads on both (fio with psync / libaio and direct=1, and dd),
in rounds, each case A B or B A back to back, and prints medians and the ratio buselab / nbdkit
(the median of the per-round ratios; target >= 0.8x). Under software emulation on a shared
machine the absolute numbers mean little and swing a lot; the ratio is what to read.

    python bench/kernel_bench.py                          # about 5-6 minutes on 2 cores
    python bench/kernel_bench.py --runtime 2 --repeat 2   # quicker, noisier

The same file runs inside the guest with ``--guest`` (standard library only there, too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
TARGET = 0.8
AREA = 64  # MiB of each device that the workloads touch (pre-filled with random data)


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    tool: str  # "fio" or "dd"
    rw: str
    bs: str
    engine: str = "psync"
    iodepth: int = 1
    metric: str = "bw"  # "bw" (bytes/s) or "iops"


CASES = (
    Case("seq-write-1m-qd8", "seq write 1M libaio qd8", "fio", "write", "1M", "libaio", 8),
    Case("seq-read-1m-qd8", "seq read  1M libaio qd8", "fio", "read", "1M", "libaio", 8),
    Case("rand-read-4k-qd1", "rand read 4K psync qd1", "fio", "randread", "4k", metric="iops"),
    Case("rand-write-4k-qd1", "rand write 4K psync qd1", "fio", "randwrite", "4k", metric="iops"),
    Case("rand-read-4k-qd8", "rand read 4K libaio qd8", "fio", "randread", "4k", "libaio", 8, "iops"),
    Case("dd-write-1m", "dd write 1M oflag=direct", "dd", "write", "1M"),
    Case("dd-read-1m", "dd read  1M iflag=direct", "dd", "read", "1M"),
)


# ---------------------------------------------------------------------------------------------
# In the guest


def _wait_for(predicate, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.1)


def _size(dev: str) -> int:
    with open(f"/sys/block/{os.path.basename(dev)}/size") as f:
        return int(f.read()) * 512


def _run_fio(case: Case, dev: str, runtime: float) -> float:
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={dev}",
        f"--rw={case.rw}",
        f"--bs={case.bs}",
        f"--ioengine={case.engine}",
        f"--iodepth={case.iodepth}",
        "--direct=1",
        f"--size={AREA}M",
        f"--runtime={runtime}",
        "--time_based",
        "--ramp_time=1",
        "--randrepeat=0",
        "--output-format=json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120, check=True)
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
    side = job["write" if "write" in case.rw else "read"]
    return float(side["iops"] if case.metric == "iops" else side["bw_bytes"])


def _run_dd(case: Case, dev: str) -> float:
    count = AREA
    if case.rw == "write":
        cmd = ["dd", "if=/tmp/bench-fill", f"of={dev}", "bs=1M", f"count={count}", "oflag=direct"]
    else:
        cmd = ["dd", f"if={dev}", "of=/dev/null", "bs=1M", f"count={count}", "iflag=direct"]
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, timeout=300)
    return count * 1024 * 1024 / (time.perf_counter() - start)


def guest_main(args: argparse.Namespace) -> int:
    out_path = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="kbench-"))
    sock = str(work / "nbdkit.sock")
    procs: list[subprocess.Popen] = []
    results: dict = {"cases": {}, "runtime": args.runtime, "repeat": args.repeat, "size": args.size}
    nbd_client_attached = False
    try:
        subprocess.run(["head", "-c", f"{AREA}M", "/dev/urandom"], stdout=open("/tmp/bench-fill", "wb"), check=True)
        buselab_cmd = ["buselab", "ram", "--size", args.size, "/dev/nbd0", "--headless"]
        if args.ioctl:
            buselab_cmd.append("--ioctl")
        log = open(work / "buselab.log", "w+")
        buselab = subprocess.Popen(buselab_cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(buselab)
        _wait_for(lambda: "buselab: serving" in (work / "buselab.log").read_text(), "buselab", 180, buselab)
        nbdkit = subprocess.Popen(["nbdkit", "-f", "--unix", sock, "memory", args.size])
        procs.append(nbdkit)
        _wait_for(lambda: os.path.exists(sock), "nbdkit", 60, nbdkit)
        subprocess.run(["nbd-client", "-unix", sock, "/dev/nbd1", "-b", "4096"], check=True, timeout=60)
        nbd_client_attached = True
        _wait_for(lambda: _size("/dev/nbd1") > 0, "nbd-client", 30)
        attached = (work / "buselab.log").read_text().splitlines()[0]
        print(f"guest: {attached}; nbd0 {_size('/dev/nbd0')} bytes, nbd1 {_size('/dev/nbd1')} bytes", flush=True)
        results["buselab_attach"] = attached
        targets = {"buselab": "/dev/nbd0", "nbdkit": "/dev/nbd1"}
        for dev in targets.values():
            subprocess.run(
                ["dd", "if=/tmp/bench-fill", f"of={dev}", "bs=1M", "oflag=direct", "status=none"],
                check=True,
                timeout=300,
            )
        cases = [case for case in CASES if not args.only or any(part in case.key for part in args.only)]
        if shutil.which("fio") is None:
            print("guest: fio is missing: dd cases only", flush=True)
            cases = [case for case in cases if case.tool == "dd"]
        for rep in range(args.repeat):
            for number, case in enumerate(cases):
                # A B, then B A: the pairs are adjacent in time, so drift in the host's load
                # (other work on a shared machine) hits both sides alike.
                order = ["buselab", "nbdkit"] if (rep + number) % 2 == 0 else ["nbdkit", "buselab"]
                for name in order:
                    dev = targets[name]
                    value = _run_fio(case, dev, args.runtime) if case.tool == "fio" else _run_dd(case, dev)
                    results["cases"].setdefault(case.key, {}).setdefault(name, []).append(value)
                    print(f"guest: rep {rep + 1} {case.key:18} {name:8} {value:14.1f}", flush=True)
        out_path.write_text(json.dumps(results, indent=1))
    finally:
        if nbd_client_attached:
            subprocess.run(["nbd-client", "-d", "/dev/nbd1"], timeout=60)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


# ---------------------------------------------------------------------------------------------
# On the host


def _human(case: Case, value: float) -> str:
    if case.metric == "iops":
        return f"{value:10,.0f} IOPS"
    return f"{value / 1e6:9.1f} MB/s"


def host_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from tests.vm.vm import VmError, run_in_vm

    for tool in ("nbdkit", "nbd-client"):
        if shutil.which(tool) is None:
            print(f"kernel_bench: {tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="kbench-", dir=str(REPO / "bench")) as shared:
        out = Path(shared) / "result.json"
        flags = f"--runtime {args.runtime} --repeat {args.repeat} --size {args.size}"
        if args.ioctl:
            flags += " --ioctl"
        for part in args.only or []:
            flags += f" --only {part}"
        script = f"exec python3 {Path(__file__).resolve()} --guest --out {out} {flags}\n"
        started = time.monotonic()
        try:
            result = run_in_vm(script, shared_dir=Path(shared), timeout=args.timeout)
        except VmError as exc:
            print(f"kernel_bench: {exc}", file=sys.stderr)
            return 2
        if args.verbose or result.returncode != 0:
            print(result.output)
        if result.returncode != 0 or not out.exists():
            print(f"kernel_bench: the guest part failed (status {result.returncode})", file=sys.stderr)
            return 1
        data = json.loads(out.read_text())
    elapsed = time.monotonic() - started
    print(
        f"{data.get('buselab_attach', '')}; {data['repeat']} rounds of {data['runtime']} s per case in the VM;"
        " medians, ratio = median of the per-round ratios"
    )
    print(f"{'case':28} {'buselab':>16} {'nbdkit':>16} {'ratio':>7}")
    rows = []
    for case in CASES:
        values = data["cases"].get(case.key)
        if not values:
            continue
        ours = statistics.median(values["buselab"])
        theirs = statistics.median(values["nbdkit"])
        # The median of the per-round ratios: each round's pair ran back to back.
        ratio = statistics.median(a / b for a, b in zip(values["buselab"], values["nbdkit"]) if b)
        mark = "ok" if ratio >= TARGET else "LOW"
        print(f"{case.label:28} {_human(case, ours):>16} {_human(case, theirs):>16} {ratio:6.2f}x {mark}")
        rows.append({"case": case.key, "buselab": ours, "nbdkit": theirs, "ratio": ratio, "metric": case.metric})
    print(f"(total {elapsed:.0f} s; target >= {TARGET}x; only the ratio means anything under emulation)")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"kernel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"rows": rows, "raw": data, "ioctl": args.ioctl}, indent=1))
    print(f"saved {path.relative_to(REPO)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run (default 3)")
    parser.add_argument("--repeat", type=int, default=4, help="A/B rounds (default 4)")
    parser.add_argument("--size", default="256M", help="device size (default 256M)")
    parser.add_argument("--ioctl", action="store_true", help="attach buselab with ioctls instead of netlink")
    parser.add_argument("--only", action="append", help="run only cases whose key contains this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="VM timeout in seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the guest's output")
    args = parser.parse_args()
    return guest_main(args) if args.guest else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
