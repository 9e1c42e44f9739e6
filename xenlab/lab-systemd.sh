#!/bin/bash
# xenlab/lab-systemd.sh: `make lab-systemd`: boots the systemd dom0 (XENLAB_FLAVOUR=systemd),
# installs the Debian package built by `make deb` in it with apt, upgrades it to a newer build of
# the same tree (`make deb DEB_VERSION=...`) under load, and runs the rest of scenarios/systemd.sh.
# Prints, last, `LAB-SYSTEMD OK` or `LAB-SYSTEMD FAILED <reason>`.
# usage: xenlab/lab-systemd.sh [DEB [NEXT_DEB]]
#   DEB default: dist/deb/blockbroker_*.deb; NEXT_DEB default: dist/deb-next/blockbroker_*.deb
#   (what `make lab-systemd` builds). Without a NEXT_DEB the upgrade check fails, never skips.
set -uo pipefail
LAB_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
newest() { ls -t "$LAB_SRC"/../dist/$1/blockbroker_*_*.deb 2>/dev/null | head -1; }
deb=${1:-$(newest deb)}
next=${2:-$(newest deb-next)}
[ -f "$deb" ] || { echo "LAB-SYSTEMD FAILED no package (make deb)"; exit 1; }
mkdir -p "$CACHE/runs"
# keep the last few systemd runs for post-mortems
ls -1dt "$CACHE"/runs/*-systemd.* 2>/dev/null | tail -n +5 | xargs -r rm -rf
run_dir=$(mktemp -d "$CACHE/runs/$(date +%Y%m%d-%H%M%S)-systemd.XXXX")
mkdir -p "$run_dir/debs" "$run_dir/debs-next" && cp "$deb" "$run_dir/debs/"
[ -f "$next" ] && cp "$next" "$run_dir/debs-next/"
XENLAB_FLAVOUR=systemd "$LAB_SRC/run.sh" -d "$run_dir" "systemd=${LAB_SYSTEMD_LIMIT:-600}"
status=$?
# the checks as the scenario recorded them (on the console they carry the journal's prefix,
# so run.sh does not pass them on): one line each, before the verdict; tests/xen reads them
echo "checks ($run_dir/results):"
grep -h '^XENLAB CHECK ' "$run_dir/results" 2>/dev/null
if [ $status = 0 ]; then echo "LAB-SYSTEMD OK"; exit 0; fi
reason=$(cat "$run_dir/results" "$run_dir/console.log" 2>/dev/null |
  grep -m1 -o 'XENLAB FATAL.*\|XENLAB CHECK [^ ]* FAIL.*' | cut -c1-300)
echo "LAB-SYSTEMD FAILED ${reason:-run.sh status $status} (run $run_dir)"
exit 1
