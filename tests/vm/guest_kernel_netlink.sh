# Runs *inside* the test VM, nbd loaded with nbds_max=6 (tests/test_kernel_vm.py), on the
# release's kernel (Debian 12: 6.1). The netlink path with one connection per device: ext4 on
# /dev/nbd0, `buselab ctl` pause/resume, chaining (lo /dev/nbd0 /dev/nbd1), --device auto, a
# busy device, the proxy (`buselab nbd` in front of nbdkit), kill -9 recovery (by netlink and by
# the ioctls alone), and a pause longer than the kernel's 30 s request timeout (guest_pause.py on
# /dev/nbd4 by ioctl and /dev/nbd5 by netlink, one process each as buselab serves them, in the
# background while the rest runs: they mostly sleep) unless PAUSE=0. Several connections per
# device: guest_kernel_multiconn.sh, on the backports kernel (6.1 loses requests there: README,
# "Known problems").
. "$(dirname "$0")/guest_lib.sh"
echo "kernel $(uname -r)"
watchdog "${WATCHDOG:-300}" "${WATCHDOG_QUIET:-}" &
WATCHDOG_PID=$!
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(now)

if [ "${PAUSE:-40}" != 0 ]; then
    timeout -s KILL 400 python3 "$HERE/guest_pause.py" --pause "${PAUSE:-40}" --device /dev/nbd4 --ioctl \
        >pause4.log 2>&1 &
    PAUSE_PID=$!
    timeout -s KILL 400 python3 "$HERE/guest_pause.py" --pause "${PAUSE:-40}" --device /dev/nbd5 --connections 1 \
        >pause5.log 2>&1 &
    PAUSE5_PID=$!
fi

echo "== ext4 on /dev/nbd0 via netlink, 1 connection"
if start nl ram --size 64M /dev/nbd0; then
    grep -qx 'buselab: attached /dev/nbd0 via netlink' nl.log &&
        ok "nl: attached via netlink with 1 connection" || fail "nl: not via netlink: $(head -3 nl.log | tr '\n' '|')"
    queues=$(ls /sys/block/nbd0/mq | wc -l)
    [ "$queues" = 1 ] && ok "nl: nbd0 has 1 hardware queue" || fail "nl: nbd0 has $queues hardware queues"
    fs_roundtrip nl /dev/nbd0
    expect_flush_trim nl
    grep -q '| 1 client |' nl.log && ok "nl: stats show 1 kernel connection" || fail "nl: stats do not show 1 client"

    echo "== buselab ctl pause / resume on the kernel device"
    if run "ctl: pause" $BUSELAB ctl "$PID_nl" pause; then
        timeout -s KILL 120 dd if=/dev/nbd0 of=/dev/null bs=64k count=4 skip=100 iflag=direct status=none &
        DD=$!
        sleep 3
        running $DD && ok "ctl: a read waits while paused" || fail "ctl: the read did not wait"
        run "ctl: resume" $BUSELAB ctl "$PID_nl" resume
        wait $DD && ok "ctl: the read completed after resume" || fail "ctl: the read failed after resume"
    fi

    echo "== busy device (netlink)"
    expect_error "busy device (netlink)" "/dev/nbd0 is busy: process $PID_nl (buselab" ram --size 16M /dev/nbd0

    echo "== chaining: lo /dev/nbd0 /dev/nbd1 (ioctl on top of netlink: both interfaces at once)"
    if start chain lo /dev/nbd0 /dev/nbd1 --ioctl; then
        fs_roundtrip chain /dev/nbd1
        expect_flush_trim chain
        expect_stop chain INT 1
    fi

    echo "== --device auto"
    if start auto ram --size 16M --device auto; then
        grep -q '^buselab: using /dev/nbd1' auto.log && ok "auto: picked /dev/nbd1" ||
            fail "auto: $(head -2 auto.log | tr '\n' '|')"
        expect_dd "auto: write through nbd1" if=/dev/urandom of=/dev/nbd1 bs=64k count=16 oflag=direct
        expect_stop auto TERM 1
    fi

    expect_stop nl INT 0
fi

