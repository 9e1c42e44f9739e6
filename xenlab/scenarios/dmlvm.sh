# Scenario "dmlvm": device-mapper identity with real LVM thin volumes in dom0, as Qubes stores
# VM volumes (phy:/dev/qubes_dom0/vm-work-private). The lab dom0's kernel loads dm-mod and
# dm-thin-pool (build.sh); lvm2 and thin-provisioning-tools are the host's Debian packages, run
# in the chroot of the host's root (in_host). No udev runs here: lvm creates the /dev/mapper
# nodes and /dev/VG/LV links itself (activation udev_sync=0 udev_rules=0
# verify_udev_operations=1), and nothing is archived into the read-only host /etc (backup=0).
#
# A thin pool on a loop-backed PV in dom0's tmpfs, VG and LV names with '-' (LVM doubles them in
# dm names: bb-vg/vm-work-private is bb--vg-vm--work--private). Checked: the volume exported
# through script=blockbroker-block (xl create phy:/dev/VG/LV) and through Export --dm-uuid, the
# guest reads the right bytes, the export shows the dm name and uuid; a volume renamed (another
# one renamed into its name), or removed and recreated under its name, between the request (the
# uuid the caller read) and the open, is refused with Error.DeviceChanged; nothing leaks: no
# export, no vbd node, no dm device left open, no loop device but the PV's.
. /run/xenlab/scenarios/lib.sh
. $RUN/scenarios/bbstack.sh

VG=bb-vg
LVM_CONFIG='global { use_lvmpolld = 0 locking_dir = "/run/lock/lvm" }
activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 }
backup { backup = 0 archive = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }'

lvm_() {  # lvm_ COMMAND ARGS...: the host's lvm, chrooted, with the config above
  cmd=$1; shift
  in_host env LVM_SUPPRESS_FD_WARNINGS=1 lvm "$cmd" --config "$LVM_CONFIG" "$@"
}
dm_open() {  # dm_open NAME: the dm device's open count ("" if there is no such device)
  in_host dmsetup info -c --noheadings -o open "$1" 2>/dev/null | tr -d ' '
}
dm_minor() { in_host dmsetup info -c --noheadings -o minor "$1" 2>/dev/null | tr -d ' '; }
lv_uuid() {  # lv_uuid LV: LVM's dm uuid of $VG/LV, from lvs (the caller's view, not dm's)
  lvm_ lvs --noheadings -o vg_uuid,lv_uuid "$VG/$1" | awk '{gsub("-", ""); print "LVM-" $1 $2}'
}
vbd_nodes_of() { xenstore-list "/local/domain/0/backend/vbd/$1" 2>/dev/null | grep -c .; }
exports_listed() { bb list --json | grep -c '"export"'; }

t_scenario=$(now)
mkdir -p /run/lock/lvm $IMAGE_DIR
dm_major=$(awk '$2 == "device-mapper" {print $1}' /proc/devices)
truncate -s 96M $IMAGE_DIR/pv.img
pv=$(/sbin/losetup -f --show $IMAGE_DIR/pv.img)  # util-linux: busybox losetup has no --show
if [ -z "$dm_major" ] || [ -z "$pv" ] ||
   ! lvm_ vgcreate $VG $pv >$RUN/lvm.log 2>&1 ||
   ! lvm_ lvcreate --type thin-pool -L 48M -n pool $VG >>$RUN/lvm.log 2>&1 ||
   ! lvm_ lvcreate -V 8M -T $VG/pool -n vm-work-private >>$RUN/lvm.log 2>&1 ||
   ! lvm_ lvcreate -V 8M -T $VG/pool -n vm-other >>$RUN/lvm.log 2>&1; then
  check dm-lvm-thin-volumes FAIL "dm major=$dm_major pv=$pv: $(tail -5 $RUN/lvm.log | tr '\n' ' ')"
  exit 0
fi
LV=/dev/$VG/vm-work-private
DM=bb--vg-vm--work--private
lv_md5=$(make_image $IMAGE_DIR/lv.img LVM-WORK 8)
other_md5=$(make_image $IMAGE_DIR/other.img LVM-OTHER 8)
dd if=$IMAGE_DIR/lv.img of=$LV bs=1M conv=fsync 2>/dev/null
dd if=$IMAGE_DIR/other.img of=/dev/$VG/vm-other bs=1M conv=fsync 2>/dev/null
rm -f $IMAGE_DIR/lv.img $IMAGE_DIR/other.img
work_uuid=$(lv_uuid vm-work-private)
expect dm-lvm-thin-volumes \
  "dm major $dm_major; $LV -> $(readlink $LV); dm $DM uuid $(in_host dmsetup info -c --noheadings -o uuid $DM); lvs says $work_uuid; in $(elapsed_ms $t_scenario) ms" \
  test -b /dev/mapper/$DM -a "$(in_host dmsetup info -c --noheadings -o uuid $DM)" = "$work_uuid"

BB_BLOCK_MAJORS="7, $dm_major"
if bb_stack_start; then
  check dm-stack-up PASS "broker block_majors [$BB_BLOCK_MAJORS]; stack up in ${BB_STACK_MS} ms"
else
  check dm-stack-up FAIL "$(tail -5 $RUN/broker.log $RUN/policyd.log 2>&1 | tr '\n' ' ')"
  exit 0
