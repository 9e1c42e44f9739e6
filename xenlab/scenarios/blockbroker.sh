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
  bb_wait "the loop device to go" 10 eval '[ "$(loop_count)" = "$loops_before" ]'
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
bb_wait "the shared loop device to go" 15 eval '[ "$(loops_of $IMAGE_DIR/shared.img)" = 0 ]'
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

# -- 5. policyd SIGKILLed and started again while guests use its exports. No systemd in this
# dom0, so no fd store: the new policyd takes the degraded path of start-up reconciliation
# (src/policyd/exports/reconcile.py), re-opening each managed backend's device by number through
# the broker, checked against the diskseq XenStore names, and holding it again. Four exports:
# rsa's xvda through libxl (script=blockbroker-block), rs-shared.img read-only to rsa and rsb
# (one loop device), rs-rw.img read-write to rsb. Both guests re-read their disks every 3 s with
# the page cache dropped (xenlab.reread), so a read after the restart comes from blkback; the
# images are small (2 MiB) so that this costs little. Each CLI call is a Python start from 9p
# under TCG (seconds): one `blockbroker list` serves a check's condition and its detail.
rs_loops_before=$(loop_count)
rs_boot_md5=$(make_image $IMAGE_DIR/rs-boot.img RSBOOT 2)
rs_shared_md5=$(make_image $IMAGE_DIR/rs-shared.img RSSHARED 2)
rs_rw_md5=$(make_image $IMAGE_DIR/rs-rw.img RSRW 2)
rs_loops() {  # loop devices bound to any of the three images
  echo $(($(loops_of $IMAGE_DIR/rs-boot.img) + $(loops_of $IMAGE_DIR/rs-shared.img) + $(loops_of $IMAGE_DIR/rs-rw.img)))
}
rs_export() {  # rs_export IMAGE GUEST MODE_FLAG: sets RS_ID (object path), RS_DISK, RS_LOOP
  out=$(bb export $IMAGE_DIR/$1.img --to $2 $3 --json 2>&1)
  echo "blockbroker export $1 --to $2 $3: $out"
  RS_ID=$(echo "$out" | json_field export); RS_LOOP=$(echo "$out" | json_field loop_device)
  RS_DISK=$(xvd_name "$(echo "$out" | json_field devid)" 2>/dev/null)
}
rs_list() { bb list --json | sort; }
# a guest's reports of one disk: KIND is disk (it appeared) or reread
rs_count() { guest_console $1 | grep -c "^GUEST $2 $3 "; }
rs_nth_md5() {  # rs_nth_md5 GUEST KIND DEV N: the md5 of report N+1 of that kind (waits 60 s)
  deadline=$(awk -v t="$(now)" 'BEGIN {print t + 60}')
  while :; do
    line=$(guest_console $1 | grep "^GUEST $2 $3 " | sed -n "$(($4 + 1))p")
    [ -n "$line" ] && { echo "$line" | sed -n 's/.* md5=\([0-9a-f]*\).*/\1/p'; return 0; }
    awk -v t="$(now)" -v d="$deadline" 'BEGIN {exit !(t > d)}' && return 1
    sleep 0.5
  done
}
rs_all_connected() { [ "$(bb list --json | grep -c '"state":"connected"')" = 4 ]; }

timeline "restart: xl create rsa (xvda script=blockbroker-block) and rsb"
guest_create rsa "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$IMAGE_DIR/rs-boot.img" \
  "xenlab.wait=xvda xenlab.then=watch xenlab.reread=3" &&
  guest_create rsb "" "xenlab.then=watch xenlab.reread=3"
guest_wait rsa '^GUEST watching' 90 >/dev/null; guest_wait rsb '^GUEST watching' 90 >/dev/null
rs_export rs-shared rsa --ro; rs_sh_a=$RS_ID; rs_sh_a_disk=$RS_DISK
rs_export rs-shared rsb --ro; rs_sh_b=$RS_ID; rs_sh_b_disk=$RS_DISK; rs_sh_loop=$RS_LOOP
rs_export rs-rw rsb --rw; rs_rw=$RS_ID; rs_rw_disk=$RS_DISK
bb_wait "the four exports to be connected" 60 rs_all_connected
rs_before=$(rs_list)
echo "$rs_before" >$RUN/restart-list-before.json
rs_max_before=$(echo "$rs_before" | json_field export | sed 's,.*/,,' | sort -n | tail -1)
# what each guest read before the restart (its first read of each disk), for the record
rs_pre="rsa:xvda=$(guest_disk_md5 rsa xvda 60) rsa:$rs_sh_a_disk=$(guest_disk_md5 rsa "$rs_sh_a_disk" 60)"
rs_pre="$rs_pre rsb:$rs_sh_b_disk=$(guest_disk_md5 rsb "$rs_sh_b_disk" 60) rsb:$rs_rw_disk=$(guest_disk_md5 rsb "$rs_rw_disk" 60)"
echo "XENLAB NOTE restart-before: $(echo "$rs_before" | grep -c .) exports, connected: $(echo "$rs_before" | grep -c '"state":"connected"'); first reads $rs_pre" |
  tee -a $RUN/results

