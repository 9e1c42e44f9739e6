# xenlab/scenarios/bbstack.sh: blockbroker's stack in the lab's dom0 (sourced after lib.sh).
#
# All from the host's root, chrooted (the project is installed in /opt/blockbroker/venv there):
#   dbus-daemon  the system bus at the standard /run/dbus/system_bus_socket: the stock default
#                policy (dbus/dev/system-default-policy.conf, shared with the host harness) plus
#                the project's dbus/*.conf, both copied into the run directory by run.sh
#   broker       as root; config: client_user blockbroker, file_roots = $IMAGE_DIR, majors
#                [$BB_BLOCK_MAJORS] (default 7: loop; the dmlvm scenario adds device-mapper's)
#   policyd      as user blockbroker (no supplementary groups) against this dom0's xenstored
#                (its socket handed to group blockbroker) and the real sysfs (xen-blkback);
#                the export policy is the project's default (policy/policy.d, via the run dir);
#                its block socket at /run/blockbroker-policyd/block.sock (the script's default);
#                more arguments from `-p bb.policyd_args=...` (e.g. --pre-attach-claim 0)
# libxl runs hotplug scripts from dom0's own /etc/xen/scripts: blockbroker-block, a static
# binary, is installed there itself (no chroot), and finds the bus at /run/dbus, dom0's /run.
BB_DIR=/run/xenlab-bb
# where policyd's and the broker's logs go: the run directory (9p, the host sees them live),
# or dom0's tmpfs for the domstart benchmark (no 9p write in the timed path; copied after)
BB_LOG_DIR=${BB_LOG_DIR:-$RUN}

bb_wait() {  # bb_wait WHAT SECONDS COMMAND...: poll until COMMAND succeeds
  what=$1; deadline=$(awk -v t="$(now)" -v s="$2" 'BEGIN {print t + s}'); shift 2
  until "$@" >/dev/null 2>&1; do
    awk -v t="$(now)" -v d="$deadline" 'BEGIN {exit !(t > d)}' &&
      { echo "bbstack: timed out waiting for $what" >&2; return 1; }
    sleep 0.1
  done
}

bb_bus_config() {
  cat <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <user>messagebus</user>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <includedir>$RUN/dbus</includedir>
</busconfig>
CONF
}

bb_has_name() {
  in_host dbus-send --system --print-reply=literal --dest=org.freedesktop.DBus \
    /org/freedesktop/DBus org.freedesktop.DBus.NameHasOwner string:org.qubes.BlockBroker1 |
    grep -q true
}

bb_broker_listening() { [ -S $BB_DIR/broker.sock ]; }

# bb_policyd_start: start policyd (its log appended to $BB_LOG_DIR/policyd.log) and wait for its name.
# Its block socket is where the packaged unit puts it (RuntimeDirectory=, 0700), the block
# script's default BLOCKBROKER_BLOCK_SOCKET: the script finds it without being told.
bb_policyd_start() {
  in_host sh -c 'mkdir -p /run/blockbroker-policyd && chown blockbroker:blockbroker \
    /run/blockbroker-policyd && chmod 0700 /run/blockbroker-policyd'
  (in_host setsid setpriv --reuid=blockbroker --regid=blockbroker --clear-groups \
    /usr/bin/env PYTHONUNBUFFERED=1 $VENV/bin/blockbroker-policyd \
    --broker-socket $BB_DIR/broker.sock --sysfs-root /sys --policy-dir $RUN/policy.d \
    --block-socket /run/blockbroker-policyd/block.sock $(cat $RUN/bb.policyd_args 2>/dev/null) \
    >>$BB_LOG_DIR/policyd.log 2>&1 &)
  bb_wait "policyd to own org.qubes.BlockBroker1" 120 bb_has_name || {
    tail -20 $BB_LOG_DIR/policyd.log >&2; return 1
  }
}

# bb_policyd_pid: the pid of the process that owns org.qubes.BlockBroker1 (from the bus itself)
bb_policyd_pid() {
  in_host dbus-send --system --print-reply=literal --dest=org.freedesktop.DBus \
    /org/freedesktop/DBus org.freedesktop.DBus.GetConnectionUnixProcessID \
    string:org.qubes.BlockBroker1 2>/dev/null | awk '{print $2}'
}

