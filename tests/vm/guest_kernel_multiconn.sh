# Runs *inside* the test VM, nbd loaded with nbds_max=4, on the backports kernel (6.12; see
# tests/test_kernel_vm.py): devices with two connections, so two hardware queues, in the very
# conditions in which Debian 12's 6.1 loses requests (README, "Known problems";
# tests/vm/repro_multiconn_hang.sh): other nbd devices busy all along.
#
# * load: /dev/nbd1 by ioctl, written to, and /dev/nbd2 by netlink with 2 connections, read
#   from, in a loop from start to end; no dd may fail.
# * pause: guest_pause.py on /dev/nbd3, netlink with 2 connections, a pause longer than the
#   kernel's 30 s request timeout, in the background (PAUSE=0: none).
# * mc: ext4 on /dev/nbd0 with 2 connections, a read from each CPU (so each hardware queue),
#   FLUSH and TRIM, `buselab ctl` pause/resume, SIGINT; then ROUNDS more attaches of nbd0,
#   each read from CPU 0, 1, 0, 1, as the reproducer does.
#
# A read that does not complete in 20 s, or a device with requests in flight of which none
# completes for STALL (90) s (stall_watch), is a lost request: the dd that waits on it ignores
# SIGKILL, so no `timeout` can end it. FAIL, what the guest can see of it (hang_report), and the
# guest powers off at once. Nothing is retried.
. "$(dirname "$0")/guest_lib.sh"
echo "kernel $(uname -r)"
watchdog "${WATCHDOG:-300}" "${WATCHDOG_QUIET:-}" &
WATCHDOG_PID=$!
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(now)
ROUNDS=${ROUNDS:-2}
STALL=${STALL:-90}

# lost DESC: a request the kernel never sent. Whatever comes next would wait on it too: say
# what the guest sees and power off now rather than at the watchdog's deadline.
lost() {
    echo "FAIL: $*: a lost request"
    hang_report
    echo "hang: a lost request, powering off"
    finish
    echo o >/proc/sysrq-trigger
    sleep 60
}

# within SECONDS DESC CMD...: run CMD; if it has not finished after SECONDS, a request was lost.
within() {
    secs=$1
    desc=$2
    shift 2
    "$@" &
    wpid=$!
    j=0
    while running $wpid; do
        j=$((j + 1))
        [ $j -gt $((secs * 10)) ] && lost "$desc did not complete in $secs s"
        sleep 0.1
    done
    wait $wpid
}

# read_each_cpu NAME DEVICE ROUND: a 4 KiB direct read from CPU 0, 1, 0, 1, 20 s each.
read_each_cpu() {
    bad=0
    for cpu in 0 1 0 1; do
        within 20 "$1: a read from CPU $cpu" taskset -c $cpu \
            dd if="$2" of=/dev/null bs=4k count=1 skip=$(($3 * 4 + cpu)) iflag=direct status=none || {
            fail "$1: a read from CPU $cpu failed"
            bad=1
        }
    done
    [ $bad = 0 ] && ok "$1: reads from CPU 0, 1, 0, 1 completed"
}

# load NAME DD-ARGS...: dd in a loop until load.stop exists, counting the runs in NAME.count;
# a failure is noted in NAME.err.
load() {
    name=$1
    shift
    rounds=0
    while [ ! -e load.stop ]; do
        timeout -s KILL 60 dd "$@" status=none 2>>"$name.err" || echo "dd $* -> $?" >>"$name.err"
        rounds=$((rounds + 1))
        echo $rounds >"$name.count"
    done
}

