#!/bin/bash
# xenlab/demo.sh (make demo): blockbroker in real Xen, end to end, in one lab boot.
# Makes a disk image on the host, boots the lab with the demo scenario (export the image through
# blockbroker to a PV guest that reads it and prints its md5, share it read-only with a second
# guest through the same loop device, SIGKILL policyd and let it come back (both exports
# recovered), detach both, nothing left), prints the timeline and ends with `DEMO OK`, or
# `DEMO FAILED <reason>` and exit status 1.
# DEMO_DOM0=systemd (the default; scenarios/demo-systemd.sh): the demo as an administrator gets
# it: the systemd dom0, the package DEMO_DEB (default: dist/deb/blockbroker_*.deb, `make deb`)
# installed with apt, the daemons started by systemd, policyd's SIGKILL recovered through the fd
# store. DEMO_DOM0=busybox (scenarios/demo.sh): the busybox dom0 running blockbroker from the
# host's venv BLOCKBROKER_VENV (default /opt/blockbroker/venv; `make demo PREFIX=...` sets it).
set -uo pipefail
LAB_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
run_dir=$CACHE/runs/demo

failed() { echo "DEMO FAILED $*"; exit 1; }

rm -rf "$run_dir"; mkdir -p "$run_dir/images" || failed "cannot make $run_dir"
image=$run_dir/images/demo.img
{ printf 'BLOCKBROKER-DEMO-IMAGE'; head -c $((16 * 1024 * 1024 - 22)) /dev/urandom; } >"$image"
md5sum <"$image" | cut -d' ' -f1 >"$image.md5"
echo "host image $image (16 MiB) md5=$(cat "$image.md5")"

case ${DEMO_DOM0:-systemd} in
  busybox) scenario=demo; flavour=busybox ;;
  systemd)
    scenario=demo-systemd; flavour=systemd
    deb=${DEMO_DEB:-$(ls -t "$LAB_SRC"/../dist/deb/blockbroker_*_*.deb 2>/dev/null | head -1)}
    [ -f "$deb" ] || failed "no package for the systemd dom0 (make deb)"
    mkdir -p "$run_dir/debs" && cp "$deb" "$run_dir/debs/" ;;
  *) failed "DEMO_DOM0 is busybox or systemd, not '$DEMO_DOM0'" ;;
esac
XENLAB_FLAVOUR=$flavour "$LAB_SRC/run.sh" -d "$run_dir" $scenario=900 | grep -v '^XENLAB T+'
rc=${PIPESTATUS[0]}
echo
echo "timeline (dom0 uptime, s):"
sed -n 's/^XENLAB TIMELINE t=\([0-9.]*\) /  \1  /p' "$run_dir/results"
if grep -q '^XENLAB DEMO OK' "$run_dir/results" && [ "$rc" = 0 ]; then
  echo "DEMO OK"
  exit 0
fi
reason=$(sed -n 's/^XENLAB DEMO FAILED //p' "$run_dir/results" | head -1)
[ -n "$reason" ] || reason=$(grep -h '^XENLAB FATAL' "$run_dir/results" "$run_dir/console.log" 2>/dev/null | head -1)
failed "${reason:-the lab run failed (exit $rc); see $run_dir/console.log}"
