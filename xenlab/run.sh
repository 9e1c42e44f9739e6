#!/bin/bash
# xenlab/run.sh: boot the real-Xen lab once under QEMU (TCG) and run dom0 scenarios in it.
#
# usage: xenlab/run.sh [-t SECONDS] [-d RUN_DIR] [-p NAME=VALUE]... SCENARIO[=SECONDS]...
#   SCENARIO is a script xenlab/scenarios/SCENARIO.sh, run in dom0 in the order given, each with
#   its own time limit (default 300 s); -t bounds the whole QEMU run (default: sum + 120 s).
#   -d uses RUN_DIR as the run directory and keeps what the caller put there, e.g. images/
#      (default: a new one under $XENLAB_CACHE/runs).
#   -p writes VALUE to the file NAME in the run directory: a parameter for the scenarios
#      (e.g. -p domstart.reps=3; -p venv=DIR runs blockbroker from the host's venv DIR).
# Prints the result lines (XENLAB CHECK/BENCH/TIMELINE/SCENARIO) as they come and exits 0 only
# when dom0 reached its end marker, every scenario exited 0 and no check failed.
# Environment: XENLAB_CACHE (default /var/cache/blockbroker/xenlab), XENLAB_MEM (QEMU MiB, 2048),
# XENLAB_DOM0_MEM (MiB, 1024), XENLAB_SHELL=1 (leave a dom0 shell on the serial port at the end),
# XENLAB_QEMU (the QEMU binary, default qemu-system-x86_64), BLOCKBROKER_VENV (the host's venv
# the scenarios run blockbroker from, default /opt/blockbroker/venv; -p venv=DIR wins),
# XENLAB_FLAVOUR=systemd (boot the Debian dom0 with systemd as PID 1 of build-systemd.sh instead
# of the busybox one; no host root share, no venv: its scenarios install the .deb in dom0).
set -uo pipefail

LAB_SRC=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$LAB_SRC/.." && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
IMAGES=$CACHE/images

die() { echo "XENLAB FATAL $*"; exit 2; }

total_limit=""; run_dir=""; params=()
while getopts "t:d:p:" opt; do
  case $opt in
    t) total_limit=$OPTARG ;;
    d) run_dir=$OPTARG ;;
    p) [[ $OPTARG =~ ^[a-z0-9._-]+=.*$ ]] || die "-p wants NAME=VALUE, got '$OPTARG'"
       params+=("$OPTARG") ;;
    *) die "usage: $0 [-t SECONDS] [-d RUN_DIR] [-p NAME=VALUE]... SCENARIO[=SECONDS]..." ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || die "usage: $0 [-t SECONDS] [-d RUN_DIR] [-p NAME=VALUE]... SCENARIO[=SECONDS]..."

for item in "$@"; do
  [ -f "$LAB_SRC/scenarios/${item%%=*}.sh" ] || die "no scenario xenlab/scenarios/${item%%=*}.sh"
done
[ "$(id -u)" = 0 ] || die "the Xen lab needs root (loop devices, 9p export of /)"
QEMU=${XENLAB_QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null ||
  die "$QEMU is missing: the Xen lab cannot run (install qemu-system-x86: make install)"
FLAVOUR=${XENLAB_FLAVOUR:-busybox}
case $FLAVOUR in
  busybox) "$LAB_SRC/build.sh" || die "building the Xen lab images failed (see above)" ;;
  systemd) "$LAB_SRC/build-systemd.sh" || die "building the systemd dom0 failed (see above)" ;;
  *) die "XENLAB_FLAVOUR is busybox or systemd, not '$FLAVOUR'" ;;
esac

