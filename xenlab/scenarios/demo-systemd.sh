# Scenario "demo-systemd" (make demo DEMO_DOM0=systemd): the demo of scenarios/demo.sh as an
# administrator gets it: the systemd dom0 (XENLAB_FLAVOUR=systemd), the Debian package from
# $RUN/debs installed with apt, every daemon started by systemd (the broker by its socket,
# policyd by D-Bus activation). A disk image from the host is exported to two PV guests that
# share one loop device; policyd is SIGKILLed under PID 1 and comes back through systemd's fd
# store with both exports; then detached until nothing is left.
# The host put the image and its md5 in $RUN/images (demo.img, demo.img.md5) before the boot.
. /run/xenlab/scenarios/lib.sh
. /run/xenlab/scenarios/sdlib.sh
. /run/xenlab/scenarios/demolib.sh

want=$(cat $RUN/images/demo.img.md5 2>/dev/null) || demo_failed "no host image $RUN/images/demo.img"
step "dom0 up: systemd is PID 1 ($(systemctl is-system-running)); host image md5=$want"
deb=$(ls $RUN/debs/blockbroker_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || demo_failed "no .deb in $RUN/debs"
cp "$deb" /tmp/ && deb=/tmp/$(basename "$deb")
apt-get install -y -q "$deb" >$RUN/apt-install.log 2>&1 || demo_failed "apt-get install: $(tail -3 $RUN/apt-install.log | tr '\n' ' ')"
step "apt-get install $(basename "$deb"): blockbroker-broker.socket $(systemctl is-active blockbroker-broker.socket), policyd $(systemctl is-active blockbroker-policyd.service) (D-Bus-activated on first use)"
cp $RUN/images/demo.img $IMAGE_DIR/demo.img
IMG=$IMAGE_DIR/demo.img

demo_guests
demo_share
step "policyd $(systemctl is-active blockbroker-policyd.service) (pid $(policyd_pid)), broker $(systemctl is-active blockbroker-broker.service) (socket-activated)"

# policyd SIGKILLed under PID 1: systemd restarts it, and its fd store gives back the device
# both exports use, so start-up reconciliation adopts them with their identity
before=$(bb list --json | sort)
kill_policyd 90 || demo_failed "policyd not back 90 s after SIGKILL ($(systemctl is-active blockbroker-policyd.service))"
rec=$(journalctl -b -q _PID=$pid1 -o cat | grep reconciled | tail -1)
echo " $rec " | grep -q " adopted=2 " && echo " $rec " | grep -q " failed=0 " ||
  demo_failed "policyd's start-up reconciliation: ${rec:-no reconciled line}"
[ "$(bb list --json | sort)" = "$before" ] || demo_failed "the exports listed after the restart differ from before"
step "systemctl kill -s KILL policyd: back in $back_ms ms (pid $pid0 -> $pid1), $(echo " $rec " | sed -n 's/.* \(stored_fds=[0-9]*\) \(adopted=[0-9]*\) .*/\1 \2/p') from systemd's fd store; both exports listed as before"

demo_detach_all
