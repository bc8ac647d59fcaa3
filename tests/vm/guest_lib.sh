# Shell helpers for the kernel tests that run *inside* the test VM (see tests/test_kernel_vm.py).
# Sourced by guest_kernel_*.sh. Every step prints one "ok: ..." or "FAIL: ..." line, and a step
# that fails never stops the ones after it: the test on the host reads the lines. Nothing may
# hang: every wait has a deadline, and a buselab that will not stop is killed (and reported).
#
# Run by /bin/sh (dash): POSIX only. The cwd is the test's tmp_path, shared with the host.

FAILED=0
BUSELAB=${BUSELAB:-buselab}

ok() { echo "ok: $*"; }
fail() {
    echo "FAIL: $*"
    FAILED=$((FAILED + 1))
}
note() { echo "note: $*"; }

# now: seconds since boot, with hundredths (for step timings)
now() { cut -d' ' -f1 /proc/uptime; }

# running PID: the process exists and is not a zombie
running() {
    [ -r "/proc/$1/stat" ] || return 1
    ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"
}

# size_of N: /sys/block/nbdN/size (512-byte sectors)
size_of() { cat "/sys/block/nbd$1/size" 2>/dev/null || echo "?"; }
pid_of() { cat "/sys/block/nbd$1/pid" 2>/dev/null || echo "-"; }

# start NAME ARGS...: `buselab ARGS --headless` in the background, output in NAME.log.
# Waits (up to 300 s: 5-20 s in a quiet VM, over 100 on a busy host) until it prints
# "buselab: serving"; sets PID_NAME.
start() {
    name=$1
    shift
    t0=$(now)
    $BUSELAB "$@" --headless >"$name.log" 2>&1 &
    pid=$!
    eval "PID_$name=$pid"
    i=0
    while ! grep -q '^buselab: serving' "$name.log"; do
        if ! running "$pid"; then
            wait "$pid"
            fail "$name: buselab $* exited with $? before serving: $(tr '\n' '|' <"$name.log")"
            return 1
        fi
        i=$((i + 1))
        if [ $i -gt 3000 ]; then
            fail "$name: buselab $* not serving after 300 s: $(tr '\n' '|' <"$name.log")"
            return 1
        fi
        sleep 0.1
    done
    ok "$name: buselab $* is serving (started in $(echo "$(now) $t0" | awk '{printf "%.1f", $1 - $2}') s)"
}

# stop NAME SIGNAL: signal it, wait (up to 60 s, then kill -9); sets RC_NAME.
stop() {
    name=$1
    sig=$2
    eval "pid=\$PID_$name"
    kill "-$sig" "$pid"
    (
        sleep 60
        kill -9 "$pid" 2>/dev/null
    ) &
    watchdog=$!
    wait "$pid"
    rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    eval "RC_$name=$rc"
    if [ "$rc" -eq 137 ]; then
        fail "$name: did not stop within 60 s of SIG$sig (killed)"
    fi
    return 0
}