timeline "restart: SIGKILL policyd with 4 exports, start it again"
if bb_policyd_restart; then
  rs_up=0
else
  rs_up=1
fi
timeline "restart: policyd back in ${BB_RESTART_MS:-?} ms; reconciled $BB_RECONCILED"
expect bb-restart-up "policyd SIGKILLed and back (name owned) in ${BB_RESTART_MS:-?} ms; reconciled: ${BB_RECONCILED:-no line}" \
  eval '[ $rs_up = 0 ] && echo " $BB_RECONCILED " | grep -q " adopted=4 " && echo " $BB_RECONCILED " | grep -q " failed=0 "'
rs_after=$(rs_list)
echo "$rs_after" >$RUN/restart-list-after.json
nosince() { sed 's/"since":[0-9]*,//'; }
rs_since="since kept"
[ "$rs_before" = "$rs_after" ] || rs_since="since differs"
expect bb-restart-listed "before=$(echo "$rs_before" | grep -c .) after=$(echo "$rs_after" | grep -c .) exports; same paths, devices, diskseqs, backends, states: $([ "$(echo "$rs_before" | nosince)" = "$(echo "$rs_after" | nosince)" ] && echo yes || echo "NO (restart-list-{before,after}.json)"); $rs_since" \
  eval '[ "$(echo "$rs_before" | grep -c .)" = 4 ] && [ "$(echo "$rs_before" | nosince)" = "$(echo "$rs_after" | nosince)" ]'

# a re-read that started after policyd was back: skip the one that may be under way
rs_reads=""; rs_reads_ok=0
for spec in "rsa xvda $rs_boot_md5" "rsa $rs_sh_a_disk $rs_shared_md5" \
            "rsb $rs_sh_b_disk $rs_shared_md5" "rsb $rs_rw_disk $rs_rw_md5"; do
  set -- $spec
  got=$(rs_nth_md5 $1 reread $2 $(($(rs_count $1 reread $2) + 1)))
  [ -n "$got" ] && [ "$got" = "$3" ] || rs_reads_ok=1
  rs_reads="$rs_reads $1:$2=$([ "$got" = "$3" ] && echo ok || echo "BAD(${got:-none})")"
done
expect bb-restart-guest-reads "re-reads after the restart (page cache dropped):$rs_reads" test $rs_reads_ok = 0

# detach through the CLI: one of the two shared exports (the loop device stays for the other),
# and the read-write one (its loop device goes)
timeline "restart: blockbroker detach of two adopted exports"
bb detach "$rs_sh_a"; rs_d1=$?
guest_wait rsa "^GUEST gone $rs_sh_a_disk" 30 >/dev/null
bb detach "$rs_rw"; rs_d2=$?
guest_wait rsb "^GUEST gone $rs_rw_disk" 30 >/dev/null
bb_wait "rs-rw.img's loop device to go" 15 eval '[ "$(loops_of $IMAGE_DIR/rs-rw.img)" = 0 ]'
rs_be_b=$(echo "$rs_after" | grep "\"export\":\"$rs_sh_b\"" | json_field backend_path)
expect bb-restart-detach-cli \
  "detach rc=$rs_d1,$rs_d2; rsa lost $rs_sh_a_disk: $(guest_console rsa | grep -c "^GUEST gone $rs_sh_a_disk"); rsb lost $rs_rw_disk: $(guest_console rsb | grep -c "^GUEST gone $rs_rw_disk"); loops on rs-shared=$(loops_of $IMAGE_DIR/rs-shared.img) rs-rw=$(loops_of $IMAGE_DIR/rs-rw.img); rsb's shared backend state=$(xenstore-read $rs_be_b/state 2>&1)" \
  eval '[ $rs_d1 = 0 ] && [ $rs_d2 = 0 ] && guest_console rsa | grep -q "^GUEST gone $rs_sh_a_disk" && guest_console rsb | grep -q "^GUEST gone $rs_rw_disk" && [ "$(loops_of $IMAGE_DIR/rs-shared.img)" = 1 ] && [ "$(loops_of $IMAGE_DIR/rs-rw.img)" = 0 ] && [ "$(xenstore-read $rs_be_b/state)" = 4 ]'

