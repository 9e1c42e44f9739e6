# xenlab/scenarios/demolib.sh: the demo's story as both dom0s tell it (demo.sh on the busybox
# dom0, demo-systemd.sh on the systemd one; sourced after lib.sh, and after sdlib.sh there).
# The caller sets IMG (the image to export) and `want` (its md5), and has `bb` and `wait_until`.
demo_failed() { echo "XENLAB DEMO FAILED $*" | tee -a $RUN/results; exit 0; }
step() { timeline "$*"; }

demo_guests() {  # two PV guests with no disks, watching for disks to come and go
  guest_create demo1 "" "xenlab.then=watch" && guest_create demo2 "" "xenlab.then=watch" ||
    demo_failed "xl create of the guests failed"
  guest_wait demo1 '^GUEST watching' 120 >/dev/null && guest_wait demo2 '^GUEST watching' 120 >/dev/null ||
    demo_failed "guests did not boot"
  step "guests demo1 (domid $(domid_of demo1)) and demo2 (domid $(domid_of demo2)) running, no disks"
}

export_ro() {  # export_ro GUEST: sets EXPORT and DISK
  out=$(bb export $IMG --to $1 --ro --json 2>&1) || demo_failed "blockbroker export --to $1: $out"
  EXPORT=$(echo "$out" | json_field export); DISK=$(xvd_name "$(echo "$out" | json_field devid)")
  step "blockbroker export demo.img --to $1 -> $EXPORT, $(echo "$out" | json_field loop_device) diskseq=$(echo "$out" | json_field diskseq), guest disk $DISK"
}

demo_share() {  # IMG read-only to both guests, each reads it back; sets e1 d1 e2 d2
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
}

demo_detach_all() {  # detach e1 (the loop device stays for demo2), then e2: nothing left
  bb detach $e1 >/dev/null || demo_failed "detach $e1"
  guest_wait demo1 "^GUEST gone $d1" 60 >/dev/null || demo_failed "demo1 still has $d1"
  [ "$(loops_of $IMG)" = 1 ] || demo_failed "detaching demo1 freed the loop device demo2 uses"
  step "detached demo1's export: its disk is gone, demo2's stays, loop device kept"
  bb detach $e2 >/dev/null || demo_failed "detach $e2"
  guest_wait demo2 "^GUEST gone $d2" 60 >/dev/null || demo_failed "demo2 still has $d2"
  wait_until 30 eval '[ "$(loops_of $IMG)" = 0 ]' ||
    demo_failed "loop device still bound after both detaches: $(losetup -a)"
  left=$(bb list --json | grep -c .)
  [ "$left" = 0 ] || demo_failed "$left exports left"
  step "detached demo2's export: loop device freed, no exports left"
  echo "XENLAB DEMO OK" | tee -a $RUN/results
}
