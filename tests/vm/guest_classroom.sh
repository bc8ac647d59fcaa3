# Runs *inside* the test VM (tests/test_classroom_vm.py): the classroom sequence of issue 14 on
# /dev/nbd0 (guest_classroom.py does the work and prints the ok/FAIL lines), under the watchdog
# of guest_lib.sh, so that a stuck guest powers off with a report of what is stuck.
. "$(dirname "$0")/guest_lib.sh"
echo "kernel $(uname -r)"
watchdog "${WATCHDOG:-600}" "${WATCHDOG_QUIET:-}" &
WATCHDOG_PID=$!
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(now)
# guest_classroom.py prints "classroom: N failure(s)" last; its own failures are counted there.
timeout -s KILL "${CLASSROOM_TIMEOUT:-900}" python3 "$HERE/guest_classroom.py" 2>&1
rc=$?
[ $rc -eq 0 ] && ok "classroom: guest_classroom.py passed" || fail "classroom: guest_classroom.py exited with $rc"
echo "took $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s"
kill "$WATCHDOG_PID" 2>/dev/null
finish
