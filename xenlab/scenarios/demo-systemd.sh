# Scenario "demo-systemd" (make demo DEMO_DOM0=systemd): the demo of scenarios/demo.sh as an
# administrator gets it: the systemd dom0 (XENLAB_FLAVOUR=systemd), the Debian package from
# $RUN/debs installed with apt, every daemon started by systemd (the broker by its socket,
# policyd by D-Bus activation). A disk image from the host is exported to two PV guests that
# share one loop device; policyd is SIGKILLed under PID 1 and comes back through systemd's fd
# store with both exports; then detached until nothing is left.
# The host put the image and its md5 in $RUN/images (demo.img, demo.img.md5) before the boot.
. /run/xenlab/scenarios/lib.sh
in_host() { "$@"; }     # no chroot: this dom0 is a Debian system of its own
IMAGE_DIR=/var/lib/blockbroker/images   # the packaged broker.toml's file root
export DEBIAN_FRONTEND=noninteractive
bb() { blockbroker "$@"; }
demo_failed() { echo "XENLAB DEMO FAILED $*" | tee -a $RUN/results; exit 0; }
step() { timeline "$*"; }
wait_until() {  # wait_until SECONDS COMMAND...: poll every 0.2 s
  deadline=$(awk -v t="$(now)" -v s="$1" 'BEGIN {print t + s}'); shift
  until "$@" >/dev/null 2>&1; do
    awk -v t="$(now)" -v d="$deadline" 'BEGIN {exit !(t > d)}' && return 1
    sleep 0.2
  done
}

want=$(cat $RUN/images/demo.img.md5 2>/dev/null) || demo_failed "no host image $RUN/images/demo.img"
step "dom0 up: systemd is PID 1 ($(systemctl is-system-running)); host image md5=$want"
deb=$(ls $RUN/debs/blockbroker_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || demo_failed "no .deb in $RUN/debs"
cp "$deb" /tmp/ && deb=/tmp/$(basename "$deb")
apt-get install -y -q "$deb" >$RUN/apt-install.log 2>&1 || demo_failed "apt-get install: $(tail -3 $RUN/apt-install.log | tr '\n' ' ')"
step "apt-get install $(basename "$deb"): blockbroker-broker.socket $(systemctl is-active blockbroker-broker.socket), policyd $(systemctl is-active blockbroker-policyd.service) (D-Bus-activated on first use)"
cp $RUN/images/demo.img $IMAGE_DIR/demo.img
IMG=$IMAGE_DIR/demo.img

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
step "policyd $(systemctl is-active blockbroker-policyd.service) (pid $(systemctl show -p MainPID --value blockbroker-policyd.service)), broker $(systemctl is-active blockbroker-broker.service) (socket-activated)"
got=$(guest_disk_md5 demo1 $d1 120)
[ "$got" = "$want" ] || demo_failed "demo1 read md5=${got:-nothing}, want $want"
step "demo1 reads $d1: md5=$got (matches the host image)"

export_ro demo2; e2=$EXPORT; d2=$DISK
got=$(guest_disk_md5 demo2 $d2 120)
[ "$got" = "$want" ] || demo_failed "demo2 read md5=${got:-nothing}, want $want"
loops=$(loops_of $IMG)
[ "$loops" = 1 ] || demo_failed "$loops loop devices on the image, want 1"
step "demo2 reads $d2: md5=$got; both guests share one loop device"

# policyd SIGKILLed under PID 1: systemd restarts it, and its fd store gives back the device
# both exports use, so start-up reconciliation adopts them with their identity
before=$(bb list --json | sort)
pid0=$(systemctl show -p MainPID --value blockbroker-policyd.service)
t0=$(now)
systemctl kill -s KILL blockbroker-policyd.service
back() {
  pid=$(systemctl show -p MainPID --value blockbroker-policyd.service)
  [ "$pid" != 0 ] && [ "$pid" != "$pid0" ] && systemctl is-active -q blockbroker-policyd.service
}
wait_until 90 back || demo_failed "policyd not back 90 s after SIGKILL ($(systemctl is-active blockbroker-policyd.service))"
back_ms=$(elapsed_ms $t0)
pid1=$(systemctl show -p MainPID --value blockbroker-policyd.service)
rec=$(journalctl -b -q _PID=$pid1 -o cat | grep reconciled | tail -1)
echo " $rec " | grep -q " adopted=2 " && echo " $rec " | grep -q " failed=0 " ||
  demo_failed "policyd's start-up reconciliation: ${rec:-no reconciled line}"
[ "$(bb list --json | sort)" = "$before" ] || demo_failed "the exports listed after the restart differ from before"
step "systemctl kill -s KILL policyd: back in $back_ms ms (pid $pid0 -> $pid1), $(echo " $rec " | sed -n 's/.* \(stored_fds=[0-9]*\) \(adopted=[0-9]*\) .*/\1 \2/p') from systemd's fd store; both exports listed as before"

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
