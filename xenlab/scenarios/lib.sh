# xenlab/scenarios/lib.sh: helpers for dom0 scenario scripts (sourced; busybox sh in dom0).
#
# A scenario runs as root in the lab's dom0, outside the chroot, with the per-run directory as
# its working directory ($RUN). It reports with `check NAME PASS|FAIL DETAIL` (one line each in
# $RUN/results and on the console) and may add `XENLAB BENCH`/`XENLAB TIMELINE` lines.
# Outside the chroot: xl, xenstored, the stock hotplug scripts (dom0's own, from the initramfs).
# Inside it (`in_host`): the host's python3, the project's venv, dbus-daemon, util-linux.
RUN=/run/xenlab
HOSTROOT=/hostroot
# the host's venv blockbroker runs from: run.sh writes it ($BLOCKBROKER_VENV or -p venv=DIR)
VENV=$(cat $RUN/venv 2>/dev/null) || VENV=/opt/blockbroker/venv
[ -n "$VENV" ] || VENV=/opt/blockbroker/venv
GUEST_KERNEL=/usr/share/xenlab/guest-vmlinux.gz
GUEST_RAMDISK=/usr/share/xenlab/guest.cpio
GUEST_MEMORY_MB=128
CONSOLE_DIR=/var/log/xen/console
IMAGE_DIR=/tmp/images   # dom0's tmpfs; the same path inside the chroot
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin

now() { cut -d' ' -f1 /proc/uptime; }
elapsed_ms() { awk -v a="$(now)" -v b="$1" 'BEGIN {printf "%d", (a - b) * 1000}'; }
# COMMAND's arguments are expanded once, by the caller: to poll a value, pass
# eval '[ "$(...)" ... ]' (single quotes: expanded again on each try)
wait_until() {  # wait_until SECONDS COMMAND...: poll every 0.2 s
  deadline=$(awk -v t="$(now)" -v s="$1" 'BEGIN {print t + s}'); shift
  until "$@" >/dev/null 2>&1; do
    awk -v t="$(now)" -v d="$deadline" 'BEGIN {exit !(t > d)}' && return 1
    sleep 0.2
  done
}

# check NAME PASS|FAIL DETAIL...: the one result line per check; names are [a-z0-9-]
check() {
  name=$1; status=$2; shift 2
  line="XENLAB CHECK $name $status $*"
  echo "$line"; echo "$line" >>$RUN/results
}
# expect NAME DETAIL COMMAND...: PASS when COMMAND succeeds
expect() {
  name=$1; detail=$2; shift 2
  if "$@"; then check "$name" PASS "$detail"; else check "$name" FAIL "$detail"; fi
}
timeline() { echo "XENLAB TIMELINE t=$(now) $*" | tee -a $RUN/results; }

# in_host COMMAND...: run a host program in the chroot of the host's root, clean environment
in_host() {
  chroot $HOSTROOT /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# make_image PATH TAG SIZE_MB: magic header + random data; prints the image's md5
make_image() {
  mkdir -p "$(dirname "$1")"
  dd if=/dev/urandom of="$1" bs=1M count="$3" 2>/dev/null
  printf 'XENLAB-IMAGE-%s' "$2" | dd of="$1" conv=notrunc 2>/dev/null
  md5sum <"$1" | cut -d' ' -f1
}

# guest_create NAME "DISK_SPEC;DISK_SPEC..." [GUEST_ARGS] [xl create flags]: create a PV guest.
# GUEST_ARGS go to the guest's init (xenlab.wait=xvda,xvdb xenlab.then=watch).
guest_create() {
  name=$1; disks=$2; args=${3:-}; shift 3 2>/dev/null || shift $#
  disk_list=$(echo "$disks" | awk -F';' '{for (i = 1; i <= NF; i++) if ($i != "") printf "%s'\''%s'\''", (n++ ? ", " : ""), $i}')
  cat >/tmp/$name.cfg <<EOF
name = "$name"
type = "pv"
kernel = "$GUEST_KERNEL"
ramdisk = "$GUEST_RAMDISK"
extra = "console=hvc0 rdinit=/init quiet $args"
memory = $GUEST_MEMORY_MB
vcpus = 1
disk = [ $disk_list ]
on_poweroff = "destroy"
on_crash = "destroy"
EOF
  rm -f $CONSOLE_DIR/guest-$name.log
  xl -vvv -t create "$@" /tmp/$name.cfg >${XL_LOG_DIR:-$RUN}/xl-create-$name.log 2>&1
}

guest_console() { cat $CONSOLE_DIR/guest-$1.log 2>/dev/null | tr -d '\r'; }

# guest_wait NAME PATTERN [SECONDS]: wait for a console line matching PATTERN; prints it
guest_wait() {
  deadline=$(awk -v t="$(now)" -v s="${3:-60}" 'BEGIN {print t + s}')
  while :; do
    line=$(guest_console "$1" | grep -m1 -e "$2") && { echo "$line"; return 0; }
    awk -v t="$(now)" -v d="$deadline" 'BEGIN {exit !(t > d)}' && return 1
    sleep 0.2
  done
}

# guest_disk_md5 NAME DEV [SECONDS]: the md5 the guest reported for DEV ("" if none)
guest_disk_md5() {
  guest_wait "$1" "^GUEST disk $2 " "${3:-60}" | sed -n 's/.* md5=\([0-9a-f]*\).*/\1/p'
}

domid_of() { xl domid "$1" 2>/dev/null; }

# vbd_backend NAME VDEV_NUMBER: the backend path of the guest's disk
vbd_backend() { echo "/local/domain/0/backend/vbd/$(domid_of "$1")/$2"; }

loop_devices() { losetup -a 2>/dev/null; }
loop_count() { losetup -a 2>/dev/null | grep -c .; }

# Xen's virtual device numbers: xvda = 51712, xvdb = 51728, ...
vdev_number() {
  idx=$(printf '%d' "'$(echo "$1" | cut -c4)"); echo $((202 * 256 + (idx - 97) * 16))
}

# json_field NAME: a scalar field from one compact JSON object on stdin (the CLI's --json)
json_field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p"; }

# xvd_name DEVID: Xen's virtual device number -> the guest's disk name (51728 -> xvdb)
xvd_name() {
  case $1 in [0-9]*) ;; *) echo none; return 1 ;; esac
  idx=$((($1 - 51712) / 16))
  echo "xvd$(echo abcdefghijklmnopqrstuvwxyz | cut -c$((idx + 1)))"
}

# loops_of FILE: how many loop devices are bound to FILE. sysfs shows the backing file's path
# as seen from dom0's root: /hostroot/... when the broker opened it in the chroot (and
# `losetup -j` does not find those at all).
loops_of() {
  cat /sys/block/loop*/loop/backing_file 2>/dev/null | grep -cxF -e "$1" -e "$HOSTROOT$1"
}
