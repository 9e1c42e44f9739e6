# Scenario "demo" (make demo): a disk image from the host, exported through blockbroker to two
# PV guests that share one loop device; policyd SIGKILLed and started again (it recovers both
# exports); then detached until nothing is left.
# The host put the image and its md5 in $RUN/images (demo.img, demo.img.md5) before the boot.
. /run/xenlab/scenarios/lib.sh
. $RUN/scenarios/bbstack.sh
IMG=$RUN/images/demo.img
demo_failed() { echo "XENLAB DEMO FAILED $*" | tee -a $RUN/results; exit 0; }
step() { timeline "$*"; }

want=$(cat $IMG.md5 2>/dev/null) || demo_failed "no host image $IMG"
step "dom0 up; host image $IMG md5=$want"
bb_stack_start || demo_failed "blockbroker's stack did not start"
step "blockbroker stack up (dbus-daemon, broker as root, policyd as blockbroker) in ${BB_STACK_MS} ms"

guest_create demo1 "" "xenlab.then=watch" && guest_create demo2 "" "xenlab.then=watch" ||
  demo_failed "xl create of the guests failed"
guest_wait demo1 '^GUEST watching' 120 >/dev/null && guest_wait demo2 '^GUEST watching' 120 >/dev/null ||
  demo_failed "guests did not boot"
step "guests demo1 (domid $(domid_of demo1)) and demo2 (domid $(domid_of demo2)) running, no disks"

export_ro() {  # export_ro GUEST: sets EXPORT and DISK
  out=$(bb export $IMG --to $1 --ro --json 2>&1) || demo_failed "blockbroker export --to $1: $out"
  EXPORT=$(echo "$out" | json_field export); DISK=$(xvd_name "$(echo "$out" | json_field devid)")
  step "blockbroker export demo.img --to $1 -> $EXPORT, $(echo "$out" | json_field loop_device) diskseq=$(echo "$out" | json_field diskseq), guest disk $DISK"
}
export_ro demo1; e1=$EXPORT; d1=$DISK
got=$(guest_disk_md5 demo1 $d1 120)
[ "$got" = "$want" ] || demo_failed "demo1 read md5=${got:-nothing}, want $want"
step "demo1 reads $d1: md5=$got (matches the host image)"

export_ro demo2; e2=$EXPORT; d2=$DISK
got=$(guest_disk_md5 demo2 $d2 120)
[ "$got" = "$want" ] || demo_failed "demo2 read md5=${got:-nothing}, want $want"
loops=$(loops_of $IMG)
[ "$loops" = 1 ] || demo_failed "$loops loop devices on the image, want 1"
step "demo2 reads $d2: md5=$got; both guests share one loop device"

# policyd SIGKILLed and started again: no systemd here, so start-up reconciliation takes the
# degraded path (re-opens each backend's device by number, checked against XenStore's diskseq)
listed() { bb list --json | sed 's/"since":[0-9]*,//' | sort; }
before=$(listed)
bb_policyd_restart || demo_failed "policyd did not come back after SIGKILL: $(tail -3 $RUN/policyd.log | tr '\n' ' ')"
recovered=$(echo " $BB_RECONCILED " | sed -n 's/.* adopted=\([0-9]*\) .*/\1/p')
echo " $BB_RECONCILED " | grep -q " failed=0 " && [ "$recovered" = 2 ] ||
  demo_failed "policyd's start-up reconciliation: ${BB_RECONCILED:-no reconciled line}"
[ "$(listed)" = "$before" ] || demo_failed "the exports listed after the restart differ from before"
step "policyd killed and restarted: $recovered exports recovered (same object paths, both still on $(echo "$before" | json_field loop_device | sort -u | tr '\n' ' ' | sed 's/ $//')) in ${BB_RESTART_MS} ms"

bb detach $e1 >/dev/null || demo_failed "detach $e1"
guest_wait demo1 "^GUEST gone $d1" 60 >/dev/null || demo_failed "demo1 still has $d1"
[ "$(loops_of $IMG)" = 1 ] || demo_failed "detaching demo1 freed the loop device demo2 uses"
step "detached demo1's export: its disk is gone, demo2's stays, loop device kept"
bb detach $e2 >/dev/null || demo_failed "detach $e2"
guest_wait demo2 "^GUEST gone $d2" 60 >/dev/null || demo_failed "demo2 still has $d2"
bb_wait "the loop device to be freed" 30 eval '[ "$(loops_of $IMG)" = 0 ]' ||
  demo_failed "loop device still bound after both detaches: $(losetup -a)"
left=$(bb list --json | grep -c .)
[ "$left" = 0 ] || demo_failed "$left exports left"
step "detached demo2's export: loop device freed, no exports left"
echo "XENLAB DEMO OK" | tee -a $RUN/results
