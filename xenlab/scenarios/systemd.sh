# xenlab/scenarios/systemd.sh: blockbroker's Debian package under systemd as PID 1 (the systemd
# dom0 of build-systemd.sh; XENLAB_FLAVOUR=systemd). Installs the .deb run.sh's caller put in
# $RUN/debs with apt, then checks the services as systemd runs them; nothing here starts a
# daemon. A newer build of the same package in $RUN/debs-next is installed over it under load
# (part 8). Check names start with sd-; docs/xenlab.md lists them.
. /run/xenlab/scenarios/lib.sh
. /run/xenlab/scenarios/sdlib.sh
active() { [ "$(systemctl is-active "$1" 2>/dev/null)" = active ]; }

# -- 1. the system: systemd is PID 1, Debian's xen unit brought up xenstored, dbus runs
expect sd-pid1-systemd "pid 1 is $(cat /proc/1/comm); system $(systemctl is-system-running); failed: $(systemctl --failed --no-legend --plain | awk '{printf "%s ", $1}')" \
  test "$(cat /proc/1/comm)" = systemd
expect sd-xen-units "xen.service $(systemctl is-active xen.service), dbus $(systemctl is-active dbus.service), xenstored $(pidof oxenstored xenstored), domid0=$(xenstore-read domid 2>&1)" \
  sh -c 'systemctl is-active -q xen.service dbus.service && xenstore-read /local/domain/0/name >/dev/null'

