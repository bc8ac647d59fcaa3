"""`buselab nbd URI`: buselab in front of real NBD servers (nbdkit, qemu-nbd), driven by real clients.

The upstreams are real processes on Unix sockets; the proxy is a Session in
this process (or `buselab nbd` as a subprocess where the command line is the
point). Clients are nbdcopy, nbdinfo, fio's nbd engine and buselab's own client.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TIMEOUT, RawClient, connect, missing, require_tool, serve, socket_path, start_buselab, wait_for

from buselab.client import ConnectionLost, NBDError, Pipeline, parse_nbd_uri
from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.protocol.transmission import encode_request
from buselab.storage.backends import nbd_libnbd
from buselab.storage.backends.nbd_proxy import LIBNBD_HANDLES, POOL_SIZE, NbdProxyBackend
from buselab.storage.backends.ram import RamBackend

KiB, MiB = 1 << 10, 1 << 20


# --- upstream servers ---------------------------------------------------------------------------


class Upstream:
    """A real NBD server process on a Unix socket, which can be killed and started again."""

    def __init__(self, argv: list[str], sock: Path, log: Path) -> None:
        self.argv = argv
        self.sock = sock
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, argv: list[str] | None = None) -> Upstream:
        if self.sock.exists():
            self.sock.unlink()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv or self.argv, stdout=out, stderr=subprocess.STDOUT)
        # Listening, not just bound: the socket file exists a moment before connect() works.
        wait_for(lambda: self._accepts() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        return self

    def _accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.sock))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # nbdkit waits for its clients after SIGTERM
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGKILL)


def nbdkit(tmp_path: Path, *args: str, name: str = "nbdkit") -> Upstream:
    require_tool("nbdkit")
    sock = tmp_path / f"{name}.sock"
    return Upstream(["nbdkit", "-f", "-U", str(sock), *args], sock, tmp_path / f"{name}.log")


def qemu_nbd(tmp_path: Path, size: int = 64 * MiB) -> Upstream:
    require_tool("qemu-nbd", "qemu-img")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    sock = tmp_path / "qemu.sock"
    # --persistent: serve client after client (buselab reconnects); --shared: the pool's connections.
    argv = ["qemu-nbd", "--persistent", "--shared=8", "-f", "qcow2", "-k", str(sock), str(image)]
    return Upstream(argv, sock, tmp_path / "qemu.log")


@pytest.fixture
def upstreams():
    started: list[Upstream] = []

    def start(upstream: Upstream) -> Upstream:
        started.append(upstream)
        return upstream.start()

    yield start
    for upstream in started:
        upstream.stop()


def nbdinfo_json(uri: str) -> dict:
    require_tool("nbdinfo")
    out = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return json.loads(out.stdout)["exports"][0]


def proxy_uri(session) -> str:
    return f"nbd+unix:///?socket={session.options.unix[0]}"


# --- URIs ---------------------------------------------------------------------------------------


def test_uris_as_libnbd_writes_them():
    tcp = parse_nbd_uri("nbd://example.com:10900/disk%201")
    assert (tcp.host, tcp.port, tcp.export, tcp.socket_path) == ("example.com", 10900, "disk 1", None)
    assert parse_nbd_uri("nbd://[::1]/").host == "::1" and parse_nbd_uri("nbd://h").port == 10809
    unix = parse_nbd_uri("nbd+unix:///name?socket=/tmp/s.sock")
    assert (unix.socket_path, unix.export) == ("/tmp/s.sock", "name")


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("nbds://host/x", "TLS (nbds://) is not supported"),
        ("nbds+unix:///?socket=/s", "TLS (nbds://) is not supported"),
        ("http://host/x", "use nbd://HOST[:PORT]/NAME"),
        ("nbd+unix:///x", "needs one ?socket=PATH"),
        ("nbd://host:99999/", "the port must be a number"),
        ("/tmp/file.img", "use nbd://HOST[:PORT]/NAME"),
    ],
)
def test_bad_uris_are_one_line(uri, says):
    with pytest.raises(UserError, match=r"^[^\n]*$") as info:
        parse_nbd_uri(uri)
    assert says in str(info.value)


def test_cli_refuses_an_unreachable_upstream_in_one_line(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/nobody.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "buselab", "nbd", uri, "--unix", str(tmp_path / "p.sock"), "--headless"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"buselab: error: cannot use upstream {uri}: No such file or directory\n"


# --- what the upstream offers is what clients are offered ---------------------------------------

FEATURES = (
    "export-size",
    "is_read_only",
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_cache",
    "can_multi_conn",
    "is_rotational",
)


@pytest.mark.parametrize(
    "args",
    [
        ["memory", "64M"],
        ["-r", "memory", "64M"],
        ["--filter=nozero", "memory", "64M", "zeromode=none"],
        ["--filter=multi-conn", "memory", "64M", "multi-conn-mode=disable"],
        ["--filter=nocache", "memory", "64M", "cachemode=none"],
        # a plugin with read and write only: no FLUSH, FUA, TRIM, multi-conn, block status
        [
            "eval",
            "get_size=echo 1048576",
            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "pwrite=cat >/dev/null",
        ],
        ["null", "1G"],
    ],
    ids=["memory", "readonly", "nozero", "no-multi-conn", "nocache", "minimal", "null"],
)
def test_advertises_exactly_what_the_upstream_does(tmp_path, upstreams, args):
    up = upstreams(nbdkit(tmp_path, *args))
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        theirs, ours = nbdinfo_json(up.uri), nbdinfo_json(proxy_uri(session))
    assert {k: ours.get(k) for k in FEATURES} == {k: theirs.get(k) for k in FEATURES}
    assert ("base:allocation" in ours.get("contexts", [])) == ("base:allocation" in theirs.get("contexts", []))


def test_the_upstreams_block_sizes_are_passed_on(tmp_path, upstreams):
    """A minimum and preferred block size (a 4K-sector disk's, say) reach the clients;
    the maximum is buselab's own (it splits what the upstream would not take)."""
    policy = ["--filter=blocksize-policy", "memory", "64M", "blocksize-minimum=512", "blocksize-preferred=65536"]
    up = upstreams(nbdkit(tmp_path, *policy))
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        theirs, ours = nbdinfo_json(up.uri), nbdinfo_json(proxy_uri(session))
    assert (theirs["block_size_minimum"], theirs["block_size_preferred"]) == (512, 65536), theirs
    assert (ours["block_size_minimum"], ours["block_size_preferred"]) == (512, 65536), ours


def test_block_status_is_the_upstreams(tmp_path, upstreams):
    require_tool("nbdinfo")
    up = upstreams(nbdkit(tmp_path, "memory", "64M"))
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        with connect(session) as client:
            client.write(4 * MiB, b"x" * MiB)
            client.write(40 * MiB, b"y" * 4096)
        maps = [
            subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True, check=True).stdout
            for uri in (up.uri, proxy_uri(session))
        ]
    assert maps[0] == maps[1]
    assert "hole,zero" in maps[0] and "data" in maps[0]


