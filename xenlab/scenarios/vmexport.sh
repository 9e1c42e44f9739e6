# Scenario "vmexport": a VM-initiated export (docs/requests.md) in real Xen. Guest vmexa is a
# driver domain: its kernel loads loop + xen-blkback, binds an image in its RAM to /dev/loop0
# and prints dev/diskseq/md5 on its console. dom0 then does what the VM-side helper would do
# (xenlab has no qrexec, and the guest has no xenstore-write): it publishes the nodes in vmexa's
# own XenStore dir (owned by vmexa, as if vmexa wrote them) and runs blockbroker-qrexec-bridge as
# qrexec would (QREXEC_REMOTE_DOMAIN=vmexa, QREXEC_SERVICE_ARGUMENT=vmexb, group
# blockbroker-qrexec, the request line on stdin). No polkitd runs in the lab, so the lab adds a
# policy rule `request-export * vmexa vmexb allow mode=ro` instead of a person's approval; policyd
# writes the vbd with backend = vmexa, and vmexb must read vmexa's bytes through vmexa's blkback.
. /run/xenlab/scenarios/lib.sh
. $RUN/scenarios/bbstack.sh

printf 'request-export  *   vmexa   vmexb   allow   mode=ro   # xenlab: stands in for Approve()\n' \
  >$RUN/policy.d/10-xenlab-vmexport.policy
if bb_stack_start; then
  check vm-export-stack-up PASS "stack up in ${BB_STACK_MS} ms"
else
  check vm-export-stack-up FAIL "$(tail -5 $RUN/broker.log $RUN/policyd.log 2>&1 | tr '\n' ' ')"
  exit 0
fi

t0=$(now)
# vmexa binds loop0, and 1 s later re-binds it (a new diskseq): the request made from the first
# binding is stale by the time dom0 handles it
guest_create vmexa "" "xenlab.driver=8 xenlab.rebind=1 xenlab.then=watch" &&
  guest_create vmexb "" "xenlab.then=watch"
drv=$(guest_wait vmexa '^GUEST driver dev=' 90)
rebound=$(guest_wait vmexa '^GUEST driver-rebound dev=' 30)
guest_wait vmexb '^GUEST watching' 90 >/dev/null
a=$(domid_of vmexa); b=$(domid_of vmexb)
field() { echo "$2" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
majmin=$(field majmin "$drv"); old_diskseq=$(field diskseq "$drv"); size=$(field size "$drv")
diskseq=$(field diskseq "$rebound"); a_md5=$(field md5 "$rebound")
expect vm-export-driver-loop "vmexa (dom $a): ${drv:-no driver line}; ${rebound:-no rebind line}" \
  test -n "$majmin" -a -n "$old_diskseq" -a -n "$diskseq" -a "$diskseq" != "$old_diskseq" -a -n "$a_md5"

# what `blockbroker request-export loop0 --to vmexb` in vmexa does: publish, then ask (qrexec)
publish() {  # publish DEV DISKSEQ: vmexa's data/blockbroker/loop0, owned by vmexa
  for node in dev diskseq; do
    val=$1; [ $node = diskseq ] && val=$2
    xenstore-write /local/domain/$a/data/blockbroker/loop0/$node "$val"
    xenstore-chmod /local/domain/$a/data/blockbroker/loop0/$node n$a
  done
}
qrexec_call() {  # qrexec_call LINE: the bridge as qrexec would start it for vmexa; prints its answer
  gid=$(in_host getent group blockbroker-qrexec | cut -d: -f3)
  echo "$1" | chroot $HOSTROOT /usr/bin/env -i LANG=C.UTF-8 PATH=$VENV/bin:/usr/bin:/bin \
    QREXEC_REMOTE_DOMAIN=vmexa QREXEC_SERVICE_ARGUMENT=vmexb BLOCKBROKER_BRIDGE_TIMEOUT=60 \
    setpriv --reuid=65534 --regid=65534 --groups=$gid $VENV/bin/blockbroker-qrexec-bridge 2>>$RUN/bridge.log
}
request_line() {  # request_line DISKSEQ: what the helper sends
  echo "name=loop0 major=${majmin%%:*} minor=${majmin##*:} diskseq=$1 size=$size ro=0 mode=ro desc=vmexa-ram-image"
}

# negative first: the request made for the first binding (diskseq $old_diskseq), while vmexa's
# nodes show the re-bound loop0 (as its udev rule would publish) -> DeviceChanged, nothing written
publish "$majmin" "$diskseq"
answer=$(qrexec_call "$(request_line "$old_diskseq")")
echo "stale request: $answer"
nodes=$(xenstore-list /local/domain/$a/backend/vbd/$b 2>/dev/null | grep -c .)
expect vm-export-stale-diskseq-refused "bridge: $answer; vbds under vmexa's backend dir: $nodes" \
  eval 'echo "$answer" | grep -q "^error DeviceChanged" && [ "$nodes" = 0 ]'

t1=$(now)
answer=$(qrexec_call "$(request_line "$diskseq")")
echo "request: $answer"
devid=$(echo "$answer" | sed -n 's/^ok devid=\([0-9]*\).*/\1/p')
be=$(echo "$answer" | sed -n 's/.* backend=\([^ ]*\).*/\1/p')
expect vm-export-request-approved "bridge answered in $(elapsed_ms $t1) ms: $answer" \
  eval 'test -n "$devid" && case "$be" in /local/domain/$a/backend/vbd/$b/*) true ;; *) false ;; esac'
disk=$(xvd_name "$devid" 2>/dev/null)
got=$(guest_disk_md5 vmexb "$disk" 60)
state=$(xenstore-read $be/state 2>&1)
expect vm-export-target-reads "vmexb read $disk md5=$got, vmexa's image md5=$a_md5; backend $be state=$state params=$(xenstore-read $be/params 2>&1) diskseq=$(xenstore-read $be/diskseq 2>&1); $(elapsed_ms $t0) ms from xl create" \
  test -n "$got" -a "$got" = "$a_md5"
xl destroy vmexb; xl destroy vmexa
exit 0
