#!/bin/bash
# xenlab/lab-systemd.sh: `make lab-systemd`: boots the systemd dom0 (XENLAB_FLAVOUR=systemd),
# installs the Debian package built by `make deb` in it with apt and runs scenarios/systemd.sh.
# Prints, last, `LAB-SYSTEMD OK` or `LAB-SYSTEMD FAILED <reason>`.
# usage: xenlab/lab-systemd.sh [DEB]   (default: the newest dist/deb/blockbroker_*.deb)
set -uo pipefail
LAB_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
deb=${1:-$(ls -t "$LAB_SRC"/../dist/deb/blockbroker_*_*.deb 2>/dev/null | grep -v dbgsym | head -1)}
[ -f "$deb" ] || { echo "LAB-SYSTEMD FAILED no package (make deb)"; exit 1; }
mkdir -p "$CACHE/runs"
run_dir=$(mktemp -d "$CACHE/runs/$(date +%Y%m%d-%H%M%S)-systemd.XXXX")
mkdir -p "$run_dir/debs" && cp "$deb" "$run_dir/debs/"
XENLAB_FLAVOUR=systemd "$LAB_SRC/run.sh" -d "$run_dir" "systemd=${LAB_SYSTEMD_LIMIT:-600}"
status=$?
if [ $status = 0 ]; then echo "LAB-SYSTEMD OK"; exit 0; fi
reason=$(cat "$run_dir/results" "$run_dir/console.log" 2>/dev/null |
  grep -m1 -o 'XENLAB FATAL.*\|XENLAB CHECK [^ ]* FAIL.*' | cut -c1-300)
echo "LAB-SYSTEMD FAILED ${reason:-run.sh status $status} (run $run_dir)"
exit 1
