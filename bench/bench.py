#!/usr/bin/env python3
"""buselab vs nbdkit: throughput, IOPS and memory benchmark.

Starts ``buselab ram`` (headless, on a Unix socket, telemetry on as it always
is) and ``nbdkit memory`` side by side, drives both with fio's nbd engine,
alternating A B A B, and prints medians and the ratio buselab/nbdkit against
the targets of issue 2.  A separate memory check measures the RSS of an idle
``buselab ram --size 1T`` and of one that has had 256 MiB written to it.

Standard library only; needs the fio (with its nbd engine) and nbdkit
programs.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

MiB = 1024 * 1024

# ---------------------------------------------------------------------------
# Cases and targets (issue 2, "Benchmark")
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # unique id, used in JSON
    group: str  # what --only selects
    label: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int
    metric: str  # "bw" (bytes/s) or "iops"
    target: float  # minimum ratio buselab/nbdkit

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


CASES = [
    Case("seq_read", "seq", "seq read 1M qd8", "read", "1M", 8, 1, "bw", 1.0),
    Case("seq_write", "seq", "seq write 1M qd8", "write", "1M", 8, 1, "bw", 1.0),
    Case("rand_read_qd1", "rand1", "rand read 4K qd1", "randread", "4k", 1, 1, "iops", 0.9),
    Case("rand_write_qd1", "rand1", "rand write 4K qd1", "randwrite", "4k", 1, 1, "iops", 0.9),
    Case("rand_read_4x8", "rand4x8", "rand read 4K 4x8", "randread", "4k", 8, 4, "iops", 0.75),
    Case("rand_write_4x8", "rand4x8", "rand write 4K 4x8", "randwrite", "4k", 8, 4, "iops", 0.75),
]
GROUPS = ["seq", "rand1", "rand4x8", "memory"]

IDLE_RSS_LIMIT = 80 * 1000 * 1000  # "under 80 MB"
WRITTEN_BYTES = 256 * MiB
WRITTEN_RSS_LIMIT = int(WRITTEN_BYTES * 1.15)  # "at most 15% above 256 MiB"


class BenchError(Exception):
    """A failure worth one clear line (missing tool, server died, fio error)."""


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

_children: list[subprocess.Popen] = []


def _child_setup(cpus: set[int] | None):
    def setup() -> None:
        # Get SIGTERM if the benchmark dies without cleaning up.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def parse_cpus(text: str | None) -> set[int] | None:
    """'0', '0,1' or '0-1' -> {0, 1}."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def spawn(argv: list[str], log: Path | None = None, cpus: set[int] | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches us only; we stop them in order
            preexec_fn=_child_setup(cpus) if sys.platform.startswith("linux") else None,
        )
    finally:
        if log:
            out.close()
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL. Returns the exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in list(_children):
        stop(proc, timeout=5.0)


def _on_signal(signum, frame):
    raise KeyboardInterrupt


def wait_nbd_socket(path: Path, proc: subprocess.Popen, what: str, log: Path | None, timeout: float = 30.0) -> None:
    """Wait until `path` accepts a connection and greets with NBDMAGIC."""
    deadline = time.monotonic() + timeout
    last = "socket not created"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before it was ready" + _log_tail(log))
        if path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2.0)
            try:
                s.connect(str(path))
                greeting = b""
                while len(greeting) < 8:
                    chunk = s.recv(8 - len(greeting))
                    if not chunk:
                        break
                    greeting += chunk
                if greeting == b"NBDMAGIC":
                    return
                last = f"unexpected greeting {greeting!r}"
            except OSError as e:
                last = str(e)
            finally:
                s.close()
        time.sleep(0.05)
    raise BenchError(f"{what} did not become ready on {path} within {timeout:.0f}s ({last})" + _log_tail(log))


def _log_tail(log: Path | None, lines: int = 15) -> str:
    if not log or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(text) if text else ""


@dataclass
class Server:
    name: str
    argv: list[str]
    sock: Path
    log: Path
    cpus: set[int] | None = None
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        self.proc = spawn(self.argv, self.log, self.cpus)
        wait_nbd_socket(self.sock, self.proc, self.name, self.log)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is no longer running (exit status {code})" + _log_tail(self.log))

    def stop(self) -> int | None:
        return stop(self.proc) if self.proc else None


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------
# fio
# ---------------------------------------------------------------------------


def check_tools() -> None:
    missing = []
    if not shutil.which("fio"):
        missing.append("fio (apt-get install fio)")
    else:
        r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
        if r.returncode != 0 or "uri" not in r.stdout:
            missing.append("fio's nbd engine (this fio was built without libnbd; Debian's fio package has it)")
    if not shutil.which("nbdkit"):
        missing.append("nbdkit (apt-get install nbdkit)")
    if missing:
        raise BenchError("missing: " + "; ".join(missing))


