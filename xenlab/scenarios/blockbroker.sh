# Scenario "blockbroker": the project's stack in a real dom0, against real xl, xenstored,
# xen-blkback and PV guests (see bbstack.sh for how the daemons run).
. /run/xenlab/scenarios/lib.sh
. $RUN/scenarios/bbstack.sh

if bb_stack_start; then
  check bb-stack-up PASS "dbus-daemon, broker (root), policyd (blockbroker) up in ${BB_STACK_MS} ms"
else
  check bb-stack-up FAIL "$(tail -5 $RUN/broker.log $RUN/policyd.log 2>&1 | tr '\n' ' ')"
  exit 0
fi

# -- 1. libxl's hotplug path: script=blockbroker-block in the xl disk spec
boot_md5=$(make_image $IMAGE_DIR/boot.img BOOT 8)
loops_before=$(loop_count)
t0=$(now)
timeline "xl create bbs1 with script=blockbroker-block"
if guest_create bbs1 "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$IMAGE_DIR/boot.img" \
     "xenlab.wait=xvda xenlab.then=watch"; then
  create_ms=$(elapsed_ms $t0)
  got=$(guest_disk_md5 bbs1 xvda 90)
  be=$(vbd_backend bbs1 51712)
  diskseq=$(xenstore-read $be/diskseq 2>/dev/null)
  expect bb-script-guest-reads \
    "xl create ${create_ms} ms; guest md5=$got image md5=$boot_md5; diskseq=$diskseq" \
    test -n "$got" -a "$got" = "$boot_md5"
  xl destroy bbs1
  bb_wait "the loop device to go" 10 test "$(loop_count)" = "$loops_before"
  expect bb-script-destroy-frees-loop "loop devices before=$loops_before after=$(loop_count)" \
    test "$(loop_count)" = "$loops_before"
else
  check bb-script-guest-reads FAIL "xl create: $(grep -i error $RUN/xl-create-bbs1.log | tail -3 | tr '\n' ' ')"
  check bb-script-destroy-frees-loop FAIL "no guest"
fi

# -- 2. hot-plug into running guests with `blockbroker export`; one read-only image, two guests
shared_md5=$(make_image $IMAGE_DIR/shared.img SHARED 8)
guest_create bbx1 "" "xenlab.then=watch" && guest_create bbx2 "" "xenlab.then=watch"
guest_wait bbx1 '^GUEST watching' 90 >/dev/null; guest_wait bbx2 '^GUEST watching' 90 >/dev/null

export_to() {  # export_to GUEST: export shared.img read-only; sets EXPORT_ID and DISK
  out=$(bb export $IMAGE_DIR/shared.img --to $1 --ro --json 2>&1)
  echo "blockbroker export --to $1: $out"
  EXPORT_ID=$(echo "$out" | json_field export)
  DISK=$(xvd_name "$(echo "$out" | json_field devid)" 2>/dev/null)
}
t0=$(now)
timeline "blockbroker export shared.img --to bbx1"
export_to bbx1; export1=$EXPORT_ID; disk1=$DISK
timeline "export returned: $export1 as $disk1"
got=$(guest_disk_md5 bbx1 "$disk1" 60)
timeline "bbx1 read $disk1: md5=$got"
expect bb-export-guest-reads "export $export1 as $disk1 in $(elapsed_ms $t0) ms; guest md5=$got image md5=$shared_md5" \
  test -n "$got" -a "$got" = "$shared_md5"
state_is_connected() { bb list --json | grep "\"export\":\"$export1\"" | grep -q '"state":"connected"'; }
bb_wait "blkback to open the export" 15 state_is_connected
expect bb-export-state-connected "$(bb list --json | grep "\"export\":\"$export1\"" | json_field state)" \
  state_is_connected

export_to bbx2; export2=$EXPORT_ID; disk2=$DISK
got=$(guest_disk_md5 bbx2 "$disk2" 60)
expect bb-shared-second-guest-reads "export $export2 as $disk2; guest md5=$got" \
  test -n "$got" -a "$got" = "$shared_md5"
expect bb-shared-one-loop "loop devices on shared.img: $(loops_of $IMAGE_DIR/shared.img); $(losetup -a | tr '\n' ' ')" \
  test "$(loops_of $IMAGE_DIR/shared.img)" = 1

