"""Filters (delay, error, throttle, readonly, cache), their specs, and the cow overlay."""

from __future__ import annotations

import random
import time

import pytest
from helpers import require_tool

from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.backends.cow import CowBackend, Overlay
from buselab.storage.backends.ram import RamBackend
from buselab.storage.base import BackendError, DataLost
from buselab.storage.filters.cache import CacheFilter
from buselab.storage.filters.delay import DelayFilter
from buselab.storage.filters.error import ErrorFilter
from buselab.storage.filters.readonly import ReadonlyFilter
from buselab.storage.filters.throttle import ThrottleFilter
from buselab.storage.registry import FilterSpecError, parse_filter_spec

MiB = 1 << 20


def stacked(spec: str, size: int = 4 * MiB):
    f = parse_filter_spec(spec, size)
    f.inner = RamBackend(size)
    return f


# --- specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cls", "normal"),
    [
        ("delay:read=5ms,write=10ms", DelayFilter, "delay:read=5ms,write=10ms"),
        ("delay:5ms", DelayFilter, None),
        ("delay:random=1ms-20ms", DelayFilter, None),
        ("error:rate=0.1,errno=EIO,op=read", ErrorFilter, "error:rate=0.1,errno=EIO,op=read"),
        ("error:range=0-1M,errno=ENOSPC,op=write", ErrorFilter, "error:errno=ENOSPC,op=write,range=0-1048576"),
        ("error:rate=10%,op=read+trim", ErrorFilter, "error:rate=0.1,errno=EIO,op=read+trim"),
        ("throttle:mbps=10,iops=500", ThrottleFilter, "throttle:mbps=10,iops=500"),
        ("rate:rate=1M", ThrottleFilter, None),
        ("readonly", ReadonlyFilter, "readonly"),
        ("cache", CacheFilter, "cache"),
        ("cache:max=1M", CacheFilter, f"cache:max={MiB}"),
    ],
)
def test_good_specs(spec, cls, normal):
    f = parse_filter_spec(spec, 4 * MiB)
    assert isinstance(f, cls)
    if normal:
        assert f.spec == normal


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("bogus:x=1", "unknown filter 'bogus'"),
        ("error:errno=EFOO", "bad errno 'EFOO'"),
        ("error:range=0-8M", "past the end"),
        ("error:rate=2", "between 0 and 1"),
        ("error:colour=red", "error does not know 'colour'"),
        ("delay:read=fast", "bad duration 'fast'"),
        ("delay", "delay needs a latency"),
        ("delay:random=20ms-1ms", "must not be smaller"),
        ("throttle", "throttle needs a cap"),
        ("throttle:iops=0", "more than 0"),
        ("readonly:yes", "takes no parameters"),
        ("cache:max=lots", "bad size 'lots'"),
    ],
)
def test_bad_specs_say_one_line(spec, words):
    with pytest.raises(UserError) as info:
        parse_filter_spec(spec, 4 * MiB)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_filter_specs_stack_first_lowest_and_a_bad_one_changes_nothing():
    session = Session(RamBackend(MiB), ServeOptions(filters=["delay:read=1ms", "error:op=trim", "cache"]))
    session.start()
    top = session.engine.backend
    assert [type(top), type(top.inner), type(top.inner.inner)] == [CacheFilter, ErrorFilter, DelayFilter]
    assert isinstance(top.inner.inner.inner, RamBackend)
    assert [layer.spec for layer in session.stack.layers] == ["delay:read=1ms", "error:errno=EIO,op=trim", "cache"]
    # Everything else passes through the stack.
    assert top.size == MiB and top.kind == "ram" and top.allocated_bytes() == 0
    session.stop()
    bad = Session(RamBackend(MiB), ServeOptions(filters=["readonly", "error:errno=EFOO"]))
    with pytest.raises(FilterSpecError) as info:
        bad.start()
    assert info.value.spec == "error:errno=EFOO" and "(in --filter" not in str(info.value)
    assert info.value.worded("--filter").endswith("(in --filter error:errno=EFOO)")
    assert bad.engine.backend is bad.stack.base and not bad.stack.layers  # nothing was stacked