# -- 2. apt install of the package (its dependencies are in the image: no network here)
deb=$(ls $RUN/debs/blockbroker_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || { check sd-apt-install FAIL "no .deb in $RUN/debs"; exit 1; }
cp "$deb" /tmp/ && deb=/tmp/$(basename "$deb")
t0=$(now)
apt-get install -y -q "$deb" >$RUN/apt-install.log 2>&1; rc=$?
expect sd-apt-install "rc=$rc in $(elapsed_ms $t0) ms; socket $(systemctl is-active blockbroker-broker.socket), broker $(systemctl is-active blockbroker-broker.service), policyd $(systemctl is-active blockbroker-policyd.service)" \
  sh -c "[ $rc = 0 ] && systemctl is-active -q blockbroker-broker.socket && ! systemctl is-active -q blockbroker-broker.service blockbroker-policyd.service"

# -- 3. the units as systemd reads them
units="blockbroker-broker.socket blockbroker-broker.service blockbroker-policyd.service"
# --man=no: the image has no man-db (and no /usr/share/man); the pages' presence in the package
# is checked on the .deb itself below
(cd /lib/systemd/system && systemd-analyze verify --man=no $units) >$RUN/sd-verify.log 2>&1; rc=$?
expect sd-units-verify "rc=$rc: $(tr '\n' ' ' <$RUN/sd-verify.log | cut -c1-400)" \
  sh -c "[ $rc = 0 ] && [ ! -s $RUN/sd-verify.log ]"
pages=$(dpkg-deb -c "$deb" | grep -c 'man8/blockbroker-policyd.8\|man8/blockbroker-broker.8')
expect sd-units-man-pages "Documentation=man: pages in the .deb: $pages of 2" test "$pages" = 2
# systemd-analyze security's exposure (0 best, 10 worst) against the goals: the broker (root,
# devices) at most 2.0, policyd at most 2.5; full tables in sd-security-*.txt
for svc in broker:2.0 policyd:2.5; do
  name=${svc%:*}; goal=${svc#*:}
  systemd-analyze security --no-pager blockbroker-$name.service >$RUN/sd-security-blockbroker-$name.txt 2>&1
  level=$(sed -n 's/.*Overall exposure level for [^ ]*: \([0-9.]*\).*/\1/p' $RUN/sd-security-blockbroker-$name.txt)
  expect sd-security-$name "exposure ${level:-unknown} (goal <= $goal)" \
    awk -v l="$level" -v g="$goal" 'BEGIN {exit !(l != "" && l + 0 <= g + 0)}'
done

# -- 4. xl create with script=blockbroker-block: socket activation, D-Bus activation
loops0=$(loop_count)
boot_md5=$(make_image $IMAGE_DIR/boot.img BOOT 2)
t0=$(now)
guest_create sdb1 "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$IMAGE_DIR/boot.img" "xenlab.wait=xvda xenlab.then=watch"
rc=$?
got=$(guest_disk_md5 sdb1 xvda 120)
expect sd-script-guest-reads "xl create rc=$rc in $(elapsed_ms $t0) ms; guest md5=$got image md5=$boot_md5" \
  test -n "$got" -a "$got" = "$boot_md5"
expect sd-broker-socket-activated "$(journalctl -b -q -u blockbroker-broker.service -o cat | grep -m1 -i 'started\|failed' )" \
  sh -c "journalctl -b -q -u blockbroker-broker.service -o cat | grep -q '^Started'"
expect sd-policyd-dbus-activated "$(journalctl -b -q -u dbus.service -o cat | grep -m1 BlockBroker1); policyd $(systemctl is-active blockbroker-policyd.service)" \
  sh -c "journalctl -b -q -u dbus.service -o cat | grep -q \"Activating via systemd: service name='org.qubes.BlockBroker1'\" && systemctl is-active -q blockbroker-policyd.service"
xl destroy sdb1 >/dev/null 2>&1
wait_until 30 eval '[ "$(loops_of $IMAGE_DIR/boot.img)" = 0 ]'
expect sd-destroy-frees-loop "loop devices on boot.img: $(loops_of $IMAGE_DIR/boot.img)" \
  test "$(loops_of $IMAGE_DIR/boot.img)" = 0
# the block script's direct path: policyd's socket in its RuntimeDirectory (0600 in a 0700 dir,
# user blockbroker); with no bus to reach, a remove of a backend policyd does not know is
# answered there (NotFound: success); the journal names block-socket callers (xl destroy's
# remove above, answered NotFound after policyd's pre-detach)
sock=/run/blockbroker-policyd/block.sock
XENBUS_PATH=backend/vbd/32000/51712 DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent/bus \
  /etc/xen/scripts/blockbroker-block remove >$RUN/sd-block-socket.log 2>&1; rc=$?
modes="$(stat -c '%a %U' $sock 2>&1), dir $(stat -c '%a %U' ${sock%/*} 2>&1)"
lines=$(journalctl -b -q -u blockbroker-policyd.service -o cat | grep -c 'via=block-socket')
expect sd-block-socket "socket $modes; remove with no bus rc=$rc $(head -c 300 $RUN/sd-block-socket.log); $lines journal lines via=block-socket" \
  sh -c "[ $rc = 0 ] && [ '$modes' = '600 blockbroker, dir 700 blockbroker' ] && [ $lines -gt 0 ]"

# -- 5. blockbroker export into a running guest (it re-reads its disks every 4 s)
shared_md5=$(make_image $IMAGE_DIR/shared.img SHARED 2)
guest_create sdx1 "" "xenlab.then=watch xenlab.reread=4"
guest_wait sdx1 '^GUEST watching' 90 >/dev/null
t0=$(now)
out=$(bb export $IMAGE_DIR/shared.img --to sdx1 --ro --json 2>&1)
echo "blockbroker export: $out"
export1=$(echo "$out" | json_field export); disk=$(xvd_name "$(echo "$out" | json_field devid)")
got=$(guest_disk_md5 sdx1 "$disk" 60)
expect sd-export-guest-reads "export $export1 as $disk in $(elapsed_ms $t0) ms; guest md5=$got image md5=$shared_md5" \
  test -n "$got" -a "$got" = "$shared_md5"
connected() { bb list --json | grep "\"export\":\"$export1\"" | grep -q '"state":"connected"'; }
wait_until 30 connected

# -- 6. SIGKILL of policyd under PID 1: back with its export through the fd store
before=$(bb list --json | sort)
kill_policyd 60
after=$(bb list --json | sort)
rec=$(journalctl -b -q -u blockbroker-policyd.service -o cat | grep reconciled | tail -1)
expect sd-kill-policyd-back "active again (Type=dbus: name owned) $back_ms ms after SIGKILL; $rec" \
  sh -c "echo '$rec' | grep -q 'adopted=1' && echo '$rec' | grep -q 'failed=0' && echo '$rec' | grep -q 'stored_fds=[1-9]'"
expect sd-kill-policyd-listed "before: $before | after: $after" test -n "$before" -a "$before" = "$after"
n=$(guest_console sdx1 | grep -c "^GUEST reread $disk ")
wait_until 30 eval '[ "$(guest_console sdx1 | grep -c "^GUEST reread $disk ")" -gt "$n" ]'
reread=$(guest_console sdx1 | grep "^GUEST reread $disk " | tail -1 | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p')
expect sd-kill-policyd-guest-reads "re-read after the restart: $reread" test "$reread" = "$shared_md5"

# -- 7. SIGKILL of the broker: the socket stays, the next request starts a new one
bpid0=$(systemctl show -p MainPID --value blockbroker-broker.service)
systemctl kill -s KILL blockbroker-broker.service
rw_md5=$(make_image $IMAGE_DIR/second.img SECOND 2)
t0=$(now)
out2=$(bb export $IMAGE_DIR/second.img --to sdx1 --ro --json 2>&1)
export2=$(echo "$out2" | json_field export); disk2=$(xvd_name "$(echo "$out2" | json_field devid)")
got=$(guest_disk_md5 sdx1 "$disk2" 60)
expect sd-kill-broker-back "broker pid $bpid0 killed; export $export2 in $(elapsed_ms $t0) ms, new broker pid $(systemctl show -p MainPID --value blockbroker-broker.service); guest md5=$got image md5=$rw_md5" \
  test -n "$got" -a "$got" = "$rw_md5"

# -- 8. upgrade under load: a newer build installed with apt while two guests read their disks
# (sdx1: the two exports of parts 5-7, sdx2: a disk of its own through blockbroker-block);
# postinst restarts policyd (a restart: its fds go through the fd store), every export must be
# listed again as it was, and the guests must keep reading the right bytes throughout
third_md5=$(make_image $IMAGE_DIR/third.img THIRD 2)
guest_create sdx2 "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$IMAGE_DIR/third.img" "xenlab.wait=xvda xenlab.then=watch xenlab.reread=4"
got=$(guest_disk_md5 sdx2 xvda 120)
expect sd-upgrade-second-guest "sdx2 read xvda md5=$got, image md5=$third_md5" \
  test -n "$got" -a "$got" = "$third_md5"
rereads() { guest_console "$1" | grep -c '^GUEST reread '; }
wait_until 30 eval '[ "$(rereads sdx2)" -gt 0 ]'
next=$(ls $RUN/debs-next/blockbroker_*.deb 2>/dev/null | head -1)
if [ -z "$next" ]; then
  check sd-upgrade-installed FAIL "no newer build in $RUN/debs-next (make lab-systemd builds one with DEB_VERSION)"
else
  cp "$next" /tmp/ && next=/tmp/$(basename "$next")
  v0=$(dpkg-query -W -f '${Version}' blockbroker)
  before=$(bb list --json | sort)
  n_exports=$(echo "$before" | grep -c '"export"')
  pid0=$(systemctl show -p MainPID --value blockbroker-policyd.service)
  r1=$(rereads sdx1); r2=$(rereads sdx2)
  t0=$(now)
  apt-get install -y -q "$next" >$RUN/apt-upgrade.log 2>&1; rc=$?
  upgrade_ms=$(elapsed_ms $t0)
  v1=$(dpkg-query -W -f '${Version}' blockbroker)
  pid1=$(systemctl show -p MainPID --value blockbroker-policyd.service)
  expect sd-upgrade-installed "apt-get install rc=$rc in $upgrade_ms ms: $v0 -> $v1; policyd pid $pid0 -> $pid1 ($(systemctl is-active blockbroker-policyd.service))" \
    sh -c "[ $rc = 0 ] && [ '$v1' != '$v0' ] && [ '$pid1' != 0 ] && [ '$pid1' != '$pid0' ] && systemctl is-active -q blockbroker-policyd.service"
  rec=$(journalctl -b -q _PID=$pid1 -o cat | grep reconciled | tail -1)
  expect sd-upgrade-fd-store "$n_exports exports before; policyd $pid1: $rec" \
    sh -c "echo '$rec' | grep -q 'stored_fds=$n_exports ' && echo '$rec' | grep -q 'adopted=$n_exports ' && echo '$rec' | grep -q 'failed=0'"
  after=$(bb list --json | sort)
  expect sd-upgrade-listed "$n_exports exports; before: $(echo "$before" | md5sum | cut -c1-8) after: $(echo "$after" | md5sum | cut -c1-8); after: $(echo "$after" | tr '\n' ' ' | cut -c1-600)" \
    test "$n_exports" -ge 3 -a "$before" = "$after"
  # two more re-reads of every disk after the upgrade; every re-read since it began (during
  # and after) must show the right bytes
  wait_until 60 eval '[ "$(rereads sdx1)" -ge $((r1 + 4)) ] && [ "$(rereads sdx2)" -ge $((r2 + 2)) ]'
  bad=$( { guest_console sdx1 | grep '^GUEST reread ' | tail -n +$((r1 + 1)) |
             sed -e "s/^GUEST reread $disk md5=$shared_md5 .*//" -e "s/^GUEST reread $disk2 md5=$rw_md5 .*//"
           guest_console sdx2 | grep '^GUEST reread ' | tail -n +$((r2 + 1)) |
             sed "s/^GUEST reread xvda md5=$third_md5 .*//"; } | grep . | head -3 | tr '\n' ' ')
  expect sd-upgrade-guests-read "re-reads since the upgrade began: sdx1 $(($(rereads sdx1) - r1)), sdx2 $(($(rereads sdx2) - r2)); wrong: ${bad:-none}" \
    test -z "$bad" -a "$(rereads sdx1)" -ge $((r1 + 4)) -a "$(rereads sdx2)" -ge $((r2 + 2))
fi
xl destroy sdx2 >/dev/null 2>&1
wait_until 30 eval '[ "$(loops_of $IMAGE_DIR/third.img)" = 0 ]'
expect sd-upgrade-destroy-frees-loop "after the upgrade: xl destroy sdx2 (blockbroker-block remove); loops on third.img: $(loops_of $IMAGE_DIR/third.img); listed: $(bb list --json | grep -c export)" \
  test "$(loops_of $IMAGE_DIR/third.img)" = 0

# -- 9. detach (after the upgrade: the new policyd detaches what the old one exported), destroy
bb detach "$export1" >/dev/null 2>&1; bb detach "$export2" >/dev/null 2>&1
wait_until 30 sh -c "guest_console() { cat $CONSOLE_DIR/guest-sdx1.log; }; guest_console | grep -q 'GUEST gone $disk' && guest_console | grep -q 'GUEST gone $disk2'"
wait_until 30 eval '[ "$(($(loops_of $IMAGE_DIR/shared.img) + $(loops_of $IMAGE_DIR/second.img)))" = 0 ]'
expect sd-detach "guest: $(guest_console sdx1 | grep '^GUEST gone' | tr '\n' ' '); loops on the images: $(($(loops_of $IMAGE_DIR/shared.img) + $(loops_of $IMAGE_DIR/second.img))); listed: $(bb list --json | grep -c export)" \
  sh -c "[ $(($(loops_of $IMAGE_DIR/shared.img) + $(loops_of $IMAGE_DIR/second.img))) = 0 ] && guest_console() { cat $CONSOLE_DIR/guest-sdx1.log; } && guest_console | grep -q 'GUEST gone $disk'"
xl destroy sdx1 >/dev/null 2>&1

# -- 10. a VM-initiated export through the bridge, approved (as scenarios/vmexport.sh does in
# the busybox dom0, with the same stand-ins): guest vmexa is a driver domain with an image on
# its own loop0, guest vmexb the target. Stand-ins: dom0 publishes vmexa's data/blockbroker
# nodes (what `blockbroker request-export` in vmexa would write); dom0 runs the packaged qrexec
# service (/etc/qubes-rpc/blockbroker.RequestExport, which execs the bridge) as qrexec would
# for vmexa (uid 65534, group blockbroker-qrexec, QREXEC_* in its environment);
# a policy rule allows the request instead of a person's Approve() (polkit approval is tested
# on the host). Here the bridge is the package's and policyd the unit.
VMRULE=/etc/blockbroker/policy.d/10-xenlab-vmexport.policy
printf 'request-export  *   vmexa   vmexb   allow   mode=ro   # xenlab: stands in for Approve()\n' >$VMRULE
t0=$(now)
guest_create vmexa "" "xenlab.driver=8 xenlab.then=watch" && guest_create vmexb "" "xenlab.then=watch"
drv=$(guest_wait vmexa '^GUEST driver dev=' 90)
guest_wait vmexb '^GUEST watching' 90 >/dev/null
a=$(domid_of vmexa); b=$(domid_of vmexb)
field() { echo "$2" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
majmin=$(field majmin "$drv"); diskseq=$(field diskseq "$drv"); size=$(field size "$drv"); a_md5=$(field md5 "$drv")
for node in dev diskseq; do
  val=$majmin; [ $node = diskseq ] && val=$diskseq
  xenstore-write /local/domain/$a/data/blockbroker/loop0/$node "$val"
  xenstore-chmod /local/domain/$a/data/blockbroker/loop0/$node n$a
done
gid=$(getent group blockbroker-qrexec | cut -d: -f3)
t1=$(now)
answer=$(echo "name=loop0 major=${majmin%%:*} minor=${majmin##*:} diskseq=$diskseq size=$size ro=0 mode=ro desc=vmexa-ram-image" |
  env -i LANG=C.UTF-8 PATH=/usr/bin:/bin QREXEC_REMOTE_DOMAIN=vmexa QREXEC_SERVICE_ARGUMENT=vmexb \
    BLOCKBROKER_BRIDGE_TIMEOUT=60 setpriv --reuid=65534 --regid=65534 --groups=$gid \
    /etc/qubes-rpc/blockbroker.RequestExport 2>>$RUN/bridge.log)
devid=$(echo "$answer" | sed -n 's/^ok devid=\([0-9]*\).*/\1/p')
be=$(echo "$answer" | sed -n 's/.* backend=\([^ ]*\).*/\1/p')
expect sd-vmexport-approved "vmexa (dom $a): ${drv:-no driver line}; bridge answered in $(elapsed_ms $t1) ms: $answer" \
  eval 'test -n "$devid" && case "$be" in /local/domain/$a/backend/vbd/$b/*) true ;; *) false ;; esac'
vdisk=$(xvd_name "$devid" 2>/dev/null)
got=$(guest_disk_md5 vmexb "$vdisk" 60)
expect sd-vmexport-target-reads "vmexb read $vdisk md5=$got, vmexa's image md5=$a_md5; $(elapsed_ms $t0) ms from xl create" \
  test -n "$got" -a "$got" = "$a_md5"
xl destroy vmexb >/dev/null 2>&1; xl destroy vmexa >/dev/null 2>&1
wait_until 30 sh -c "! blockbroker list --json | grep -q export"
rm -f $VMRULE

# -- 11. apt remove while a guest uses a disk: refused (prerm), the guest keeps reading it
rm_md5=$(make_image $IMAGE_DIR/remove.img REMOVE 2)
guest_create sdr1 "format=raw, vdev=xvda, access=ro, script=blockbroker-block, target=$IMAGE_DIR/remove.img" \
  "xenlab.wait=xvda xenlab.then=watch xenlab.reread=3"
first=$(guest_disk_md5 sdr1 xvda 120)
apt-get remove -y -q blockbroker >$RUN/apt-remove.log 2>&1; rc=$?
n=$(guest_console sdr1 | grep -c "^GUEST reread xvda ")
wait_until 30 eval '[ "$(guest_console sdr1 | grep -c "^GUEST reread xvda ")" -gt "$n" ]'
reread=$(guest_console sdr1 | grep "^GUEST reread xvda " | tail -1 | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p')
status=$(dpkg-query -W -f '${Status}' blockbroker 2>/dev/null)
expect sd-remove-refused "apt-get remove rc=$rc ($(grep -m1 'refusing' $RUN/apt-remove.log)); package: $status; policyd $(systemctl is-active blockbroker-policyd.service); guest md5 $first, re-read after: $reread, image $rm_md5" \
  sh -c "[ $rc != 0 ] && grep -q 'refusing to remove' $RUN/apt-remove.log && [ '$status' = 'install ok installed' ] && systemctl is-active -q blockbroker-policyd.service && [ '$first' = '$rm_md5' ] && [ '$reread' = '$rm_md5' ]"
xl destroy sdr1 >/dev/null 2>&1
wait_until 30 eval '[ "$(loops_of $IMAGE_DIR/remove.img)" = 0 ]'

# -- 12. apt purge: nothing left
rm -f $IMAGE_DIR/*.img   # the administrator's images: purge never deletes them
t0=$(now)
apt-get purge -y -q blockbroker >$RUN/apt-purge.log 2>&1; rc=$?
sleep 1
left=""
[ -n "$(systemctl list-unit-files --no-legend 'blockbroker*' 2>/dev/null)" ] && left="$left units:$(systemctl list-unit-files --no-legend 'blockbroker*' | awk '{printf "%s,", $1}')"
systemctl list-units --all --no-legend 'blockbroker*' 2>/dev/null | grep -q . && left="$left loaded-units"
for u in blockbroker; do getent passwd $u >/dev/null && left="$left user:$u"; done
for g in blockbroker blockbroker-qrexec; do getent group $g >/dev/null && left="$left group:$g"; done
for p in /etc/blockbroker /run/blockbroker /run/blockbroker-policyd /usr/lib/blockbroker /var/lib/blockbroker /usr/bin/blockbroker \
         /etc/xen/scripts/blockbroker-block /usr/share/dbus-1/system.d/org.qubes.BlockBroker1.conf; do
  [ -e $p ] && left="$left $p"
done
pgrep -f blockbroker >/dev/null && left="$left processes:$(pgrep -f blockbroker | tr '\n' ,)"
xenstore-exists /local/domain/0/blockbroker 2>/dev/null && left="$left xenstore:/local/domain/0/blockbroker"
nodes=$(xenstore-ls -f /local/domain 2>/dev/null | grep -c 'blockbroker')
[ "$nodes" = 0 ] || left="$left xenstore-nodes:$nodes"
[ "$(loop_count)" = "$loops0" ] || left="$left loops:$(loop_count)-vs-$loops0"
expect sd-apt-purge "rc=$rc in $(elapsed_ms $t0) ms; left:${left:- nothing}" sh -c "[ $rc = 0 ] && [ -z '$left' ]"