echo "== the proxy: buselab nbd in front of nbdkit, attached at /dev/nbd0 by netlink"
nbdkit -f -U /tmp/upstream.sock memory 64M >upstream.log 2>&1 &
UPSTREAM_PID=$!
UPSTREAM="nbd+unix:///?socket=/tmp/upstream.sock"
i=0
while [ ! -S /tmp/upstream.sock ] && [ $i -lt 300 ]; do
    i=$((i + 1))
    sleep 0.1
done
if start px nbd "$UPSTREAM" /dev/nbd0; then
    grep -q "^buselab: serving nbd $UPSTREAM" px.log && ok "px: serves the upstream's export" ||
        fail "px: $(head -2 px.log | tr '\n' '|')"
    fs_roundtrip px /dev/nbd0
    expect_flush_trim px
    expect_stop px INT 0
    # What the clients wrote is in the upstream, not in buselab: a new proxy finds the file system.
    if start px2 nbd "$UPSTREAM" /dev/nbd0; then
        run "px2: fsck.ext4 -fn clean: the data lives upstream" fsck.ext4 -fn /dev/nbd0
        expect_stop px2 TERM 0
    fi
fi
kill "$UPSTREAM_PID" 2>/dev/null

echo "== kill -9 (netlink): the next run frees the device itself"
if start k9 ram --size 16M /dev/nbd2; then
    expect_dd "k9: write through nbd2" if=/dev/urandom of=/dev/nbd2 bs=64k count=16 oflag=direct
    kill -9 "$PID_k9"
    wait "$PID_k9"
    note "after kill -9 (netlink): nbd2 size $(size_of 2) pid $(pid_of 2)"
    if start k9b ram --size 16M /dev/nbd2; then
        grep -q "^buselab: freed /dev/nbd2, which was left attached by process $PID_k9" k9b.log &&
            ok "k9b: said it freed nbd2" || fail "k9b: no 'freed' line: $(head -3 k9b.log | tr '\n' '|')"
        expect_dd "k9b: read through nbd2" if=/dev/nbd2 of=/dev/null bs=64k count=16 iflag=direct
        kill -9 "$PID_k9b"
        wait "$PID_k9b"
        # The same leftover, freed by an --ioctl run (no netlink at all).
        if start k9c ram --size 16M /dev/nbd2 --ioctl; then
            grep -q "^buselab: freed /dev/nbd2" k9c.log && ok "k9c: --ioctl freed a netlink leftover" ||
                fail "k9c: no 'freed' line: $(head -3 k9c.log | tr '\n' '|')"
            expect_dd "k9c: write through nbd2" if=/dev/zero of=/dev/nbd2 bs=64k count=16 oflag=direct
            expect_stop k9c TERM 2
        fi
    fi
fi

echo "== kill -9 (netlink) while mounted: the next run says it is held, and how to free it"
mkdir -p /tmp/mnt-km
if start km ram --size 16M /dev/nbd3; then
    run "km: mkfs.ext4 and mount" sh -c "mkfs.ext4 -q -F /dev/nbd3 && mount /dev/nbd3 /tmp/mnt-km"
    kill -9 "$PID_km"
    wait "$PID_km"
    note "after kill -9 (netlink, mounted): nbd3 size $(size_of 3) pid $(pid_of 3)"
    expect_error "held after kill -9" "/dev/nbd3 is still held.*mounted at /tmp/mnt-km.*umount" ram --size 16M /dev/nbd3
    run "km: umount the dead device" timeout -s KILL 60 umount /tmp/mnt-km
    if start km2 ram --size 16M /dev/nbd3 --ioctl; then
        expect_dd "km2: write through nbd3" if=/dev/zero of=/dev/nbd3 bs=64k count=16 oflag=direct
        expect_stop km2 TERM 3
    fi
fi

if [ -n "$PAUSE_PID" ]; then
    echo "== a ${PAUSE:-40} s pause does not kill the device (started at the beginning)"
    wait "$PAUSE_PID"
    rc4=$?
    wait "$PAUSE5_PID"
    rc5=$?
    if [ "$rc4" = 0 ] && [ "$rc5" = 0 ]; then
        ok "pause: guest_pause.py passed"
    else
        fail "pause: guest_pause.py failed (nbd4: $rc4, nbd5: $rc5)"
    fi
    sed 's/^/pause: /' pause4.log pause5.log
fi

echo "took $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s"
kill "$WATCHDOG_PID" 2>/dev/null
finish
