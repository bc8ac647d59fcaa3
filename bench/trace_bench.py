#!/usr/bin/env python3
"""What recording a trace costs: fio 4 KiB random I/O with and without --record.

    python bench/trace_bench.py [--seconds 5] [--rounds 2] [--rw randread,randwrite]

For each workload it runs `buselab ram --unix SOCK --headless`, once without
and once with `--record /tmp/....jsonl.zst`, in the order A B A B ..., drives
it with fio's nbd engine (4 jobs x iodepth 8, 4 KiB random), and prints the
median IOPS of each and their ratio (target: recording >= 0.8x), and the CPU time the server
(with its trace writer process) spent per request, which is steadier than
IOPS on a shared machine. The trace of
each recorded run is checked to hold every request fio made, so a recorder
that keeps up by dropping requests cannot look fast.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"buselab exited with {proc.returncode}")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    raise SystemExit(f"buselab did not listen on {path}")


def serve(sock: str, record: str, payload: str) -> int:
    """`buselab ram --unix SOCK --headless --record FILE`, with a payload mode the CLI does not offer."""
    from buselab.headless import run_headless
    from buselab.session import ServeOptions, Session
    from buselab.storage.registry import open_backend
    from buselab.trace.recorder import TraceRecorder

    session = Session(open_backend("ram", size=1 << 30), ServeOptions(unix=[sock]))
    session.recorder = TraceRecorder.start(session.engine, record, payload=payload)
    session.start()
    with open(os.devnull, "w") as out:
        return run_headless(session, out=out)


def one_run(
    rw: str, record: str | None, seconds: float, tmp: str, jobs: int, depth: int, payload: str = "writes"
) -> tuple[float, int, float]:
    """(IOPS, requests fio completed, CPU seconds of the server and its trace writer) for one server lifetime."""
    sock = os.path.join(tmp, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [sys.executable, "-m", "buselab", "ram", "--size", "1G", "--unix", sock, "--headless"]
    if record and payload != "writes":
        cmd = [sys.executable, __file__, "--serve", sock, "--record", record, "--payload", payload]
    elif record:
        cmd += ["--record", record]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, server)
        fio = subprocess.run(
            [
                "fio",
                "--name=trace-bench",
                "--ioengine=nbd",
                f"--uri=nbd+unix:///?socket={sock}",
                f"--rw={rw}",
                "--bs=4k",
                f"--numjobs={jobs}",
                f"--iodepth={depth}",
                "--size=1G",
                "--time_based",
                f"--runtime={seconds}",
                "--group_reporting",
                "--randrepeat=0",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        # The server's CPU time, with its writer process's (which it waits for), lands in
        # our RUSAGE_CHILDREN once we reap it; fio was reaped before this.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server.send_signal(signal.SIGINT)
        server.wait(120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # fio's nbd engine may print notes before the JSON document.
    job = json.loads(fio.stdout[fio.stdout.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["total_ios"], cpu


def trace_records(path: str) -> int:
    from buselab.trace.format import read_trailer

    trailer = read_trailer(path) or {}
    return int(trailer.get("records", -1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="fio runtime per run (after 1 s ramp)")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs per workload")
    parser.add_argument("--rw", default="randread,randwrite", help="fio workloads, comma separated")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--iodepth", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--payload", default="writes", choices=("none", "writes", "all"), help="what the trace keeps (CLI: writes)"
    )
    parser.add_argument("--serve", metavar="SOCK", help=argparse.SUPPRESS)  # internal: the server for --payload
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.record, args.payload)
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed")
    tmp = tempfile.mkdtemp(prefix="buselab-trace-bench-")
    from buselab.trace import writer

    # Reads cost the writer about 1.3 us in Python and 0.5 us with the C formatter: say which ran.
    formatter = "C (_fastlines)" if writer.format_reads is not None else "Python (_fastlines not built)"
    print(f"trace writer's line formatter: {formatter}", file=sys.stderr)
    results = {}
    try:
        for rw in args.rw.split(","):
            off: list[float] = []
            on: list[float] = []
            cpu_off: list[float] = []
            cpu_on: list[float] = []
            sizes: list[int] = []
            for i in range(args.rounds):
                iops, ios, cpu = one_run(rw, None, args.seconds, tmp, args.jobs, args.iodepth)
                off.append(iops)
                cpu_off.append(cpu / ios * 1e6)
                trace = os.path.join(tmp, f"{rw}-{i}.jsonl.zst")
                iops, ios, cpu = one_run(rw, trace, args.seconds, tmp, args.jobs, args.iodepth, args.payload)
                on.append(iops)
                cpu_on.append(cpu / ios * 1e6)
                records = trace_records(trace)
                sizes.append(os.path.getsize(trace))
                if records < ios:
                    raise SystemExit(f"{rw}: the trace holds {records} requests but fio completed {ios}")
                os.unlink(trace)
                print(
                    f"{rw} round {i + 1}: off {off[-1]:,.0f} IOPS ({cpu_off[-1]:.1f} us CPU/request),"
                    f" on {on[-1]:,.0f} IOPS ({cpu_on[-1]:.1f} us CPU/request)"
                    f" (trace {records:,} requests, {sizes[-1] / 1e6:.1f} MB)",
                    file=sys.stderr,
                    flush=True,
                )
            ratio = statistics.median(on) / statistics.median(off)
            pairs = [b / a for a, b in zip(off, on)]
            results[rw] = {
                "payload": args.payload,
                "line_formatter": formatter,
                "off_iops": off,
                "on_iops": on,
                "median_off": statistics.median(off),
                "median_on": statistics.median(on),
                "ratio": ratio,
                "pair_ratios": pairs,
                "median_pair_ratio": statistics.median(pairs),
                "cpu_us_per_request_off": statistics.median(cpu_off),
                "cpu_us_per_request_on": statistics.median(cpu_on),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for rw, r in results.items():
            verdict = "ok" if r["ratio"] >= 0.8 else "BELOW 0.8x"
            print(
                f"{rw} (payload {r['payload']}): recording off {r['median_off']:,.0f} IOPS, on {r['median_on']:,.0f} IOPS:"
                f" {r['ratio']:.2f}x ({verdict}); per A-B pair: "
                + ", ".join(f"{x:.2f}" for x in r["pair_ratios"])
                + f" (median {r['median_pair_ratio']:.2f}); server CPU per request"
                f" {r['cpu_us_per_request_off']:.1f} -> {r['cpu_us_per_request_on']:.1f} us"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