if [ -z "$run_dir" ]; then
  mkdir -p "$CACHE/runs"
  # keep the last few runs for post-mortems
  ls -1dt "$CACHE"/runs/* 2>/dev/null | tail -n +8 | xargs -r rm -rf
  run_dir=$(mktemp -d "$CACHE/runs/$(date +%Y%m%d-%H%M%S).XXXX")
else
  # a given directory is kept (the caller may have put files in it, e.g. images/); only the
  # previous run's outputs go
  mkdir -p "$run_dir" && rm -rf "$run_dir"/{plan,results,scenarios,dbus,policy.d,venv,timeout.*,*.log}
fi
chmod 0755 "$run_dir"
mkdir -p "$run_dir/scenarios" "$run_dir/dbus"
cp "$LAB_SRC"/scenarios/*.sh "$run_dir/scenarios/"
cp "$REPO"/dbus/*.conf "$REPO"/dbus/dev/system-default-policy.conf "$run_dir/dbus/" 2>/dev/null
# the project's default export policy, for policyd --policy-dir (the host root is read-only)
rm -rf "$run_dir/policy.d"; cp -r "$REPO/policy/policy.d" "$run_dir/policy.d" 2>/dev/null
: >"$run_dir/results"
# the venv blockbroker runs from in dom0 (lib.sh reads $RUN/venv): an absolute host path
echo "${BLOCKBROKER_VENV:-/opt/blockbroker/venv}" >"$run_dir/venv"
for param in "${params[@]}"; do echo "${param#*=}" >"$run_dir/${param%%=*}"; done
venv=$(cat "$run_dir/venv")
case $venv in /*) ;; *) die "the venv must be an absolute path, got '$venv'" ;; esac
[ "$FLAVOUR" = systemd ] || [ -x "$venv/bin/blockbroker-policyd" ] || die "no blockbroker install in $venv (make install PREFIX=...)"
sum=0
for item in "$@"; do
  name=${item%%=*}; limit=300
  [ "$item" != "$name" ] && limit=${item#*=}
  echo "$name" >>"$run_dir/plan"
  echo "$limit" >"$run_dir/timeout.$name"
  sum=$((sum + limit))
done
total_limit=${total_limit:-$((sum + 120))}

dom0_mem=${XENLAB_DOM0_MEM:-1024}
xen_args="console=com1 com1=115200,8n1 dom0_mem=${dom0_mem}M,max:${dom0_mem}M dom0_max_vcpus=2"
xen_args+=" bootscrub=false loglvl=warning guest_loglvl=warning"
dom0_args="console=hvc0 earlyprintk=xen rdinit=/init loglevel=4"
[ -n "${XENLAB_SHELL:-}" ] && dom0_args+=" xenlab.shell"
p9="security_model=none,multidevs=remap"
qemu=("$QEMU"
  # TCG only: this host's /dev/kvm cannot run Xen. qemu64 (+svm as Xen's CI) because -cpu max
  # crashes dom0 early; +rdrand, else the dom0 crng starves and xl create stalls ~3 s.
  -accel tcg,thread=multi -cpu qemu64,+svm,+rdrand -m "${XENLAB_MEM:-2048}" -smp 2
  -nographic -no-reboot -monitor none -serial stdio -nodefaults -vga none
  -virtfs "local,path=$run_dir,mount_tag=xenlab,$p9,id=xenlab"
  -virtfs "local,path=/,mount_tag=hostroot,$p9,readonly=on,id=hostroot"
  -kernel "$IMAGES/xen" -append "$xen_args"
  -initrd "$IMAGES/vmlinux $dom0_args,$IMAGES/dom0.cpio")
if [ "$FLAVOUR" = systemd ]; then
  # the root filesystem on virtio-blk, opened with snapshot=on (writes go to a temporary file,
  # the cached image stays as built); the initramfs only mounts it and execs systemd
  sd=$CACHE/systemd
  qemu=("${qemu[@]:0:${#qemu[@]}-8}"  # without the host root share, -kernel, -append, -initrd
    -drive "file=$sd/rootfs.img,format=raw,if=virtio,snapshot=on,cache=unsafe"
    -kernel "$IMAGES/xen" -append "$xen_args"
    -initrd "$IMAGES/vmlinux console=hvc0 earlyprintk=xen rdinit=/init loglevel=4,$sd/initrd.cpio")
fi

echo "XENLAB RUN dir=$run_dir flavour=$FLAVOUR scenarios=$* limit=${total_limit}s venv=$venv"
started=$EPOCHREALTIME
stamp() { awk -v a="$EPOCHREALTIME" -v b="$started" 'BEGIN {printf "%7.2f", a - b}'; }
# the serial console, time-stamped, into console.log; result lines also to stdout as they come
timeout --foreground -k 5 "$total_limit" "${qemu[@]}" </dev/null 2>&1 |
  while IFS= read -r line; do
    line=${line%$'\r'}
    printf '[%s] %s\n' "$(stamp)" "$line" >>"$run_dir/console.log"
    case $line in
      "XENLAB CHECK "* | "XENLAB BENCH "* | "XENLAB NOTE "* | "XENLAB TIMELINE "* | "XENLAB DEMO "* | "XENLAB SCENARIO "* | "XENLAB FATAL "* | "XENLAB END"* | "XENLAB T+"*)
        echo "$line" ;;
    esac
  done
qemu_rc=${PIPESTATUS[0]}
wall=$(stamp)
echo "XENLAB QEMU rc=$qemu_rc wall=${wall// /}s console=$run_dir/console.log"

status=0
if ! grep -q "XENLAB END" "$run_dir/console.log" 2>/dev/null; then
  [ "$qemu_rc" = 124 ] && echo "XENLAB FATAL the lab ran out of time (${total_limit}s)"
  echo "XENLAB FATAL dom0 never reached its end marker (boot failed or timed out)"
  status=1
fi
grep -q "^XENLAB FATAL" "$run_dir/results" && status=1
grep -q "^XENLAB CHECK [^ ]* FAIL" "$run_dir/results" && status=1
grep -q "^XENLAB DEMO FAILED" "$run_dir/results" && status=1
for item in "$@"; do
  name=${item%%=*}
  grep -q "^XENLAB SCENARIO $name rc=0$" "$run_dir/results" || {
    echo "XENLAB FATAL scenario $name did not finish cleanly: $(grep "^XENLAB SCENARIO $name " "$run_dir/results")"
    status=1
  }
done
passed=$(grep -c "^XENLAB CHECK [^ ]* PASS" "$run_dir/results")
failed=$(grep -c "^XENLAB CHECK [^ ]* FAIL" "$run_dir/results")
echo "XENLAB SUMMARY passed=$passed failed=$failed status=$status results=$run_dir/results"
exit $status
