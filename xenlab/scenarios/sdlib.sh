# xenlab/scenarios/sdlib.sh: what the systemd dom0's scenarios share (systemd.sh, demo-systemd.sh;
# sourced after lib.sh). This dom0 is a Debian system with blockbroker's package: no chroot, the
# packaged paths, daemons started by systemd only.
in_host() { "$@"; }     # no chroot: this dom0 is a Debian system of its own
IMAGE_DIR=/var/lib/blockbroker/images   # the packaged broker.toml's file root
export DEBIAN_FRONTEND=noninteractive
bb() { blockbroker "$@"; }
policyd_pid() { systemctl show -p MainPID --value blockbroker-policyd.service; }
# kill_policyd SECONDS: SIGKILL policyd under PID 1 and wait (at most SECONDS) until systemd has
# it active again under a new main pid; sets pid0, pid1 and back_ms; 1 if it did not come back
kill_policyd() {
  pid0=$(policyd_pid)
  t0=$(now)
  systemctl kill -s KILL blockbroker-policyd.service
  wait_until "$1" policyd_back; rc=$?
  back_ms=$(elapsed_ms $t0)
  pid1=$(policyd_pid)
  return $rc
}
policyd_back() {
  pid=$(policyd_pid)
  [ "$pid" != 0 ] && [ "$pid" != "$pid0" ] && systemctl is-active -q blockbroker-policyd.service
}