def run_fio(
    uri: str,
    tmp: Path,
    name: str,
    *,
    rw: str,
    bs: str,
    iodepth: int,
    numjobs: int = 1,
    size: str,
    runtime: float | None,
    ramp: float = 0,
    extra: list[str] = (),
    cpus: set[int] | None = None,
) -> dict:
    """Run one fio job on `uri`; returns fio's aggregated job entry."""
    out = tmp / f"fio-{name}.json"
    argv = [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--output-format=json",
        f"--output={out}",
    ]
    if numjobs > 1:
        argv += [f"--numjobs={numjobs}", "--group_reporting"]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime:g}"]
        if ramp:
            argv += [f"--ramp_time={ramp:g}"]
    if rw.startswith("rand"):
        argv += ["--norandommap", "--randrepeat=0"]
    argv += list(extra)
    budget = (runtime or 0) + ramp + 120
    proc = spawn(argv, tmp / f"fio-{name}.log", cpus)
    try:
        proc.wait(budget)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise BenchError(f"fio {name} on {uri} did not finish within {budget:.0f}s") from None
    finally:
        if proc in _children:
            _children.remove(proc)
    log = tmp / f"fio-{name}.log"
    if proc.returncode != 0:
        raise BenchError(f"fio {name} on {uri} failed with status {proc.returncode}" + _log_tail(log) + _log_tail(out))
    text = out.read_text(errors="replace")
    start = text.find("{")  # fio may print notes before the JSON
    try:
        data = json.loads(text[start:])
    except ValueError:
        raise BenchError(f"fio {name}: could not parse its JSON output" + _log_tail(out)) from None
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {name} on {uri} reported error {job['error']}" + _log_tail(log))
    return job


def fio_metric(job: dict, case: Case) -> dict:
    d = job[case.direction]
    clat = d.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {
        "iops": d["iops"],
        "bw": d["bw_bytes"],
        "value": d["iops"] if case.metric == "iops" else d["bw_bytes"],
        "clat_mean_us": clat.get("mean", 0) / 1000,
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
    }


def prefill(server: Server, tmp: Path, size: str) -> float:
    """Write the whole disk once so that reads return real data."""
    t0 = time.monotonic()
    run_fio(server.uri, tmp, f"prefill-{server.name}", rw="write", bs="1M", iodepth=8, size=size, runtime=None)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    runs: dict[str, list[dict]] = field(default_factory=lambda: {"buselab": [], "nbdkit": []})

    def median(self, who: str) -> float | None:
        vals = [r["value"] for r in self.runs[who]]
        return statistics.median(vals) if vals else None

    def ratio(self) -> float | None:
        a, b = self.median("buselab"), self.median("nbdkit")
        if a is None or not b:
            return None
        return a / b


def fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    if metric == "bw":
        return f"{v / MiB:,.0f} MiB/s"
    return f"{v / 1000:,.1f}k IOPS"