fi
loops_before=$(loop_count)

# -- 1. libxl's hotplug path: phy:/dev/VG/LV with script=blockbroker-block
t0=$(now)
if guest_create dms1 "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$LV" \
     "xenlab.wait=xvda xenlab.then=watch"; then
  got=$(guest_disk_md5 dms1 xvda 90)
  listed=$(bb list --json | grep "\"source\":\"$LV\"")
  expect dm-script-guest-reads \
    "xl create + read $(elapsed_ms $t0) ms; guest md5=$got volume md5=$lv_md5; export: dm_name=$(echo "$listed" | json_field dm_name) dm_uuid=$(echo "$listed" | json_field dm_uuid)" \
    eval 'test -n "$got" -a "$got" = "$lv_md5" &&
      [ "$(echo "$listed" | json_field dm_name)" = $DM ] &&
      [ "$(echo "$listed" | json_field dm_uuid)" = "$work_uuid" ]'
else
  check dm-script-guest-reads FAIL "xl create: $(grep -i error $RUN/xl-create-dms1.log | tail -3 | tr '\n' ' ')"
fi
dom=$(domid_of dms1)

# -- 2. Export --dm-uuid of the other volume into the running guest, as xvdb
other_uuid=$(lv_uuid vm-other)
t0=$(now)
out=$(bb export /dev/$VG/vm-other --to dms1 --ro --dm-uuid "$other_uuid" --json 2>&1)
export1=$(echo "$out" | json_field export)
got=$(guest_disk_md5 dms1 xvdb 60)
expect dm-export-guest-reads \
  "export $export1 in $(elapsed_ms $t0) ms; guest md5=$got volume md5=$other_md5; dm_name=$(echo "$out" | json_field dm_name) dm_uuid=$(echo "$out" | json_field dm_uuid)" \
  eval 'test -n "$got" -a "$got" = "$other_md5" &&
    [ "$(echo "$out" | json_field dm_name)" = bb--vg-vm--other ] &&
    [ "$(echo "$out" | json_field dm_uuid)" = "$other_uuid" ]'
bb detach "$export1" >/dev/null 2>&1
guest_wait dms1 '^GUEST gone xvdb' 30 >/dev/null

# refused: the error name, nothing listed beyond what was, no vbd node beyond what was
refused() {  # refused CHECK DETAIL UUID: Export of $LV with --dm-uuid UUID must be DeviceChanged
  before_exports=$(exports_listed); before_nodes=$(vbd_nodes_of $dom)
  err=$(bb export $LV --to dms1 --ro --dm-uuid "$3" --json 2>&1); rc=$?
  expect "$1" "$2; exit $rc: $(echo "$err" | tail -1 | cut -c1-220); exports $before_exports -> $(exports_listed), vbd nodes $before_nodes -> $(vbd_nodes_of $dom)" \
    eval '[ $rc = 1 ] && echo "$err" | grep -q org.qubes.BlockBroker1.Error.DeviceChanged &&
      [ "$(exports_listed)" = "$before_exports" ] && [ "$(vbd_nodes_of $dom)" = "$before_nodes" ]'
}

# -- 3. renamed between request and open: the caller read vm-work-private's uuid, then the
# volume was renamed away and another renamed into its name
lvm_ lvrename $VG vm-work-private vm-work-old >>$RUN/lvm.log 2>&1
lvm_ lvrename $VG vm-other vm-work-private >>$RUN/lvm.log 2>&1
refused dm-renamed-refused "$LV is now $(in_host dmsetup info -c --noheadings -o uuid $DM)" "$work_uuid"

# -- 4. removed and recreated under the same name between request and open
now_uuid=$(lv_uuid vm-work-private)
old_minor=$(dm_minor $DM)
lvm_ lvremove -f $VG/vm-work-private >>$RUN/lvm.log 2>&1
lvm_ lvcreate -V 8M -T $VG/pool -n vm-work-private >>$RUN/lvm.log 2>&1
refused dm-recreated-refused \
  "recreated: dm minor $old_minor -> $(dm_minor $DM), uuid $now_uuid -> $(lv_uuid vm-work-private)" \
  "$now_uuid"

# -- 5. nothing leaks: the guest gone, no export, no vbd node, no dm device open, no loop
xl destroy dms1 2>/dev/null
bb_wait "the script's export to go" 20 eval '[ "$(exports_listed)" = 0 ]'
opens=""
for name in $DM bb--vg-vm--work--old; do opens="$opens $name=$(dm_open $name)"; done
expect dm-nothing-leaks \
  "exports=$(exports_listed); vbd nodes of dom $dom: $(vbd_nodes_of $dom); open counts:$opens; loops before=$loops_before after=$(loop_count)" \
  eval '[ "$(exports_listed)" = 0 ] && [ "$(vbd_nodes_of $dom)" = 0 ] &&
    [ "$(dm_open $DM)" = 0 ] && [ "$(dm_open bb--vg-vm--work--old)" = 0 ] &&
    [ "$(loop_count)" = "$loops_before" ]'

lvm_ vgremove -f $VG >>$RUN/lvm.log 2>&1
/sbin/losetup -d $pv
echo "XENLAB NOTE dmlvm took $(elapsed_ms $t_scenario) ms" | tee -a $RUN/results
