#!/usr/bin/env python3
"""`buselab nbd` in front of nbdkit vs the same nbdkit talked to directly.

Starts ``nbdkit -f -U UP memory SIZE`` and ``python -m buselab nbd nbd+unix:///?socket=UP
--unix PROXY --headless`` in a temporary directory, writes the area once (so reads read
data, not holes), then drives both with fio's nbd engine, alternating direct, proxy, direct,
proxy... for ``--rounds`` rounds of ``--runtime`` seconds, and prints the median of each and
the ratio proxy / direct (goal: >= 0.8x on 1 MiB sequential; the 4 KiB cases are there to
show what a request costs the proxy, with no goal). The proxy adds a whole NBD hop (a second
server and a second client in Python), so this is the price of watching nbdkit's disk.

For scale, the same hop in C is measured beside them: nbdkit's own nbd plugin in front of the
same nbdkit (``nbdkit -U REF nbd socket=UP``, the "C proxy" column). Its ratio is what any
proxy reaches on this machine, whatever it is written in; ``--no-reference`` leaves it out.

    python bench/proxy_bench.py                  # about 1 minute
    python bench/proxy_bench.py --runtime 2 --rounds 2
    python bench/proxy_bench.py --client buselab --cases seq_read_1m_qd8 seq_write_1m_qd8

Standard library only; needs fio (with its nbd engine) and nbdkit. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.8
CASES = (
    # key, fio arguments, metric, goal
    ("seq_read_1m_qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw", TARGET),
    ("seq_write_1m_qd8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw", TARGET),
    # four client connections: buselab runs each connection's requests in turn, so this is where
    # the requests of several clients go to the upstream together
    ("seq_read_1m_4x8", ["--rw=read", "--bs=1M", "--iodepth=8", "--numjobs=4", "--group_reporting"], "bw", None),
    ("rand_read_4k_qd1", ["--rw=randread", "--bs=4k", "--iodepth=1"], "iops", None),
    ("rand_read_4k_qd16", ["--rw=randread", "--bs=4k", "--iodepth=16"], "iops", None),
)


def wait_for_socket(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"proxy_bench: {what} did not start")
        time.sleep(0.05)
    time.sleep(0.3)  # bound, then listening


def fio(uri: str, args: list[str], runtime: float, size: str) -> dict:
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--output-format=json",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]


def measure(job: dict, metric: str) -> float:
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["bw_bytes"] / (1 << 20) if metric == "bw" else side["iops"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=4.0, help="seconds per fio run (default 4)")
    parser.add_argument("--size", default="256M", help="area of the disk the workloads touch (default 256M)")
    parser.add_argument(
        "--client",
        choices=("auto", "libnbd", "buselab"),
        default="auto",
        help="the proxy's client for READ and WRITE (BUSELAB_NBD_CLIENT; default auto: libnbd if importable)",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="leave out nbdkit's nbd plugin as a C proxy for scale",
    )
    keys = [key for key, *_ in CASES]
    parser.add_argument("--cases", nargs="+", choices=keys, default=keys, metavar="CASE", help=", ".join(keys))
    args = parser.parse_args()
    cases = [case for case in CASES if case[0] in args.cases]
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"proxy_bench: {tool} is not installed")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        up, px, ref = Path(tmp) / "up.sock", Path(tmp) / "proxy.sock", Path(tmp) / "ref.sock"
        direct, proxied = f"nbd+unix:///?socket={up}", f"nbd+unix:///?socket={px}"
        order = [("direct", direct), ("proxy", proxied)]
        try:
            procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(up), "memory", "1G"]))
            wait_for_socket(up, procs[-1], "nbdkit")
            env = dict(
                os.environ,
                BUSELAB_NBD_CLIENT=args.client,
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "buselab", "nbd", direct, "--unix", str(px), "--headless"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
            )
            wait_for_socket(px, procs[-1], "buselab nbd")
            if args.reference:
                procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(ref), "nbd", f"socket={up}"]))
                wait_for_socket(ref, procs[-1], "nbdkit's nbd plugin")
                order.append(("C proxy", f"nbd+unix:///?socket={ref}"))
            subprocess.run(
                ["fio", "--name=fill", "--ioengine=nbd", f"--uri={direct}", f"--size={args.size}", "--rw=write",
                 "--bs=1M", "--iodepth=8", "--output-format=json"],
                capture_output=True, check=True,
            )  # fmt: skip
            results: dict[str, dict[str, list[float]]] = {key: {name: [] for name, _ in order} for key, *_ in cases}
            for round_no in range(args.rounds):
                for key, fio_args, metric, _goal in cases:
                    for name, uri in order if round_no % 2 == 0 else reversed(order):
                        value = measure(fio(uri, fio_args, args.runtime, args.size), metric)
                        results[key][name].append(value)
            print(
                f"buselab nbd (client {args.client}) vs nbdkit memory directly, fio nbd engine,"
                f" {args.rounds} rounds x {args.runtime:g} s"
            )
            reference = "   C proxy  ratio" if args.reference else ""
            print(f"{'case':<20} {'direct':>12} {'proxy':>12} {'ratio':>7}{reference}  goal")
            failed = False
            for key, _fio_args, metric, goal in cases:
                unit = "MiB/s" if metric == "bw" else "IOPS"
                d, p = statistics.median(results[key]["direct"]), statistics.median(results[key]["proxy"])
                ratio = p / d if d else 0.0
                verdict = "" if goal is None else (f">= {goal:.1f}x " + ("ok" if ratio >= goal else "MISSED"))
                failed |= goal is not None and ratio < goal
                scale = ""
                if args.reference:
                    c = statistics.median(results[key]["C proxy"])
                    scale = f" {c:>9.0f} {c / d if d else 0.0:>5.2f}x"
                print(f"{key:<20} {d:>8.0f} {unit:<5}{p:>7.0f} {unit:<5}{ratio:>6.2f}x{scale}  {verdict}")
            return 1 if failed else 0
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
