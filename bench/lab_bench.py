#!/usr/bin/env python3
"""What the lab costs: fio against buselab with the lab open in tmux vs headless.

    python bench/lab_bench.py                      # 3 rounds of 10 s randread + randwrite
    python bench/lab_bench.py --runtime 20 --reps 5 --json out.json
    python bench/lab_bench.py --soak 600           # ten minutes at full load: memory and refresh rate
    python bench/lab_bench.py --attached           # headless vs headless with `buselab attach` open

Each round runs the same fio job (4 KiB random, 4 jobs x iodepth 8, the nbd
engine over a Unix socket) against `buselab ram --headless` and against
`buselab ram` with the lab in a real terminal (tmux, 160x50 by default), in
alternating order, and reports medians: the lab should keep >= 0.85x of the
headless IOPS. The refresh rate is measured twice: by the lab itself (frames
Textual wrote, BUSELAB_LAB_STATS) and from outside, by timestamping what tmux
receives from the lab (`pipe-pane`) and counting bursts of output.
With --attached the second arm is `buselab ram --headless --control PATH` with
a viewer (`buselab attach PATH`) open in tmux and refreshing: the server should
keep >= 0.9x of its headless IOPS.
Needs fio (with the nbd engine) and tmux. Not a test: the numbers move about
+-15% from run to run on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAME_GAP = 0.012  # seconds of silence that separate two frames in the pane output


def wait_for_socket(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise RuntimeError(f"buselab did not listen on {path} within {timeout:.0f}s")


def run_fio(sock: str, rw: str, runtime: float, size: str) -> dict:
    cmd = [
        "fio",
        "--name=lab",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///?socket={sock}",
        f"--rw={rw}",
        "--bs=4k",
        "--numjobs=4",
        "--iodepth=8",
        "--time_based",
        f"--runtime={runtime:g}",
        "--group_reporting",
        f"--size={size}",
        "--output-format=json",
    ]
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ended = time.time()
    job = json.loads(out[out.index("{") :])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    return {"iops": iops, "started": started, "ended": ended}


def buselab_cmd(size: str, sock: str, headless: bool) -> list[str]:
    cmd = [sys.executable, "-m", "buselab", "ram", "--size", size, "--unix", sock]
    return cmd + (["--headless"] if headless else [])


def run_headless(work: Path, rw: str, args: argparse.Namespace) -> dict:
    sock = str(work / "headless.sock")
    with open(work / "headless.log", "wb") as log:
        proc = subprocess.Popen(buselab_cmd(args.size, sock, True), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock)
        time.sleep(args.settle)
        result = run_fio(sock, rw, args.runtime, args.size)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    return result


def count_frames(tap: Path, start: float, end: float) -> tuple[int, int]:
    """Bursts of pane output (frames) and bytes between start and end."""
    frames = 0
    nbytes = 0
    last = None
    for line in tap.read_text().splitlines():
        t_text, _, n_text = line.partition(" ")
        t = float(t_text)
        if t < start or t > end:
            last = t
            continue
        if last is None or t - last > FRAME_GAP:
            frames += 1
        nbytes += int(n_text)
        last = t
    return frames, nbytes


def run_lab(work: Path, rw: str, args: argparse.Namespace, runtime: float | None = None) -> dict:
    """The lab in tmux: in the serving process, or (--attached) a viewer of a headless server."""
    sock = str(work / "lab.sock")
    server = None
    if args.attached:
        ctl = str(work / "lab.ctl")
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen(
                [*buselab_cmd(args.size, sock, True), "--control", ctl], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_socket(ctl)
    try:
        return _run_lab(work, rw, args, sock, runtime)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(30)


def _run_lab(work: Path, rw: str, args: argparse.Namespace, sock: str, runtime: float | None) -> dict:
    stats = work / "lab-stats.json"
    tap = work / "pane.tap"
    done = work / "lab.done"
    for path in (stats, tap, done):
        path.unlink(missing_ok=True)
    session = f"buselab-bench-{os.getpid()}-{time.monotonic_ns()}"  # a fresh tmux server each run
    if args.attached:
        inner = f"{sys.executable} -m buselab attach {work / 'lab.ctl'}"
    else:
        inner = " ".join(buselab_cmd(args.size, sock, False))
    # The lab must own the terminal: run it in tmux, with output to the pane.
    shell = f"BUSELAB_LAB_STATS={stats} {inner}; touch {done}; sleep 60"
    # A private tmux server with no config: a running server's options cannot
    # shrink the window. The pane waits in a placeholder until the window has
    # its size, so the lab starts at the size it is measured at.
    tmux = ["tmux", "-L", session, "-f", "/dev/null"]
    size = ["-x", str(args.cols), "-y", str(args.rows)]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, *size, "sleep 600"], check=True)
    subprocess.run([*tmux, "set-option", "-t", session, "window-size", "manual"], check=True)
    subprocess.run([*tmux, "resize-window", "-t", session, *size], check=True)
    tapper = f"{sys.executable} {Path(__file__).resolve()} --tap {tap}"
    subprocess.run([*tmux, "pipe-pane", "-t", session, "-o", tapper], check=True)
    subprocess.run([*tmux, "respawn-pane", "-k", "-t", session, f"unset COLUMNS LINES; {shell}"], check=True)
    try:
        wait_for_socket(sock)
        time.sleep(args.settle)
        result = run_fio(sock, rw, runtime or args.runtime, args.size)
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    frames, nbytes = count_frames(tap, result["started"], result["ended"])
    seconds = result["ended"] - result["started"]
    result["terminal_hz"] = frames / seconds
    result["terminal_kib_s"] = nbytes / seconds / 1024
    result["lab"] = json.loads(stats.read_text()) if stats.exists() else {}
    frame_times = result["lab"].pop("frame_times", [])
    result["lab_frame_hz"] = sum(1 for t in frame_times if result["started"] <= t <= result["ended"]) / seconds
    result["screen_ok"] = "requests" in screen and "address space" in screen
    return result


def tap_main(path: str) -> None:
    """`tmux pipe-pane` target: timestamp every chunk the lab writes to the terminal."""
    out = open(path, "w", buffering=1)
    stdin = sys.stdin.buffer.raw
    while True:
        chunk = stdin.read(65536)
        if not chunk:
            break
        out.write(f"{time.time():.6f} {len(chunk)}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run")
    parser.add_argument("--reps", type=int, default=3, help="rounds (each: headless and lab, alternating order)")
    parser.add_argument("--rw", default="randread,randwrite", help="fio rw modes, comma separated")
    parser.add_argument("--size", default="1G", help="RAM disk size")
    parser.add_argument("--cols", type=int, default=160)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between start and fio")
    parser.add_argument("--soak", type=float, help="instead: one lab run of this many seconds; report memory")
    parser.add_argument(
        "--attached", action="store_true", help="the lab as a viewer (buselab attach) of a headless server"
    )
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--tap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tap:
        tap_main(args.tap)
        return 0
    for tool in ("fio", "tmux"):
        if shutil.which(tool) is None:
            print(f"lab_bench: {tool} is not installed", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="buselab-bench-"))
    report: dict = {
        "mode": "attached" if args.attached else "in-process lab",
        "runtime": args.runtime,
        "reps": args.reps,
        "size": args.size,
        "terminal": f"{args.cols}x{args.rows}",
    }
    if args.soak:
        result = run_lab(work, "randrw", args, runtime=args.soak)
        rss = result["lab"].get("rss", [])
        report["soak"] = result
        print(
            f"soak {args.soak:.0f}s randrw: {result['iops']:,.0f} IOPS, lab {result['lab'].get('frame_hz', 0):.1f} frames/s,"
        )
        print(
            f"  terminal saw {result['terminal_hz']:.1f} updates/s, UI thread CPU {result['lab'].get('ui_cpu', 0):.0%}"
        )
        # The RAM disk itself fills as fio touches it: judge the lab by what
        # happens after the first minute, when the backend is fully resident.
        live = [(t, b) for t, b in rss[:-1] if t >= 60]  # the last sample is after the session stopped
        for t, rss_bytes in rss[:-1]:
            if t < 60 or int(t) % 60 < 10:
                print(f"  rss at {t:6.0f}s: {rss_bytes / 2**20:7.1f} MiB")
        if len(live) >= 2:
            first = statistics.median(b for t, b in live if t < 120)
            last = statistics.median(b for t, b in live if t >= live[-1][0] - 60)
            report["soak_rss_growth"] = last - first
            print(f"  rss from minute 1 to the last minute: {(last - first) / 2**20:+.1f} MiB")
    else:
        for rw in args.rw.split(","):
            headless, lab = [], []
            for rep in range(args.reps):
                order = ("headless", "lab") if rep % 2 == 0 else ("lab", "headless")
                for mode in order:
                    if mode == "headless":
                        r = run_headless(work, rw, args)
                        headless.append(r)
                        print(f"{rw:9} rep {rep + 1} headless {r['iops']:>10,.0f} IOPS", flush=True)
                    else:
                        r = run_lab(work, rw, args)
                        lab.append(r)
                        s = r["lab"]
                        print(
                            f"{rw:9} rep {rep + 1} {'attached' if args.attached else 'lab     '} {r['iops']:>10,.0f} IOPS"
                            f"  frames {r['lab_frame_hz']:5.1f}/s terminal {r['terminal_hz']:5.1f}/s"
                            f"  ticks {s.get('tick_hz', 0):5.1f}/s ({s.get('tick_ms_mean', 0):.1f} ms)"
                            f"  UI CPU {s.get('ui_cpu', 0):.0%}  screen {'ok' if r['screen_ok'] else 'MISSING'}",
                            flush=True,
                        )
            h = statistics.median(r["iops"] for r in headless)
            m = statistics.median(r["iops"] for r in lab)
            report[rw] = {
                "headless_iops": h,
                "lab_iops": m,
                "ratio": m / h,
                "lab_frame_hz": statistics.median(r["lab_frame_hz"] for r in lab),
                "terminal_hz": statistics.median(r["terminal_hz"] for r in lab),
                "runs": {"headless": headless, "lab": lab},
            }
            print(
                f"{rw:9} median headless {h:,.0f} IOPS, {'attached' if args.attached else 'lab'} {m:,.0f} IOPS:"
                f" {m / h:.2f}x (target >= {0.9 if args.attached else 0.85}); lab refresh {report[rw]['lab_frame_hz']:.1f}/s,"
                f" terminal {report[rw]['terminal_hz']:.1f}/s (target >= 10)",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