# stall_watch, in the background: every 5 s, an nbd device with requests in flight of which
# none completed for STALL seconds lost one. The longest pause here holds reads for 40 s, plus
# the time guest_pause.py needs to start its readers and check them (seconds, under emulation).
stall_watch() {
    while :; do
        for stat in /sys/block/nbd*/stat; do
            dev=${stat#/sys/block/}
            dev=${dev%/stat}
            set -- $(cat "$stat")
            completed="$1/$5/${12:-0}/${16:-0}" # reads, writes, discards, flushes
            eval "last=\${completed_$dev:-} since=\${since_$dev:-0}"
            if [ "$9" = 0 ] || [ "$completed" != "$last" ]; then
                eval "completed_$dev=$completed since_$dev=$(now)"
            elif awk "BEGIN { exit !($(now) - $since > $STALL) }"; then
                lost "$dev: $9 request(s) in flight, none completed for $STALL s"
            fi
        done
        sleep 5
    done
}

stall_watch &
STALL_PID=$!

if [ "${PAUSE:-40}" != 0 ]; then
    timeout -s KILL 400 python3 "$HERE/guest_pause.py" --pause "${PAUSE:-40}" --device /dev/nbd3 --connections 2 \
        >pause3.log 2>&1 &
    PAUSE_PID=$!
fi

echo "== load: nbd1 (ioctl) written to, nbd2 (netlink, 2 connections) read from, all along"
rm -f load.stop
: >load1.err
: >load2.err
LOADS=""
if start load1 ram --size 64M /dev/nbd1 --ioctl; then
    load load1 if=/dev/urandom of=/dev/nbd1 bs=64k count=200 oflag=direct &
    LOADS="$LOADS $!"
fi
if start load2 ram --size 64M /dev/nbd2 --connections 2; then
    load load2 if=/dev/nbd2 of=/dev/null bs=16k count=400 iflag=direct &
    LOADS="$LOADS $!"
fi

echo "== ext4 on /dev/nbd0 via netlink, 2 connections"
mc() {
    start mc ram --size 64M /dev/nbd0 --connections 2 || return 1
    if grep -q '^buselab: attached /dev/nbd0 via netlink, 2 connections' mc.log; then
        ok "mc: attached via netlink with 2 connections"
    else
        fail "mc: not via netlink: $(head -3 mc.log | tr '\n' '|')"
    fi
    queues=$(ls /sys/block/nbd0/mq | wc -l)
    [ "$queues" = 2 ] && ok "mc: nbd0 has 2 hardware queues" || fail "mc: nbd0 has $queues hardware queues"
    read_each_cpu mc /dev/nbd0 0
    fs_roundtrip mc /dev/nbd0
    expect_flush_trim mc
    grep -q '| 2 clients |' mc.log && ok "mc: stats show 2 kernel connections" || fail "mc: stats do not show 2 clients"

    echo "== buselab ctl pause / resume, 2 connections"
    if run "ctl: pause" $BUSELAB ctl "$PID_mc" pause; then
        # Reads from both CPUs: over both connections.
        timeout -s KILL 120 taskset -c 0 dd if=/dev/nbd0 of=/dev/null bs=64k count=4 skip=100 iflag=direct status=none &
        DD0=$!
        timeout -s KILL 120 taskset -c 1 dd if=/dev/nbd0 of=/dev/null bs=64k count=4 skip=200 iflag=direct status=none &
        DD1=$!
        sleep 3
        running $DD0 && running $DD1 && ok "ctl: reads from both CPUs wait while paused" ||
            fail "ctl: the reads did not wait"
        run "ctl: resume" $BUSELAB ctl "$PID_mc" resume
        wait $DD0 && wait $DD1 && ok "ctl: the reads completed after resume" || fail "ctl: the reads failed after resume"
    fi
    expect_stop mc INT 0
}
mc

round=1
while [ $round -le "$ROUNDS" ]; do
    echo "== attach $round more: nbd0 with 2 connections, a read from CPU 0, 1, 0, 1"
    start re$round ram --size 16M /dev/nbd0 --connections 2 || break
    read_each_cpu re$round /dev/nbd0 $round
    expect_stop re$round INT 0
    round=$((round + 1))
done

echo "== load: stop, and no dd failed"
touch load.stop
for pid in $LOADS; do wait "$pid"; done
for n in 1 2; do
    [ -e load$n.count ] || continue
    if [ -s load$n.err ]; then
        fail "load$n: $(head -3 load$n.err | tr '\n' '|')"
    else
        ok "load$n: $(cat load$n.count) dd runs on nbd$n, none failed"
    fi
    expect_stop load$n TERM $n
done

if [ -n "$PAUSE_PID" ]; then
    echo "== a ${PAUSE:-40} s pause with 2 connections does not kill the device (started at the beginning)"
    wait "$PAUSE_PID" && ok "pause: guest_pause.py passed" || fail "pause: guest_pause.py failed ($?)"
    sed 's/^/pause: /' pause3.log
fi

echo "took $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s"
kill "$STALL_PID" "$WATCHDOG_PID" 2>/dev/null
finish
