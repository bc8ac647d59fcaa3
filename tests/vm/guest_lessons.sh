# Runs *inside* the test VM (tests/test_lessons_vm.py), nbd loaded: every built-in lesson with
# --auto --headless on /dev/nbd0, one after the other, as a projector demo would run them. Each
# prints its steps and what each checkpoint found; a checkpoint that never fires ends the lesson
# with the step's name (exit 1), which becomes a FAIL line here.
. "$(dirname "$0")/guest_lib.sh"
echo "kernel $(uname -r)"
watchdog "${WATCHDOG:-300}" "${WATCHDOG_QUIET:-}" &
WATCHDOG_PID=$!
T0=$(now)
mkdir -p /tmp/lesson-mnt

for lesson in ${LESSONS:-mkfs journal powercut trim readahead queue-depth random-sequential failing-disk}; do
    echo "== lesson $lesson"
    t0=$(now)
    timeout -s KILL 600 $BUSELAB lesson "$lesson" /dev/nbd0 --auto --headless --hold 0 --mnt /tmp/lesson-mnt \
        >"lesson-$lesson.log" 2>&1
    rc=$?
    sed 's/^/    /' "lesson-$lesson.log"
    took=$(echo "$(now) $t0" | awk '{printf "%.1f", $1 - $2}')
    if [ $rc = 0 ]; then
        ok "lesson $lesson: $(tail -n 1 "lesson-$lesson.log") ($took s)"
    else
        fail "lesson $lesson: exit $rc: $(grep -v '^ ' "lesson-$lesson.log" | tail -n 1) ($took s)"
    fi
    umount /tmp/lesson-mnt 2>/dev/null
    [ "$(size_of 0)" = 0 ] || fail "lesson $lesson: /dev/nbd0 still attached ($(size_of 0) sectors)"
done

echo "took $(echo "$(now) $T0" | awk '{printf "%.1f", $1 - $2}') s"
kill "$WATCHDOG_PID" 2>/dev/null
finish