# --- each filter ---------------------------------------------------------------------------


def test_delay_fixed_and_random():
    f = stacked("delay:read=20ms")
    t = time.perf_counter()
    f.read(0, 512)
    assert time.perf_counter() - t >= 0.019
    waited = f.waited
    f.write(0, b"x")  # writes are not delayed
    assert f.waited == waited
    f = stacked("delay:random=1ms-5ms")
    for _ in range(20):
        f.flush()
    assert 0.02 <= f.waited <= 0.1  # each wait is drawn from 1..5 ms


def test_error_by_op_rate_and_range():
    f = stacked("error:op=read")
    with pytest.raises(BackendError) as info:
        f.read(0, 512)
    assert info.value.errno == c.EIO
    f.write(0, b"ok")  # other ops pass
    f = stacked("error:range=0-1M,errno=ENOSPC,op=write")
    with pytest.raises(BackendError) as info:
        f.write(MiB - 1, b"xy")  # touches the range's last byte
    assert info.value.errno == c.ENOSPC
    f.write(MiB, b"fine")
    assert bytes(f.read(MiB, 4)) == b"fine"
    f.flush()  # FLUSH has no offset: a range never fails it
    f = stacked("error:rate=0.25,seed=7,op=read")
    failures = 0
    for _ in range(2000):
        try:
            f.read(0, 1)
        except BackendError:
            failures += 1
    assert 380 < failures < 620
    assert f.stats()["injected"] == failures


def test_throttle_iops_and_bandwidth():
    f = stacked("throttle:iops=200,burst=0")
    t = time.perf_counter()
    for _ in range(21):
        f.read(0, 512)
    assert time.perf_counter() - t >= 0.095  # 20 intervals of 5 ms
    f = stacked("throttle:mbps=10,burst=0")
    t = time.perf_counter()
    for _ in range(6):
        f.write(0, bytes(100_000))  # 600 kB at 10 MB/s: the last waits ~50 ms
    assert time.perf_counter() - t >= 0.045


def test_readonly_refuses_writes_with_eperm():
    f = stacked("readonly")
    for call in (
        lambda: f.write(0, b"x"),
        lambda: f.trim(0, 4096),
        lambda: f.write_zeroes(0, 4096, may_trim=True, fast=False),
    ):
        with pytest.raises(BackendError) as info:
            call()
        assert info.value.errno == c.EPERM
    assert bytes(f.read(0, 4)) == bytes(4)
    f.flush()


def test_cache_keeps_writes_until_flush_and_powercut_loses_the_rest():
    f = stacked("cache")
    below = f.inner
    assert f.caps.flush and f.caps.fua
    f.write(0, b"A" * 4096)
    assert bytes(f.read(0, 4)) == b"AAAA"  # the client sees its write
    assert bytes(below.read(0, 4)) == bytes(4)  # the disk does not, yet
    f.flush()
    assert bytes(below.read(0, 4)) == b"AAAA"
    f.write(0, b"B" * 100)  # partial block over flushed data
    f.write(8192, b"C" * 4096)
    f.write(16384, b"D" * 4096, fua=True)  # FUA: durable at once
    f.trim(0, 4096)  # a trim after the flush is a change too
    assert bytes(f.read(0, 4)) == bytes(4)
    assert f.powercut() == 2 * 4096 + 4096  # blocks 0 (trim) and 2, and FUA block 4 was cached too
    assert bytes(f.read(0, 4)) == b"AAAA"
    assert bytes(f.read(8192, 4)) == bytes(4)
    assert bytes(f.read(16384, 4)) == b"DDDD"