# the adopted loop device is shared again (no second one), under a new number
rs_seen=$(rs_count rsa disk "$rs_sh_a_disk")   # the new disk may get the detached one's name
rs_export rs-shared rsa --ro; rs_sh_a2=$RS_ID; rs_sh_a2_disk=$RS_DISK; rs_sh_a2_loop=$RS_LOOP
[ "$rs_sh_a2_disk" = "$rs_sh_a_disk" ] || rs_seen=0
got=$(rs_nth_md5 rsa disk "$rs_sh_a2_disk" $rs_seen)
rs_new_no=${rs_sh_a2##*/}
expect bb-restart-shared-one-loop \
  "new export $rs_sh_a2 (numbers before the restart up to $rs_max_before) on $rs_sh_a2_loop, rsb's on $rs_sh_loop; loops on rs-shared=$(loops_of $IMAGE_DIR/rs-shared.img); rsa read md5=$got" \
  eval '[ -n "$rs_sh_a2_loop" ] && [ "$rs_sh_a2_loop" = "$rs_sh_loop" ] && [ "$(loops_of $IMAGE_DIR/rs-shared.img)" = 1 ] && [ "$got" = "$rs_shared_md5" ] && [ "${rs_new_no:-0}" -gt "${rs_max_before:-0}" ] 2>/dev/null'
# ... and read-write exclusion holds for it: it is shared read-only
out=$(bb export $IMAGE_DIR/rs-shared.img --to rsa --rw --json 2>&1); rs_rc=$?
rs_n=$(bb list --json | grep -c .)
expect bb-restart-rw-refused "read-write export of the shared image: rc=$rs_rc $(echo "$out" | tail -1); exports=$rs_n loops on rs-shared=$(loops_of $IMAGE_DIR/rs-shared.img)" \
  eval '[ $rs_rc != 0 ] && [ "$rs_n" = 3 ] && [ "$(loops_of $IMAGE_DIR/rs-shared.img)" = 1 ]'

# detach through libxl: xl block-detach of the disk libxl attached with blockbroker-block
timeline "restart: xl block-detach rsa xvda (adopted libxl export)"
xl block-detach rsa xvda >$RUN/xl-block-detach-rsa.log 2>&1; rs_xd=$?
guest_wait rsa "^GUEST gone xvda" 30 >/dev/null
# rs_listed: one `blockbroker list --json` into RS_LIST (the waits below poll with it)
rs_listed() { RS_LIST=$(bb list --json); }
rs_boot_gone() { rs_listed; ! echo "$RS_LIST" | grep -q rs-boot.img && [ "$(loops_of $IMAGE_DIR/rs-boot.img)" = 0 ]; }
bb_wait "rs-boot.img's export and loop device to go" 30 rs_boot_gone; rs_ok=$?
expect bb-restart-detach-libxl "xl block-detach rc=$rs_xd; rsa lost xvda: $(guest_console rsa | grep -c '^GUEST gone xvda'); exports of rs-boot.img: $(echo "$RS_LIST" | grep -c rs-boot.img); loops on it: $(loops_of $IMAGE_DIR/rs-boot.img)" \
  eval '[ $rs_xd = 0 ] && guest_console rsa | grep -q "^GUEST gone xvda" && [ $rs_ok = 0 ]'

# xl destroy: policyd's frontend watch, re-established at start-up, detaches the adopted export
rs_b_id=$(domid_of rsb)
timeline "restart: xl destroy rsb (adopted export, frontend watch)"
xl destroy rsb
rs_b_gone() { rs_listed; ! echo "$RS_LIST" | grep -q "\"frontend_domid\":$rs_b_id[,}]"; }
bb_wait "policyd to detach rsb's export" 30 rs_b_gone; rs_ok=$?
expect bb-restart-destroy-detaches "exports into rsb left: $(echo "$RS_LIST" | grep -c "\"frontend_domid\":$rs_b_id[,}]"); loops on rs-shared=$(loops_of $IMAGE_DIR/rs-shared.img) (rsa's export keeps it)" \
  eval '[ $rs_ok = 0 ] && [ "$(loops_of $IMAGE_DIR/rs-shared.img)" = 1 ]'

rs_a_id=$(domid_of rsa)
xl destroy rsa
# vbd backends left for the two (destroyed) guests: device dirs under backend/vbd/<domid>
rs_vbds_left() {
  for d in $rs_a_id $rs_b_id; do
    for v in $(xenstore-list /local/domain/0/backend/vbd/$d 2>/dev/null); do echo "$d/$v"; done
  done
}
rs_nothing_left() {
  rs_listed; [ "$(rs_loops)" = 0 ] && [ -z "$RS_LIST" ] && [ -z "$(rs_vbds_left)" ]
}
bb_wait "nothing left of the restart's exports" 30 rs_nothing_left; rs_ok=$?
expect bb-restart-no-loop "loop devices on the images: $(rs_loops) (all: $(loop_count), before: $rs_loops_before); exports left: $(echo "$RS_LIST" | grep -c .); vbd backends of rsa/rsb left: $(rs_vbds_left | tr '\n' ' ')" \
  eval '[ $rs_ok = 0 ] && [ "$(loop_count)" = "$rs_loops_before" ]'
timeline "restart: done"

# the XenStore left under dom0's backend/vbd once every guest is gone (an observation)
echo "XENLAB NOTE vbd-left: $(for d in $(xenstore-list /local/domain/0/backend/vbd 2>/dev/null); do echo "$d:[$(xenstore-list /local/domain/0/backend/vbd/$d 2>/dev/null | tr '\n' ' ')]"; done | tr '\n' ' ')" |
  tee -a $RUN/results

exit 0   # the checks above carry the verdict