# expect_stop NAME SIGNAL N: stop it and check exit 0, nbdN size 0 and no pid file.
expect_stop() {
    stop "$1" "$2"
    eval "rc=\$RC_$1"
    i=0
    while [ "$(size_of "$3")" != 0 ] && [ $i -lt 50 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    if [ "$rc" = 0 ] && [ "$(size_of "$3")" = 0 ] && [ "$(pid_of "$3")" = - ] && grep -q '^buselab: stopped cleanly' "$1.log"; then
        ok "$1: SIG$2 -> exit 0, nbd$3 size 0, no pid"
    else
        fail "$1: SIG$2 -> exit $rc, nbd$3 size $(size_of "$3") pid $(pid_of "$3"): $(tail -3 "$1.log" | tr '\n' '|')"
    fi
}

# counters NAME: "flush N trim N" from the last stats line of NAME.log
counters() {
    # the headless line ends "| totals: requests 1,234, flush 3, trim 0, errors 0"
    grep ' | totals: ' "$1.log" | tail -1 | sed -n 's/.* | totals: .* flush \([0-9,]*\), trim \([0-9,]*\),.*/flush \1 trim \2/p' | tr -d ,
}

# expect_flush_trim NAME: the stats lines show at least one FLUSH and one TRIM (waits 10 s).
expect_flush_trim() {
    i=0
    while :; do
        set -- "$1" $(counters "$1")
        if [ "${3:-0}" -gt 0 ] 2>/dev/null && [ "${5:-0}" -gt 0 ] 2>/dev/null; then
            ok "$1: the kernel sent FLUSH and TRIM: flush=$3 trim=$5"
            return 0
        fi
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            fail "$1: no FLUSH/TRIM in the stats: $(counters "$1")"
            return 1
        fi
        sleep 0.1
    done
}

# run DESC CMD...: run a command, ok/FAIL with its output on failure
run() {
    desc=$1
    shift
    if out=$("$@" 2>&1); then
        ok "$desc"
    else
        fail "$desc: $* -> $?: $(printf '%s' "$out" | tail -5 | tr '\n' '|')"
        return 1
    fi
}

# write_files DIR SUMS: a few files of random data of various sizes, their sha256 in SUMS
write_files() {
    head -c 3000000 /dev/urandom >"$1/big.bin" &&
        head -c 65536 /dev/urandom >"$1/block.bin" &&
        mkdir -p "$1/sub" &&
        head -c 1234 /dev/urandom >"$1/sub/odd.bin" &&
        echo "hello from buselab" >"$1/sub/hello.txt" &&
        (cd "$1" && sha256sum big.bin block.bin sub/odd.bin sub/hello.txt) >"$2"
}

# verify_files DIR SUMS
verify_files() {
    sums="$(pwd)/$2"
    (cd "$1" && sha256sum -c --quiet "$sums")
}

# fs_roundtrip NAME DEVICE: mkfs.ext4, mount, write files, sync, fstrim, umount, fsck -fn
# clean, mount again and verify the checksums, umount.
fs_roundtrip() {
    name=$1
    dev=$2
    mnt=/tmp/mnt-$name
    mkdir -p "$mnt"
    run "$name: mkfs.ext4 $dev" mkfs.ext4 -q -F "$dev" || return 1
    run "$name: mount $dev" mount -t ext4 "$dev" "$mnt" || return 1
    run "$name: write files" write_files "$mnt" "$name.sums"
    run "$name: sync" sync
    run "$name: fstrim" fstrim "$mnt"
    run "$name: umount" umount "$mnt" || return 1
    run "$name: fsck.ext4 -fn clean" fsck.ext4 -fn "$dev"
    run "$name: mount again" mount -t ext4 -o ro "$dev" "$mnt" || return 1
    run "$name: checksums match after remount" verify_files "$mnt" "$name.sums"
    run "$name: umount again" umount "$mnt"
}

# expect_error DESC PATTERN ARGS...: `buselab ARGS` exits 2 with one line
# "buselab: error: ...PATTERN..." and nothing else (no traceback), within 120 s.
expect_error() {
    desc=$1
    pattern=$2
    shift 2
    out=$(timeout -s KILL 120 $BUSELAB "$@" --headless --seconds 3 2>&1)
    rc=$?
    lines=$(printf '%s\n' "$out" | wc -l)
    if [ $rc -eq 2 ] && [ "$lines" -eq 1 ] && printf '%s\n' "$out" | grep -q "^buselab: error: .*$pattern"; then
        ok "$desc: $out"
    else
        fail "$desc: exit $rc, $lines line(s): $(printf '%s' "$out" | tr '\n' '|')"
    fi
}

# expect_dd DESC ARGS...: dd with a deadline
expect_dd() {
    desc=$1
    shift
    run "$desc" timeout -s KILL 60 dd "$@" status=none
}

# watchdog SECONDS [QUIET], in the background: if the script is still running after SECONDS, or
# has printed nothing for QUIET seconds, something is stuck in a way no deadline can end (a
# process in uninterruptible sleep ignores SIGKILL). Print what waits on what -- the nbd
# devices' in-flight counts, every task in D state with its kernel stack, buselab's own threads
# (SIGUSR1 makes it dump them to its log), the kernel's last lines -- and power off, so the host
# learns of it in minutes, not at its own timeout. QUIET keeps a slow run (a busy host) apart
# from a stuck one: the script's output is the file the VM's run.sh sends it to.
watchdog() {
    started=$(now)
    size=-1
    changed=$started
    while :; do
        sleep 5
        t=$(now)
        s=$(wc -c <"$WATCHDOG_OUTPUT" 2>/dev/null || echo 0)
        [ "$s" != "$size" ] && size=$s changed=$t
        if awk "BEGIN { exit !($t - $started > $1) }"; then
            echo "hang: still running after $1 s"
            break
        fi
        if [ -n "${2:-}" ] && awk "BEGIN { exit !($t - $changed > $2) }"; then
            echo "hang: still running after $(echo "$t $started" | awk '{printf "%.0f", $1 - $2}') s," \
                "and silent for $2 s"
            break
        fi
    done
    hang_report
    echo "hang: powering off"
    # No sync: it would wait for the stuck device's dirty pages for ever. The output file is
    # on 9p, written through.
    echo o >/proc/sysrq-trigger
}
WATCHDOG_OUTPUT=${WATCHDOG_OUTPUT:-/run/buselab-vm/ctl/output}

# hang_report: what the guest can see of stuck I/O, as "hang: ..." lines (the watchdog's, and
# tests/vm/repro_multiconn_hang.sh's).
hang_report() {
    for f in /sys/block/nbd*/inflight; do
        [ "$(cat "$f")" = "       0        0" ] || echo "hang: in flight (reads writes) on $f: $(cat "$f")"
    done
    # blk-mq's view: which hardware queue holds the requests, and in what state.
    mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
    for h in /sys/kernel/debug/block/nbd*/hctx*; do
        [ -d "$h" ] || continue
        for f in state dispatch busy flags dispatched queued run active; do
            [ -r "$h/$f" ] && [ -n "$(cat "$h/$f" 2>/dev/null)" ] && echo "hang: $h/$f: $(cat "$h/$f" | tr '\n' ' ')"
        done
    done
    for p in /proc/[0-9]*; do
        if grep -q '^[0-9]* ([^)]*) D' "$p/stat" 2>/dev/null; then
            echo "hang: D state: pid ${p#/proc/} $(cat "$p/comm" 2>/dev/null), waiting in $(cat "$p/wchan" 2>/dev/null)"
            sed 's/^/hang:     /' "$p/stack" 2>/dev/null
        fi
    done
    # Whoever is in the middle of sending a request is asleep, not in D state: every kernel
    # worker that is doing something (not idling in worker_thread) and every task waiting in
    # a socket call.
    for p in /proc/[0-9]*; do
        w=$(cat "$p/wchan" 2>/dev/null)
        c=$(cat "$p/comm" 2>/dev/null)
        case "$c:$w" in
        kworker*:worker_thread | *:0 | *: ) ;;
        kworker*:* | *:*sock* | *:*unix* | *:*nbd* | *:*blk_mq*)
            echo "hang: busy: pid ${p#/proc/} $c, waiting in $w"
            sed 's/^/hang:     /' "$p/stack" 2>/dev/null
            ;;
        esac
    done
    for pid in $(pgrep -f 'python.* -m buselab|bin/buselab|guest_pause.py'); do
        kill -USR1 "$pid" 2>/dev/null
    done
    sleep 3
    for log in *.log; do
        grep -q 'most recent call first' "$log" 2>/dev/null || continue
        echo "hang: threads of the buselab writing $log:"
        grep -A4 '^Thread\|^Current thread' "$log" | grep -v '^--' | tail -60 | sed 's/^/hang:     /'
    done
    dmesg | tail -25 | sed 's/^/hang: dmesg: /'
}

finish() {
    echo "summary: $FAILED failure(s)"
    [ "$FAILED" -eq 0 ]
}