def test_cache_close_writes_back():
    f = stacked("cache")
    below = f.inner
    f.write(4096, b"keep")
    written = []
    below_close = below.close
    below.close = lambda: (written.append(bytes(below.read(4096, 4))), below_close())
    f.close()
    assert written == [b"keep"]


class FlakyRam(RamBackend):
    """A RAM disk whose writes (or reads) fail while `failing` says so: a lower layer that breaks and heals."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.failing = False
        self.failing_reads = False
        self.closed = False

    def read(self, offset, length):
        if self.failing_reads:
            raise BackendError(c.EIO, "the read failed below")
        return super().read(offset, length)

    def write(self, offset, data, fua=False):
        if self.failing:
            raise BackendError(c.EIO, "the write failed below")
        super().write(offset, data, fua)

    def trim(self, offset, length, fua=False):
        if self.failing:
            raise BackendError(c.EIO, "the trim failed below")
        super().trim(offset, length, fua)

    def write_zeroes(self, offset, length, *, may_trim, fast, fua=False):
        if self.failing:
            raise BackendError(c.EIO, "the zeroing failed below")
        super().write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def close(self):
        self.closed = True


def cache_over(below, spec: str = "cache"):
    f = parse_filter_spec(spec, below.size)
    f.inner = below
    return f


def test_cache_fua_write_that_fails_below_leaves_nothing_behind():
    below = FlakyRam(MiB)
    f = cache_over(below)
    f.write(0, b"old!" * 1024)  # dirty, cached
    below.failing = True
    for fua_call in (
        lambda: f.write(0, b"new!" * 1024, fua=True),
        lambda: f.write(4096 + 100, b"part", fua=True),  # a partial block, not cached before
        lambda: f.trim(0, 8192, fua=True),
        lambda: f.write_zeroes(0, 8192, may_trim=False, fast=False, fua=True),
    ):
        with pytest.raises(BackendError):
            fua_call()
    assert bytes(f.read(0, 4)) == b"old!"  # the client was told the writes failed: it reads what was there
    assert bytes(f.read(4096 + 100, 4)) == bytes(4)
    assert f.dirty_bytes() == 4096  # only the earlier, successful write is dirty
    below.failing = False
    f.write(4096, b"fua!", fua=True)
    assert bytes(below.read(4096, 4)) == b"fua!" and bytes(f.read(4096, 4)) == b"fua!"


def test_cache_over_readonly_refuses_a_fua_write_and_keeps_nothing():
    f = stacked("cache")
    f.inner = parse_filter_spec("readonly", 4 * MiB)
    f.inner.inner = RamBackend(4 * MiB)
    with pytest.raises(BackendError) as info:
        f.write(0, b"x" * 4096, fua=True)
    assert info.value.errno == c.EPERM
    assert bytes(f.read(0, 4096)) == bytes(4096)
    assert f.dirty_bytes() == 0


def test_cache_partial_write_whose_read_below_fails_changes_nothing():
    below = FlakyRam(MiB)
    f = cache_over(below)
    below.failing_reads = True
    # Whole blocks in the middle, partial blocks at both ends: the tail's read fails.
    with pytest.raises(BackendError):
        f.write(4096, b"z" * (3 * 4096 + 10))
    with pytest.raises(BackendError):
        f.trim(100, 3 * 4096)
    below.failing_reads = False
    assert bytes(f.read(0, 5 * 4096)) == bytes(5 * 4096)
    assert f.dirty_bytes() == 0


def test_cache_failed_flush_keeps_dirty_data_for_a_retry():
    below = FlakyRam(MiB)
    f = cache_over(below)
    f.write(0, b"A" * 4096)
    f.write(8192, b"B" * 4096)
    f.trim(65536, 65536)
    below.failing = True
    with pytest.raises(BackendError):
        f.flush()
    assert bytes(f.read(0, 4)) == b"AAAA" and bytes(f.read(8192, 4)) == b"BBBB"  # still readable
    assert f.dirty_bytes() == 2 * 4096 + 65536
    assert bytes(below.read(0, 4)) == bytes(4)
    below.failing = False
    f.flush()  # the retry writes everything back
    assert f.dirty_bytes() == 0
    assert bytes(below.read(0, 4)) == b"AAAA" and bytes(below.read(8192, 4)) == b"BBBB"
    assert f.stats()["written_back"] == 2 * 4096 + 65536


def test_cache_writeback_that_fails_halfway_keeps_only_the_rest():
    below = FlakyRam(4 * MiB)
    f = cache_over(below)
    f.write(0, b"A" * 4096)
    f.write(2 * MiB, b"B" * 4096)  # not adjacent: a second write below
    writes = []
    real_write = below.write

    def second_write_fails(offset, data, fua=False):
        writes.append(offset)
        if len(writes) == 2:
            raise BackendError(c.EIO, "the second write failed")
        real_write(offset, data, fua)

    below.write = second_write_fails
    with pytest.raises(BackendError):
        f.flush()
    assert writes == [0, 2 * MiB]
    assert bytes(below.read(0, 4)) == b"AAAA"  # the first went down and is clean now
    assert f.dirty_bytes() == 4096  # the second is still dirty
    assert f.stats()["written_back"] == 4096
    below.write = real_write
    f.flush()
    assert bytes(below.read(2 * MiB, 4)) == b"BBBB" and f.dirty_bytes() == 0


def test_cache_max_writes_back_before_caching_and_a_failure_keeps_the_new_write_out():
    below = FlakyRam(MiB)
    f = cache_over(below, "cache:max=8K")
    f.write(0, b"A" * 4096)
    f.write(4096, b"B" * 4096)
    assert bytes(below.read(0, 4)) == bytes(4)  # 8 KiB dirty: still within max
    f.write(8192, b"C" * 4096)  # would make 12 KiB: the 8 KiB go down first
    assert bytes(below.read(0, 4)) == b"AAAA" and bytes(below.read(4096, 4)) == b"BBBB"
    assert f.dirty_bytes() == 4096 and bytes(below.read(8192, 4)) == bytes(4)
    f.write(12288, b"D" * 4096)
    below.failing = True
    with pytest.raises(BackendError):
        f.write(16384, b"E" * 4096)  # needs room, the write-back fails: an error, and E is not cached
    assert bytes(f.read(16384, 4)) == bytes(4)
    assert bytes(f.read(8192, 4)) == b"CCCC" and f.dirty_bytes() == 8192


def test_cache_close_that_cannot_write_back_says_what_was_lost_and_closes_below():
    below = FlakyRam(MiB)
    f = cache_over(below)
    f.write(0, b"A" * 4096)
    f.write(MiB - 8192, b"B" * 8192)
    below.failing = True
    with pytest.raises(DataLost) as info:
        f.close()
    assert info.value.lost == 3 * 4096
    assert "12,288 bytes (12.0 KiB) of unflushed cached writes were lost" in str(info.value)
    assert "BackendError: the write failed below" in str(info.value)
    assert below.closed
    assert f.dirty_bytes() == 0 and f.dropped == 3 * 4096


# --- the overlay behind cow and cache, against a model -----------------------------------------


@pytest.mark.parametrize("size", [4 * MiB, 4 * MiB - 1000])
def test_overlay_matches_a_model(size):
    rng = random.Random(size)
    base = RamBackend(size)
    original = bytes(rng.getrandbits(8) for _ in range(4096)) * (size // 4096) + bytes(size % 4096)
    base.write(0, original)
    model = bytearray(original)
    overlay = Overlay(size)
    for step in range(400):
        offset = rng.randrange(size)
        length = min(rng.choice([1, 100, 4096, 5000, 40000, 300000]), size - offset)
        kind = rng.random()
        if kind < 0.5:
            data = bytes([step % 251 + 1]) * length
            overlay.write(base, offset, data)
            model[offset : offset + length] = data
        elif kind < 0.7:
            overlay.zero(base, offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            assert bytes(overlay.read(base, offset, length)) == bytes(model[offset : offset + length]), step
    assert bytes(overlay.read(base, 0, size)) == bytes(model)
    assert bytes(base.read(0, size)) == original  # nothing reached the base
    overlay.writeback(base)
    assert not overlay
    assert bytes(base.read(0, size)) == bytes(model)


def test_cow_discard_and_commit():
    base = RamBackend(MiB)
    base.write(0, b"base" * 1024)
    cow = CowBackend(base)
    cow.write(0, b"new!")
    cow.trim(8192, 8192)
    assert bytes(cow.read(0, 4)) == b"new!" and bytes(base.read(0, 4)) == b"base"
    assert cow.changed_bytes() == 3 * 4096
    assert cow.discard() == 3 * 4096
    assert bytes(cow.read(0, 8)) == b"basebase"
    cow.write(4, b"XXXX")
    cow.commit()
    assert bytes(base.read(0, 8)) == b"baseXXXX"
    assert cow.changed_bytes() == 0


def test_cow_over_a_readonly_file_refuses_commit(tmp_path):
    path = tmp_path / "base.img"
    path.write_bytes(b"z" * MiB)
    path.chmod(0o444)
    cow = CowBackend.over_file(str(path))
    try:
        cow.write(0, b"a")
        if cow.base.readonly:  # root can write anything, so only check when it is read-only
            with pytest.raises(UserError, match="read-only"):
                cow.commit()
        assert path.read_bytes()[:1] == b"z"
    finally:
        cow.close()


# --- a real client sees the error ----------------------------------------------------------


def test_error_filter_gives_qemu_io_an_eio(buselab_server):
    require_tool("qemu-io")
    import subprocess

    served = buselab_server(["ram", "--size", "8M", "--filter", "error:op=read,errno=EIO"])
    write = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", served.uri], capture_output=True, text=True, timeout=30
    )
    assert write.returncode == 0, write.stderr
    read = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read 0 4k", served.uri], capture_output=True, text=True, timeout=30
    )
    assert "Input/output error" in read.stdout + read.stderr


def test_nbdsh_fua_write_refused_below_the_cache_is_not_readable(buselab_server):
    """readonly under cache: the FUA write gets EPERM and leaves nothing; a plain write stays dirty through a failed FLUSH."""
    import subprocess

    from helpers import nbdsh

    served = buselab_server(["ram", "--size", "8M", "--filter", "readonly", "--filter", "cache"])
    script = (
        "import errno\n"
        "def attempt(what, call):\n"
        "    try:\n"
        "        call()\n"
        "        print(what, 'ok')\n"
        "    except nbd.Error as e:\n"
        "        print(what, errno.errorcode.get(e.errno, e.errno))\n"
        "attempt('fua', lambda: h.pwrite(b'F' * 4096, 0, nbd.CMD_FLAG_FUA))\n"
        "print('after fua', bytes(h.pread(4, 0)))\n"
        "attempt('write', lambda: h.pwrite(b'W' * 4096, 8192))\n"
        "attempt('flush', lambda: h.flush())\n"
        "print('after flush', bytes(h.pread(4, 8192)))\n"
    )
    run = subprocess.run([*nbdsh(), "-u", served.uri, "-c", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "fua EPERM",
        "after fua b'\\x00\\x00\\x00\\x00'",  # told it failed, so it is not there
        "write ok",  # cached
        "flush EPERM",
        "after flush b'WWWW'",  # kept dirty for the next FLUSH to retry
    ]


def test_delay_ms_key_takes_a_bare_number_as_milliseconds():
    """`ms=` names its unit, so `delay:ms=5` stays 5 ms although bare durations now need a unit."""
    delay = DelayFilter.from_params([("ms", "5")])
    assert delay.spec.startswith("delay:read=5ms,")
    assert delay.delays["read"] == (0.005, 0.005)
