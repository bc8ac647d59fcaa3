# Runs *inside* the test VM: the multi-connection hang of README's "Known problems", shown with or
# without buselab on the device that hangs. Not part of the test suite (it is meant to hang).
#
#   python tests/vm/vm.py run "WHO=nbdkit sh $PWD/tests/vm/repro_multiconn_hang.sh" --shared-dir /tmp/r
#   python tests/vm/vm.py run --kernel multiconn ...     # the same on the backports kernel (6.12)
#
# Two busy buselab devices run in the background (nbd1 by ioctl, written to; nbd2 by netlink with
# 2 connections, read from). Then N times: attach nbd0 with 2 connections -- buselab (WHO=buselab)
# or nbdkit + nbd-client -C 2 (WHO=nbdkit) --, read 4 KiB from CPU 0, 1, 0, 1, detach. A read
# that takes over 20 s is a hang: the script prints blk-mq's view of nbd0, the stacks of D-state
# tasks, the server's sockets, and stops. On Debian's 6.1 kernel about every other boot hangs on
# the first read from CPU 1, either way; on 6.12 (--kernel multiconn: bookworm-backports) none did.
# tests/vm/guest_kernel_multiconn.sh runs the same load in the test suite, on 6.12.
. "$(dirname "$0")/guest_lib.sh"
N=${N:-3}
WHO=${WHO:-buselab}
hangs=0

start load1 ram --size 64M /dev/nbd1 --ioctl || exit 1
start load2 ram --size 64M /dev/nbd2 --connections 2 || exit 1
(while :; do dd if=/dev/urandom of=/dev/nbd1 bs=64k count=200 oflag=direct status=none || sleep 1; done) &
(while :; do dd if=/dev/nbd2 of=/dev/null bs=16k count=400 iflag=direct status=none || sleep 1; done) &

attach() {
    if [ "$WHO" = buselab ]; then
        start nbd0 ram --size 16M /dev/nbd0 --connections 2 || exit 1
        SERVER=$PID_nbd0
    else
        rm -f /tmp/nbdkit.sock
        nbdkit -f --unix /tmp/nbdkit.sock memory 16M &
        SERVER=$!
        while [ ! -S /tmp/nbdkit.sock ]; do sleep 0.1; done
        nbd-client -unix /tmp/nbdkit.sock /dev/nbd0 -b 4096 -C 2 >nbd0.log 2>&1 || { cat nbd0.log; exit 1; }
    fi
}

detach() {
    if [ "$WHO" = buselab ]; then
        stop nbd0 INT
    else
        nbd-client -d /dev/nbd0 >/dev/null 2>&1
        kill $SERVER
        wait $SERVER
    fi
}

# Not $i: guest_lib.sh's start counts in it.
for round in $(seq 1 "$N"); do
    attach
    [ $round = 1 ] && echo "nbd0 served by $WHO with $(ls /sys/block/nbd0/mq | wc -l) hardware queues"
    for cpu in 0 1 0 1; do
        if ! timeout -s KILL 20 taskset -c $cpu dd if=/dev/nbd0 of=/dev/null bs=4k count=1 skip=$((round * 4 + cpu)) \
            iflag=direct status=none; then
            hangs=$((hangs + 1))
            echo "hang: attach $round, the read from CPU $cpu did not complete in 20 s"
            hang_report
            echo "hang: server $SERVER's sockets (Recv-Q: what the kernel sent that the server has not read):"
            ss -xp | grep "pid=$SERVER," | sed 's/^/hang:     /'
            break 2
        fi
    done
    detach
done
echo "RESULT kernel=$(uname -r) who=$WHO attaches=$round hangs=$hangs"
