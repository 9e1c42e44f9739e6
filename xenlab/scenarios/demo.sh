# Scenario "demo" (make demo): a disk image from the host, exported through blockbroker to two
# PV guests that share one loop device; policyd SIGKILLed and started again (it recovers both
# exports); then detached until nothing is left.
# The host put the image and its md5 in $RUN/images (demo.img, demo.img.md5) before the boot.
. /run/xenlab/scenarios/lib.sh
. $RUN/scenarios/bbstack.sh
. $RUN/scenarios/demolib.sh
IMG=$RUN/images/demo.img

want=$(cat $IMG.md5 2>/dev/null) || demo_failed "no host image $IMG"
step "dom0 up; host image $IMG md5=$want"
bb_stack_start || demo_failed "blockbroker's stack did not start"
step "blockbroker stack up (dbus-daemon, broker as root, policyd as blockbroker) in ${BB_STACK_MS} ms"

demo_guests
demo_share

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

demo_detach_all