def run_speed(args, tmp: Path, cases: list[Case]) -> tuple[list[CaseResult], dict]:
    buselab = Server(
        "buselab",
        [sys.executable, "-m", "buselab", *args.backend_args, "--unix", str(tmp / "buselab.sock"), "--headless"],
        tmp / "buselab.sock",
        tmp / "buselab.log",
        args.server_cpus,
    )
    nbdkit = Server(
        "nbdkit",
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(tmp / "nbdkit.sock"), *args.nbdkit_args],
        tmp / "nbdkit.sock",
        tmp / "nbdkit.log",
        args.server_cpus,
    )
    servers = [buselab, nbdkit]  # A B A B
    info: dict = {"buselab_argv": buselab.argv, "nbdkit_argv": nbdkit.argv}
    say(f"starting: {shlex.join(buselab.argv[1:])}")
    say(f"starting: {shlex.join(nbdkit.argv)}")
    for s in servers:
        s.start()

    results = [CaseResult(c) for c in cases]
    try:
        if not args.no_prefill and any(c.direction == "read" for c in cases):
            for s in servers:
                secs = prefill(s, tmp, args.size)
                s.check_alive()
                say(f"prefilled {s.name} ({args.size}) in {secs:.1f}s")
                info[f"prefill_seconds_{s.name}"] = round(secs, 2)
        for rnd in range(args.rounds):
            for res in results:
                c = res.case
                for s in servers:
                    job = run_fio(
                        s.uri,
                        tmp,
                        f"{c.key}-{s.name}-{rnd}",
                        rw=c.rw,
                        bs=c.bs,
                        iodepth=c.iodepth,
                        numjobs=c.numjobs,
                        size=args.size,
                        runtime=args.runtime,
                        ramp=args.ramp,
                        cpus=args.fio_cpus,
                    )
                    s.check_alive()
                    m = fio_metric(job, c)
                    res.runs[s.name].append(m)
                    say(
                        f"  round {rnd + 1}/{args.rounds}  {c.label:<18} {s.name:<8} "
                        f"{fmt_value(m['value'], c.metric):>16}   p50 {m['clat_p50_us']:.0f} us"
                    )
        info["buselab_rss_after_bytes"] = rss_bytes(buselab.proc.pid)
    finally:
        status = buselab.stop()
        nbdkit.stop()
        info["buselab_exit_status"] = status
        lines = buselab.log.read_text(errors="replace").splitlines()
        info["buselab_log_tail"] = lines[-5:]
        # Headless stats lines end in "| totals: ..., errors N" (N since the start);
        # anything else that mentions an error, a warning or a traceback is worth showing.
        stats = [ln for ln in lines if re.search(r"\| totals: .*, errors [\d,]+$", ln)]
        info["buselab_error_replies"] = int(stats[-1].rsplit(" ", 1)[1].replace(",", "")) if stats else 0
        info["buselab_log_error_lines"] = [
            ln for ln in lines if ln not in stats and re.search(r"traceback|error|warn|exception", ln, re.I)
        ][:20]
    if status not in (0, None):
        say(f"note: buselab exited with status {status} on SIGTERM" + _log_tail(buselab.log, 5))
    return results, info


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def run_memory(args, tmp: Path) -> dict:
    sock = tmp / "mem.sock"
    s = Server(
        "buselab-1T",
        [sys.executable, "-m", "buselab", "ram", "--size", "1T", "--unix", str(sock), "--headless"],
        sock,
        tmp / "mem.log",
    )
    say(f"memory: starting {shlex.join(s.argv[1:])}")
    s.start()
    try:
        time.sleep(args.settle)
        idle = rss_bytes(s.proc.pid)
        say(f"memory: idle RSS {idle / 1e6:.1f} MB ({idle / MiB:.1f} MiB)")
        run_fio(s.uri, tmp, "mem-write", rw="write", bs="1M", iodepth=8, size="256M", runtime=None)
        s.check_alive()
        time.sleep(args.settle)
        written = rss_bytes(s.proc.pid)
        say(f"memory: RSS after 256 MiB written {written / MiB:.1f} MiB")
    finally:
        s.stop()
    return {
        "idle_rss_bytes": idle,
        "idle_limit_bytes": IDLE_RSS_LIMIT,
        "idle_pass": idle < IDLE_RSS_LIMIT,
        "written_bytes": WRITTEN_BYTES,
        "written_rss_bytes": written,
        "written_limit_bytes": WRITTEN_RSS_LIMIT,
        "written_overhead": written / WRITTEN_BYTES - 1,
        "written_pass": written <= WRITTEN_RSS_LIMIT,
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_table(results: list[CaseResult], mem: dict | None, args) -> bool:
    """Print the summary; returns True if every target was met."""
    ok = True
    n = args.rounds
    print()
    if results:
        print(
            f"median of {n} run{'s' if n != 1 else ''} per server, "
            f"{args.runtime:g}s each (buselab: {' '.join(args.backend_args)}; "
            f"nbdkit: {' '.join(args.nbdkit_args)})"
        )
        hdr = f"{'case':<18} {'buselab':>16} {'nbdkit':>16} {'ratio':>7} {'target':>8}  result"
        print(hdr)
        print("-" * len(hdr))
        for r in results:
            ratio = r.ratio()
            met = ratio is not None and ratio >= r.case.target
            ok &= met
            print(
                f"{r.case.label:<18} {fmt_value(r.median('buselab'), r.case.metric):>16} "
                f"{fmt_value(r.median('nbdkit'), r.case.metric):>16} "
                f"{'-' if ratio is None else f'{ratio:.2f}x':>7} "
                f"{f'>={r.case.target:.2f}x':>8}  {'PASS' if met else 'below'}"
            )
    if mem:
        print()
        print(f"{'memory':<34} {'RSS':>10} {'limit':>10}  result")
        print(
            f"{'idle ram --size 1T':<34} {mem['idle_rss_bytes'] / 1e6:>7.1f} MB "
            f"{'<80.0 MB':>10}  {'PASS' if mem['idle_pass'] else 'over'}"
        )
        print(
            f"{'ram 1T after 256 MiB written':<34} "
            f"{mem['written_rss_bytes'] / MiB:>6.1f} MiB "
            f"{f'<={WRITTEN_RSS_LIMIT / MiB:.1f}':>10}  "
            f"{'PASS' if mem['written_pass'] else 'over'}"
            f"  ({mem['written_overhead'] * 100:+.1f}% vs 256 MiB)"
        )
        ok &= mem["idle_pass"] and mem["written_pass"]
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark buselab against nbdkit with fio's nbd engine.",
        epilog="Example: python bench/bench.py --quick --only seq,memory",
    )
    p.add_argument("--rounds", type=int, default=3, help="A B rounds per case; medians are taken over them (default 3)")
    p.add_argument("--runtime", type=float, default=5, help="seconds per fio run (default 5)")
    p.add_argument("--ramp", type=float, default=1, help="fio ramp_time before measuring, seconds (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: --rounds 1 --runtime 2 --ramp 0")
    p.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated subset of {','.join(GROUPS)}, or case keys ({','.join(c.key for c in CASES)})",
    )
    p.add_argument("--size", default="1G", help="disk size for both servers and fio (default 1G)")
    p.add_argument(
        "--backend-args",
        default=None,
        help="buselab arguments before --unix, e.g. 'null --size 1G' (default 'ram --size SIZE')",
    )
    p.add_argument(
        "--nbdkit-args", default=None, help="nbdkit plugin and arguments, e.g. 'null 1G' (default 'memory SIZE')"
    )
    p.add_argument("--no-prefill", action="store_true", help="skip writing the whole disk before the read cases")
    p.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS (default 1)")
    p.add_argument(
        "--server-cpus", metavar="LIST", help="pin both servers to these CPUs, e.g. 1 or 0-1 (default: no pinning)"
    )
    p.add_argument("--fio-cpus", metavar="LIST", help="pin fio to these CPUs, e.g. 0 (default: no pinning)")
    p.add_argument(
        "--json",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="also write results as JSON (default bench/results/bench-TIMESTAMP.json)",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 2 if any target is missed")
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with sockets, logs and fio output"
    )
    args = p.parse_args(argv)

    if args.quick:
        args.rounds, args.runtime, args.ramp = 1, 2, 0
    if args.rounds < 1 or args.runtime <= 0:
        p.error("--rounds must be >= 1 and --runtime > 0")
    args.backend_args = shlex.split(args.backend_args) if args.backend_args else ["ram", "--size", args.size]
    args.nbdkit_args = shlex.split(args.nbdkit_args) if args.nbdkit_args else ["memory", args.size]

    try:
        args.server_cpus = parse_cpus(args.server_cpus)
        args.fio_cpus = parse_cpus(args.fio_cpus)
    except ValueError:
        p.error("--server-cpus/--fio-cpus take a list like 0,1 or 0-1")
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    known = set(GROUPS) | {c.key for c in CASES}
    if not wanted or wanted - known:
        p.error(
            f"--only: unknown {', '.join(sorted(wanted - known)) or '(empty)'}; "
            f"choose from {', '.join(GROUPS)} or {', '.join(c.key for c in CASES)}"
        )
    cases = [c for c in CASES if c.group in wanted or c.key in wanted]

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="buselab-bench-"))
    results: list[CaseResult] = []
    info: dict = {}
    mem = None
    started = time.time()
    try:
        check_tools()
        say(f"buselab bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, tmp {tmp}")
        if cases:
            results, info = run_speed(args, tmp, cases)
        if "memory" in wanted:
            mem = run_memory(args, tmp)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping servers")
        stop_all()
        return 130
    except BenchError as e:
        stop_all()
        say(f"bench: error: {e}")
        return 1
    finally:
        stop_all()
        if args.keep_tmp:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ok = print_table(results, mem, args)
    if info.get("buselab_error_replies"):
        print(f"\nbuselab's stats lines counted {info['buselab_error_replies']} error replies")
    if info.get("buselab_log_error_lines"):
        print("\nbuselab log lines mentioning errors:")
        for ln in info["buselab_log_error_lines"]:
            print("  " + ln)

    if args.json is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        path = Path(args.json) if args.json else RESULTS_DIR / f"bench-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "host": {
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
                "python": platform.python_version(),
                "kernel": platform.release(),
            },
            "config": {
                "rounds": args.rounds,
                "runtime": args.runtime,
                "ramp": args.ramp,
                "size": args.size,
                "backend_args": args.backend_args,
                "nbdkit_args": args.nbdkit_args,
                "prefill": not args.no_prefill,
                "server_cpus": sorted(args.server_cpus or []),
                "fio_cpus": sorted(args.fio_cpus or []),
            },
            "cases": [
                {
                    "key": r.case.key,
                    "label": r.case.label,
                    "rw": r.case.rw,
                    "bs": r.case.bs,
                    "iodepth": r.case.iodepth,
                    "numjobs": r.case.numjobs,
                    "metric": r.case.metric,
                    "target": r.case.target,
                    "median_buselab": r.median("buselab"),
                    "median_nbdkit": r.median("nbdkit"),
                    "ratio": r.ratio(),
                    "pass": (r.ratio() or 0) >= r.case.target,
                    "runs": r.runs,
                }
                for r in results
            ],
            "memory": mem,
            "info": info,
            "all_pass": ok,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 2 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