bb detach "$export1"
guest_wait bbx1 "^GUEST gone $disk1" 30 >/dev/null
be2=$(bb list --json | grep "\"export\":\"$export2\"" | json_field backend_path)
expect bb-detach-one-keeps-other \
  "bbx1 lost $disk1: $(guest_console bbx1 | grep -c "GUEST gone $disk1"); loops on shared.img=$(loops_of $IMAGE_DIR/shared.img); bbx2 backend state=$(xenstore-read $be2/state 2>&1)" \
  eval 'guest_console bbx1 | grep -q "GUEST gone $disk1" && [ "$(loops_of $IMAGE_DIR/shared.img)" = 1 ] && [ "$(xenstore-read $be2/state)" = 4 ]'

bb detach "$export2"
guest_wait bbx2 "^GUEST gone $disk2" 30 >/dev/null
bb_wait "the shared loop device to go" 15 test "$(loops_of $IMAGE_DIR/shared.img)" = 0
expect bb-detach-all-frees-loop "loops on shared.img=$(loops_of $IMAGE_DIR/shared.img); exports left: $(bb list --json | grep -c .)" \
  test "$(loops_of $IMAGE_DIR/shared.img)" = 0
xl destroy bbx1; xl destroy bbx2

# -- 3. the race the stock script loses: while a disk is being attached to a running guest,
# another process watches for a loop device bound to the image, detaches it and binds a decoy
# to the same device number (the window between the bind and blkback's open by number). With
# blockbroker the loop device is held (AUTOCLEAR, an open fd) until blkback has opened it, so
# the detach is only deferred and the rebind fails; blkback must open our file.
race_md5=$(make_image $IMAGE_DIR/race.img RACE 8)
decoy_md5=$(make_image /tmp/decoy.img DECOY 8)
racer() {
  while :; do
    for f in /sys/block/loop*/loop/backing_file; do
      case $(cat $f 2>/dev/null) in *race.img)
        dev=/dev/$(basename $(dirname $(dirname $f)))
        losetup -d $dev 2>/dev/null && losetup $dev /tmp/decoy.img 2>/dev/null &&
          echo "racer: rebound $dev to decoy.img" ;;
      esac
    done
    sleep 0.02
  done
}
guest_create racebb "" "xenlab.then=watch" && guest_create racestock "" "xenlab.then=watch"
guest_wait racebb '^GUEST watching' 90 >/dev/null; guest_wait racestock '^GUEST watching' 90 >/dev/null
racer >$RUN/racer-blockbroker.log & racer_pid=$!
out=$(bb export $IMAGE_DIR/race.img --to racebb --ro --json 2>&1)
disk=$(xvd_name "$(echo "$out" | json_field devid)" 2>/dev/null)
got=$(guest_disk_md5 racebb "$disk" 60)
kill $racer_pid; wait $racer_pid 2>/dev/null
expect bb-race-right-bytes "guest md5=$got image md5=$race_md5 decoy md5=$decoy_md5; racer rebinds: $(grep -c . $RUN/racer-blockbroker.log)" \
  test -n "$got" -a "$got" = "$race_md5"
# the same with Xen's stock script (xl block-attach), for the record: not a check, it may lose
racer >$RUN/racer-stock.log & racer_pid=$!
xl block-attach racestock "format=raw, vdev=xvdb, access=ro, target=$IMAGE_DIR/race.img" \
  >$RUN/xl-block-attach-racestock.log 2>&1
got=$(guest_disk_md5 racestock xvdb 60)
kill $racer_pid; wait $racer_pid 2>/dev/null
case $got in
  "$race_md5") verdict="the right bytes" ;;
  "$decoy_md5") verdict="the DECOY's bytes" ;;
  *) verdict="no disk (${got:-nothing})" ;;
esac
echo "XENLAB NOTE stock-race: under the same racer, Xen's block script gave the guest $verdict (racer rebinds: $(grep -c . $RUN/racer-stock.log))" |
  tee -a $RUN/results
# -- 4. the export into racebb is never detached: destroying the guest must release it (libxl
# removes /local/domain/<domid> and knows nothing of Export's vbd; policyd watches the frontend)
xl destroy racebb; xl destroy racestock
race_export_gone() {
  ! bb list --json | grep -q '"source":"[^"]*race.img"' && [ "$(loops_of $IMAGE_DIR/race.img)" = 0 ]
}
bb_wait "policyd to detach the destroyed guest's export" 15 race_export_gone
expect bb-destroy-detaches-export "exports of race.img left: $(bb list --json | grep -c race.img); loops on race.img: $(loops_of $IMAGE_DIR/race.img)" \
  race_export_gone
sleep 1; losetup -D

exit 0   # the checks above carry the verdict