# bb_dead PID: the process is gone or a zombie (its parent, dom0's init, may not reap it yet)
bb_dead() { ! [ -d /proc/$1 ] || [ "$(sed -n 's/.*) \(.\) .*/\1/p' /proc/$1/stat 2>/dev/null)" = Z ]; }

# bb_policyd_restart: SIGKILL policyd (no clean-up of its own, its fds closed by the kernel) and
# start it again. No systemd here, so no fd store: the new policyd takes the degraded path of
# start-up reconciliation (src/policyd/exports/reconcile.py). Sets BB_RESTART_MS (kill to the
# name owned again) and BB_RECONCILED (the new policyd's `reconciled` log line, its fields).
bb_policyd_restart() {
  BB_RESTART_MS=""; BB_RECONCILED=""
  pid=$(bb_policyd_pid)
  case $pid in [1-9]*) ;; *) echo "bbstack: no policyd owns the name" >&2; return 1 ;; esac
  grep -q blockbroker-policyd /proc/$pid/cmdline 2>/dev/null ||
    { echo "bbstack: pid $pid owning the name is not policyd" >&2; return 1; }
  t_restart=$(now)
  kill -KILL $pid
  bb_wait "policyd ($pid) to die" 30 bb_dead $pid || return 1
  bb_wait "the bus to drop policyd's name" 30 eval "! bb_has_name" || return 1
  echo "bbstack: policyd $pid killed (SIGKILL); starting it again" >>$BB_LOG_DIR/policyd.log
  bb_policyd_start || return 1
  BB_RESTART_MS=$(elapsed_ms $t_restart)
  BB_RECONCILED=$(grep 'msg=reconciled ' $BB_LOG_DIR/policyd.log | tail -1 | sed 's/.*msg=reconciled //')
}

# bb_stack_start: start the three daemons; returns non-zero (and says why) if one did not come up
bb_stack_start() {
  t_stack=$(now)
  mkdir -p $BB_DIR /run/dbus $IMAGE_DIR
  bb_bus_config >$BB_DIR/bus.conf
  in_host dbus-daemon --config-file=$BB_DIR/bus.conf --fork --nopidfile --nosyslog \
    >$RUN/dbus-daemon.log 2>&1 || { echo "bbstack: dbus-daemon failed" >&2; return 1; }
  roots="\"$IMAGE_DIR\""
  [ -d $RUN/images ] && roots="$roots, \"$RUN/images\""   # host images (9p), e.g. the demo's
  # dom0's root here is the host's / over 9p: no block device behind it (the broker fails
  # closed unless told so); mounted devices are still refused by its O_EXCL probe.
  printf 'client_user = "blockbroker"\nfile_roots = [%s]\nblock_majors = [%s]\nroot_without_block_device = true\n' "$roots" "${BB_BLOCK_MAJORS:-7}" \
    >$BB_DIR/broker.toml
  chmod 0644 $BB_DIR/broker.toml
  (in_host setsid $VENV/bin/blockbroker-broker --config $BB_DIR/broker.toml \
    --socket $BB_DIR/broker.sock >$BB_LOG_DIR/broker.log 2>&1 &)
  bb_wait "the broker's socket" 60 bb_broker_listening || return 1
  # policyd needs XenStore: the socket goes to its group, as a packaged dom0 would set it up
  in_host chgrp blockbroker /run/xenstored/socket && chmod 0660 /run/xenstored/socket
  : >$BB_LOG_DIR/policyd.log
  bb_policyd_start || return 1
  # the hotplug script is a static binary: installed into dom0's own /etc/xen/scripts as a
  # package would, no chroot; it reaches the stack's bus at /run/dbus (the chroot's /run is
  # dom0's)
  cp $HOSTROOT$VENV/bin/blockbroker-block /etc/xen/scripts/blockbroker-block.new &&
    chmod 0755 /etc/xen/scripts/blockbroker-block.new &&
    mv /etc/xen/scripts/blockbroker-block.new /etc/xen/scripts/blockbroker-block || {
    echo "bbstack: cannot install blockbroker-block into /etc/xen/scripts" >&2; return 1
  }
  BB_STACK_MS=$(elapsed_ms $t_stack)
}

# bb CLI_ARGS...: the blockbroker CLI, as root in dom0
bb() { in_host blockbroker "$@"; }