# --- real clients through the proxy --------------------------------------------------------------


@pytest.fixture(params=["nbdkit", "qemu-nbd"])
def upstream(request, tmp_path, upstreams):
    if request.param == "nbdkit":
        return upstreams(nbdkit(tmp_path, "memory", "64M"))
    return upstreams(qemu_nbd(tmp_path))


def test_nbdcopy_round_trip_64m(tmp_path, upstream):
    require_tool("nbdcopy")
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(64 * MiB))
    with serve(NbdProxyBackend(upstream.uri), tmp_path) as session:
        uri = proxy_uri(session)
        subprocess.run(["nbdcopy", "--flush", str(src), uri], check=True, timeout=120)
        subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=120)
    assert src.read_bytes() == back.read_bytes()
    # ... and the bytes are really in the upstream, not just somewhere in buselab
    direct = tmp_path / "direct.img"
    subprocess.run(["nbdcopy", upstream.uri, str(direct)], check=True, timeout=120)
    assert direct.read_bytes() == src.read_bytes()


def test_fio_verify_iodepth_16_two_jobs(tmp_path, upstream):
    require_tool("fio")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout.split():
        missing("fio is built without its nbd engine")
    with serve(NbdProxyBackend(upstream.uri), tmp_path) as session:
        proc = subprocess.run(
            [
                "fio",
                "--name=proxy",
                "--ioengine=nbd",
                f"--uri={proxy_uri(session)}",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=8M",
                "--offset_increment=8M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",  # no state files left in the working directory
                "--do_verify=1",
                "--group_reporting",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB and job["read"]["io_bytes"] == 16 * MiB  # all written, all verified


def test_requests_in_flight_go_through_concurrently(tmp_path, upstreams):
    """Eight 200 ms reads take about 200 ms, over one pipelined connection and over a pool."""
    for args in (["--filter=multi-conn", "memory", "64M", "multi-conn-mode=disable"], ["memory", "64M"]):
        up = upstreams(nbdkit(tmp_path, "--filter=delay", *args, "rdelay=300ms", name=f"slow{len(args)}"))
        backend = NbdProxyBackend(up.uri)
        try:
            if backend.caps.multi_conn and nbd_libnbd.available():
                assert backend.client == "libnbd" and len(backend._handles) == LIBNBD_HANDLES
            else:
                assert backend.client == "buselab"
                assert len(backend._pool) == (POOL_SIZE if backend.caps.multi_conn else 1)
            started = time.monotonic()
            threads = [threading.Thread(target=backend.read, args=(i * MiB, 4096)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            took = time.monotonic() - started
        finally:
            backend.close()
        assert took < 1.2, f"8 reads of 300 ms each took {took:.2f} s: they were not in flight together"


def test_one_clients_pipelined_requests_overlap_through_the_proxy(tmp_path, upstreams):
    """Eight 128 KiB reads sent at once on ONE client connection, 300 ms each upstream: about
    300 ms in all, not 2.4 s (the connection hands a parallel backend's big requests to
    workers), and each reply carries its own data whatever order they finish in."""
    up = upstreams(nbdkit(tmp_path, "--filter=delay", "memory", "64M", "rdelay=300ms", name="slowone"))
    size = 128 * KiB
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        client = RawClient(socket_path(session))
        for i in range(8):
            client.request(c.CMD_WRITE, 100 + i, i * MiB, size, payload=bytes([i + 1]) * size)
        assert sorted(client.simple_reply()[1] for _ in range(8)) == list(range(100, 108))
        started = time.monotonic()
        client.send(b"".join(encode_request(c.CMD_READ, i, i * MiB, size) for i in range(8)))
        got = {}
        for _ in range(8):
            error, handle = client.simple_reply()
            assert error == 0
            got[handle] = client.recv_exact(size)
        took = time.monotonic() - started
        client.close()
    assert got == {i: bytes([i + 1]) * size for i in range(8)}
    assert took < 1.2, f"8 pipelined reads of 300 ms took {took:.2f} s: they ran one after another"


# --- steering on the proxy --------------------------------------------------------------------


def test_pause_holds_a_clients_read_step_releases_it(tmp_path, upstream):
    with serve(NbdProxyBackend(upstream.uri), tmp_path) as session:
        with connect(session) as client:
            client.write(0, b"proxied!" * 512)
            session.steering.pause()
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(client.read(0, 4096)))
            reader.start()
            wait_for(lambda: len(session.steering.held()) == 1)
            time.sleep(0.3)
            assert not got and reader.is_alive()  # held: the read has not reached the upstream
            session.steering.step()
            reader.join(TIMEOUT)
            session.steering.resume()
            assert got == [b"proxied!" * 512]


def test_switch_a_live_disk_into_an_upstream(tmp_path, upstreams):
    """`ctl switch nbd URI`: the disk's contents are copied into the upstream, which serves it from then on."""
    up = upstreams(nbdkit(tmp_path, "memory", "8M"))
    with serve(RamBackend(8 * MiB), tmp_path) as session:
        with connect(session) as client:
            client.write(MiB, b"before switch" * 100)
            result = session.steering.switch_backend("nbd", up.uri)
            assert result.to == f"nbd {up.uri}" and result.copied_bytes > 0
            client.write(2 * MiB, b"after switch")
            assert client.read(MiB, 1300) == b"before switch" * 100
        direct = tmp_path / "direct.img"
        subprocess.run(["nbdcopy", up.uri, str(direct)], check=True, timeout=TIMEOUT)
    data = direct.read_bytes()
    assert data[MiB : MiB + 1300] == b"before switch" * 100 and data[2 * MiB : 2 * MiB + 12] == b"after switch"


# --- the two clients: libnbd's and buselab's own -----------------------------------------------


@pytest.fixture(params=["libnbd", "buselab"])
def client(request):
    if request.param == "libnbd" and not nbd_libnbd.available():
        missing("libnbd's Python bindings (python3-libnbd) are not importable in this venv: run scripts/venv")
    return request.param


def test_each_client_carries_reads_and_writes_and_survives_an_outage(tmp_path, upstreams, client):
    """Forced onto each client: 1 MiB and 4 KiB writes and reads verified by fio, the bytes in the
    upstream, then kill -9 of the upstream (EIO) and the same client again once it is back."""
    require_tool("fio")
    up = upstreams(nbdkit(tmp_path, "memory", "64M"))  # multi-conn: the libnbd handles can be used
    backend = NbdProxyBackend(up.uri, client=client)
    assert backend.client == client
    with serve(backend, tmp_path) as session:
        uri = proxy_uri(session)
        for bs, depth in (("1M", 8), ("4k", 16)):
            proc = subprocess.run(
                ["fio", "--name=proxy", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", f"--bs={bs}",
                 f"--iodepth={depth}", "--size=16M", "--verify=crc32c", "--verify_fatal=1",
                 "--verify_state_save=0", "--do_verify=1", "--output-format=json"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
            assert job["error"] == 0 and job["read"]["io_bytes"] == 16 * MiB
        with connect(session) as nbd_client:
            nbd_client.write(MiB, b"through the proxy" * 100)
            # ... the bytes are in the upstream, read there directly
            direct = Pipeline.open(parse_nbd_uri(up.uri))
            try:
                assert bytes(direct.call(c.CMD_READ, MiB, 1700).data) == b"through the proxy" * 100
            finally:
                direct.close()
            up.kill()
            with pytest.raises(NBDError) as info:
                nbd_client.read(0, MiB)
            assert info.value.errno == c.EIO
            up.start()
            wait_for(lambda: backend._down is None)
            nbd_client.write(0, b"back" * 1024)
            assert nbd_client.read(0, 4096) == b"back" * 1024
            assert backend.client == client


def test_an_unknown_client_is_one_line():
    with pytest.raises(UserError, match="unknown NBD client 'curl': use one of auto, libnbd, buselab"):
        NbdProxyBackend("nbd+unix:///?socket=/nonexistent", client="curl")


# --- the upstream goes away and comes back --------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_upstream_gone_gives_eio_then_recovers(tmp_path, upstream, sig, caplog):
    caplog.set_level(logging.WARNING, logger="buselab")
    with serve(NbdProxyBackend(upstream.uri), tmp_path) as session:
        with connect(session) as client:
            client.write(0, b"a" * 4096)
            upstream.kill(sig)
            with pytest.raises(NBDError) as info:
                client.read(0, 4096)
            assert info.value.errno == c.EIO
            with pytest.raises(NBDError):  # fails at once, every time, while it is away
                client.write(0, b"b" * 4096)
            gone = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
            assert gone == [
                f"upstream {upstream.uri} went away: {gone[0].split(': ', 1)[1].split(';')[0]};"
                " requests fail with EIO until it is back"
            ], gone
            upstream.start()
            wait_for(lambda: any("is back: requests go through" in r.getMessage() for r in caplog.records))
            client.write(0, b"c" * 4096)  # the same client, on the same connection to buselab
            assert client.read(0, 4096) == b"c" * 4096


def test_upstream_back_with_another_size_stays_refused(tmp_path, upstreams, caplog):
    caplog.set_level(logging.WARNING, logger="buselab")
    up = upstreams(nbdkit(tmp_path, "memory", "64M"))
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        with connect(session) as client:
            up.kill()
            up.start(up.argv[:-1] + ["32M"])
            wait_for(lambda: any("came back with 33554432 bytes" in r.getMessage() for r in caplog.records))
            with pytest.raises(NBDError) as info:
                client.read(0, 4096)
            assert info.value.errno == c.EIO
            up.kill()
            up.start(up.argv)
            wait_for(lambda: any("is back: requests go through" in r.getMessage() for r in caplog.records))
            assert client.read(0, 4096) == bytes(4096)


# --- the command line -----------------------------------------------------------------------------


def test_buselab_nbd_command_in_front_of_nbdkit(tmp_path, upstreams):
    require_tool("nbdinfo")
    up = upstreams(nbdkit(tmp_path, "memory", "16M"))
    served = start_buselab(["nbd", up.uri], tmp_path, name="proxy")
    try:
        size = subprocess.run(["nbdinfo", "--size", served.uri], capture_output=True, text=True, timeout=TIMEOUT)
        assert size.stdout.strip() == str(16 * MiB)
    finally:
        assert served.stop() == 0
    assert f"serving nbd {up.uri}" in served.output()


def test_replies_out_of_order_reach_their_own_requests(tmp_path, upstreams):
    """The upstream answers the later request first: each thread still gets its own bytes."""
    # offset 0 answers after 0.6 s, every other offset at once; data is the offset's first byte repeated.
    pread = (
        'case "$4" in 0) sleep 0.6; byte=A;; 1048576) byte=B;; *) byte=C;; esac; '
        'head -c "$3" /dev/zero | tr "\\0" "$byte"'
    )
    up = upstreams(
        nbdkit(tmp_path, "eval", "thread_model=echo parallel", "get_size=echo 8388608", f"pread={pread}",
               "pwrite=cat >/dev/null")
    )  # fmt: skip
    backend = NbdProxyBackend(up.uri)
    try:
        done: list[tuple[int, bytes]] = []
        threads = [
            threading.Thread(target=lambda o=o: done.append((o, bytes(backend.read(o, 4096)))))
            for o in (0, MiB, 2 * MiB)
        ]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(TIMEOUT)
    finally:
        backend.close()
    assert [o for o, _ in done][-1] == 0  # the first request sent came back last
    assert dict(done) == {0: b"A" * 4096, MiB: b"B" * 4096, 2 * MiB: b"C" * 4096}


def test_a_hang_up_is_noticed_with_no_request_in_flight(tmp_path, upstreams):
    """The log line comes when the upstream goes, not at the next request (the lab shows it at once)."""
    up = upstreams(nbdkit(tmp_path, "memory", "1M"))
    lost: list[str] = []
    pipeline = Pipeline.open(parse_nbd_uri(up.uri), on_lost=lambda _p, why: lost.append(why))
    try:
        up.kill()
        wait_for(lambda: lost == ["the server closed the connection"], timeout=5)
        with pytest.raises(ConnectionLost, match="the server closed the connection"):
            pipeline.call(c.CMD_READ, 0, 512)
    finally:
        pipeline.close()
    assert lost == ["the server closed the connection"]  # told once


def test_an_upstream_answering_eshutdown_is_hung_up_on_and_reconnected(tmp_path, upstreams, caplog):
    """ESHUTDOWN means the server is stopping: buselab hangs up, clients get EIO, and it reconnects."""
    caplog.set_level(logging.WARNING, logger="buselab")
    stopping = tmp_path / "stopping"  # nbdkit's error filter fails every request while this file exists
    up = upstreams(
        nbdkit(tmp_path, "--filter=error", "memory", "64M", "error=ESHUTDOWN", "error-rate=100%",
               f"error-file={stopping}")
    )  # fmt: skip
    with serve(NbdProxyBackend(up.uri), tmp_path) as session:
        with connect(session) as client:
            stopping.touch()
            with pytest.raises(NBDError) as info:
                client.read(0, 4096)
            assert info.value.errno == c.EIO
            assert any("went away: it is shutting down (ESHUTDOWN)" in r.getMessage() for r in caplog.records)
            stopping.unlink()
            wait_for(lambda: any("is back: requests go through" in r.getMessage() for r in caplog.records))
            assert client.read(0, 4096) == bytes(4096)


def test_a_forked_child_serves_on_connections_of_its_own(tmp_path, upstreams, caplog):
    """--fork opens the backend, then forks: the child has the parent's sockets but not its threads,
    so it connects afresh; closing its backend leaves the parent's connections alone."""
    caplog.set_level(logging.WARNING, logger="buselab")
    up = upstreams(nbdkit(tmp_path, "memory", "8M"))
    backend = NbdProxyBackend(up.uri)
    try:
        backend.write(0, b"parent")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            try:
                got = bytes(backend.read(0, 6))
                backend.write(4096, b"child")
                backend.close()  # as a child that stops serving does: DISC and shutdown on ITS sockets
                os.write(write_end, got)
            finally:
                os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        assert os.read(read_end, 64) == b"parent" and status == 0
        os.close(read_end)
        time.sleep(0.3)  # a hang-up on the parent's connections would be noticed by now
        assert bytes(backend.read(4096, 5)) == b"child"
        assert not [r for r in caplog.records if "went away" in r.getMessage()]
    finally:
        backend.close()
