# Runs *inside* the test VM, booted without the nbd module (tests/test_kernel_vm.py).
# BUSE's ioctl path (--ioctl): no module, buselab loading it, ext4 on /dev/nbd0, FLUSH and TRIM,
# clear errors, kill -9 recovery, the file backend across a restart.
. "$(dirname "$0")/guest_lib.sh"
watchdog "${WATCHDOG:-300}" "${WATCHDOG_QUIET:-}" &
WATCHDOG_PID=$!
T0=$(now)

echo "== no nbd module, and modprobe cannot load it"
SAVED_PATH=$PATH
PATH=$(echo "$PATH" | sed 's#/run/buselab-vm/bin:##')
expect_error "no module" "the nbd kernel module is not loaded.*modprobe nbd" ram --size 16M /dev/nbd0 --ioctl
PATH=$SAVED_PATH

echo "== ext4 on /dev/nbd0 (ioctl); buselab loads the module itself"
if start ram ram --size 64M /dev/nbd0 --ioctl; then
    [ -d /sys/module/nbd ] && ok "buselab loaded the nbd module" || fail "nbd module not loaded"
    grep -q 'ram .*/dev/nbd0' ram.log && ok "ram: headless says where it serves"
    fs_roundtrip ram /dev/nbd0
    expect_flush_trim ram

    echo "== clear errors"
    note "PID_ram=$PID_ram; $(ps -o pid,args | grep '[b]uselab ram')"
    expect_error "busy device" "/dev/nbd0 is busy: process $PID_ram (buselab" ram --size 64M /dev/nbd0 --ioctl
    expect_error "no such device" "/dev/nbd20 does not exist" ram --size 16M /dev/nbd20 --ioctl
    expect_error "not an nbd device (/dev/null)" "/dev/null is not an nbd device" ram --size 16M /dev/null --ioctl
    expect_error "not an nbd device (/dev/loop0)" "/dev/loop0 is not an nbd device" ram --size 16M /dev/loop0
    expect_error "size not a multiple of 512" "not a multiple of 512" ram --size 1000 /dev/nbd1 --ioctl

    expect_stop ram INT 0
fi

echo "== kill -9 (ioctl), then the next run"
if start k9 ram --size 16M /dev/nbd1 --ioctl; then
    expect_dd "k9: write through nbd1" if=/dev/urandom of=/dev/nbd1 bs=64k count=16 oflag=direct
    kill -9 "$PID_k9"
    wait "$PID_k9"
    note "after kill -9 (ioctl): nbd1 size $(size_of 1) pid $(pid_of 1)"
    if start k9b ram --size 16M /dev/nbd1 --ioctl; then
        expect_dd "k9b: read through nbd1" if=/dev/nbd1 of=/dev/null bs=64k count=16 iflag=direct
        expect_stop k9b TERM 1
    fi
fi

echo "== kill -9 (ioctl) while mounted: the next run says it is held, and how to free it"
mkdir -p /tmp/mnt-km
if start km ram --size 16M /dev/nbd2 --ioctl; then
    run "km: mkfs.ext4 and mount" sh -c "mkfs.ext4 -q -F /dev/nbd2 && mount /dev/nbd2 /tmp/mnt-km"
    kill -9 "$PID_km"
    wait "$PID_km"
    note "after kill -9 (ioctl, mounted): nbd2 size $(size_of 2) pid $(pid_of 2)"
    expect_error "held after kill -9" "/dev/nbd2 is still held.*mounted at /tmp/mnt-km.*umount" ram --size 16M /dev/nbd2 --ioctl
    run "km: umount the dead device" timeout -s KILL 60 umount /tmp/mnt-km
    if start km2 ram --size 16M /dev/nbd2 --ioctl; then
        expect_dd "km2: write through nbd2" if=/dev/zero of=/dev/nbd2 bs=64k count=16 oflag=direct
        expect_stop km2 TERM 2
    fi
fi

echo "== the file backend across a restart (ioctl)"
if start file1 file /tmp/disk.img /dev/nbd3 --size 64M --ioctl; then
    mkdir -p /tmp/mnt-file
    run "file1: mkfs.ext4" mkfs.ext4 -q -F /dev/nbd3
    run "file1: mount" mount /dev/nbd3 /tmp/mnt-file
    run "file1: write files" write_files /tmp/mnt-file file.sums
    run "file1: umount" umount /tmp/mnt-file
    expect_stop file1 TERM 3
    if start file2 file /tmp/disk.img /dev/nbd3 --ioctl; then
        run "file2: fsck.ext4 -fn clean after restart" fsck.ext4 -fn /dev/nbd3
        run "file2: mount" mount -o ro /dev/nbd3 /tmp/mnt-file
        run "file2: files still there after restart" verify_files /tmp/mnt-file file.sums
        run "file2: umount" umount /tmp/mnt-file
        expect_stop file2 INT 3
    fi
fi

echo "took $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s"
kill "$WATCHDOG_PID" 2>/dev/null
finish
