# Scenario "domstart": the domain-start benchmark (bench/bench_domstart.py runs it).
# REPS rounds, each variant once per round (interleaved): `xl create -p` of a PV guest, timed
# from start to return (libxl returns once every disk's hotplug script has finished and its
# backend is ready), then
# `xl destroy`, waiting until the backend is gone and no loop device is left.
#   none         no disks: the baseline cost of creating a domain
#   stock        4 file-backed disks through Xen's stock `block` script
#   blockbroker  4 file-backed disks through script=blockbroker-block (when the stack is up)
#   blockbroker_nopre  the same script installed as blockbroker-block-nopre: policyd does not
#                pre-attach for that name, so the script's own Attach does all the work
#   floor        4 disks whose hotplug script is a static program that only exits 0: libxl's,
#                xenstored's and the kernel's share of a disk with no hotplug work at all (the
#                backends never get a device; libxl does not wait for one). No script can cost
#                less; a bound on any script's ratio to Xen's `block`
# xl's -vvv log and policyd's and the broker's logs go to dom0's tmpfs (copied to $RUN after),
# not through 9p: a real dom0 logs to its own disk or journald.
# Per-disk cost = (median(variant) - median(none)) / 4. Paused guests keep the measurement
# free of guest boot CPU (TCG runs everything on 2 host cores).
# Prints: XENLAB BENCH domstart variant=<v> rep=<n> create_ms=<ms> disks=<n>
# and where dom0's CPU went during that create (ms of CPU from /proc, 10 ms ticks):
#   XENLAB BENCH domstart-cpu variant=<v> rep=<n> policyd=<ms> broker=<ms> xenstored=<ms>
#     dbus=<ms> busy=<ms>  (busy: every CPU's non-idle time, kernel and xl included)
. /run/xenlab/scenarios/lib.sh
REPS=$(cat $RUN/domstart.reps 2>/dev/null || echo 5)
DISKS="a b c d"
VARIANTS=$(cat $RUN/domstart.variants 2>/dev/null || echo "none stock")
BB_LOG_DIR=/run/xenlab-bb-logs; mkdir -p $BB_LOG_DIR
case " $VARIANTS " in *" blockbroker"*) . $RUN/scenarios/bbstack.sh; bb_stack_start ;; esac
case " $VARIANTS " in *" blockbroker_nopre "*)
  cp /etc/xen/scripts/blockbroker-block /etc/xen/scripts/blockbroker-block-nopre ;; esac

case " $VARIANTS " in *" floor "*)
  printf 'int main(void) { return 0; }\n' >/run/xenlab-floor.c
  in_host gcc -static -Os -o /run/xenlab-floor /run/xenlab-floor.c &&
    cp /run/xenlab-floor /etc/xen/scripts/floor-block || echo "domstart: cannot build floor" >&2 ;;
esac
XL_LOG_DIR=/tmp/xl-logs; mkdir -p $XL_LOG_DIR
for d in $DISKS; do make_image $IMAGE_DIR/bench-$d.img "BENCH-$d" 4 >/dev/null; done

# cpu_ticks: "policyd broker xenstored dbus busy", CPU ticks so far (processes by their comm; a
# script started by a console entry point has its own name as comm)
cpu_ticks() {
  awk 'FILENAME == "/proc/stat" { if ($1 == "cpu") busy = $2 + $3 + $4 + $7 + $8 + $9; next }
    { i = index($0, "("); j = 0; for (k = length($0); k > 0; k--) if (substr($0, k, 1) == ")") { j = k; break }
      comm = substr($0, i + 1, j - i - 1); split(substr($0, j + 2), f, " "); t = f[12] + f[13]
      if (comm ~ /^blockbroker-pol/) p += t; else if (comm ~ /^blockbroker-bro/) b += t
      else if (comm ~ /xenstored/) x += t; else if (comm == "dbus-daemon") d += t }
    END { printf "%d %d %d %d %d\n", p, b, x, d, busy }' /proc/stat /proc/[0-9]*/stat 2>/dev/null
}
cpu_line() {  # cpu_line VARIANT REP "BEFORE": the domstart-cpu line for the ticks since BEFORE
  echo "$3 $(cpu_ticks)" | awk -v v=$1 -v r=$2 '{ printf "XENLAB BENCH domstart-cpu variant=%s rep=%s policyd=%d broker=%d xenstored=%d dbus=%d busy=%d\n", v, r, ($6-$1)*10, ($7-$2)*10, ($8-$3)*10, ($9-$4)*10, ($10-$5)*10 }'
}

run_variant() {  # run_variant VARIANT REP: one timed create and its destroy
  variant=$1; rep=$2; spec=""; n=0
  if [ "$variant" != none ]; then
    for d in $DISKS; do
      script=""; [ "$variant" = blockbroker ] && script="script=blockbroker-block, "
      [ "$variant" = blockbroker_nopre ] && script="script=blockbroker-block-nopre, "
      [ "$variant" = floor ] && script="script=floor-block, "
      spec="$spec;format=raw, vdev=xvd$d, access=ro, ${script}target=$IMAGE_DIR/bench-$d.img"
      n=$((n + 1))
    done
  fi
  name=bench-$variant-$rep
  ticks0=$(cpu_ticks)
  t0=$(now)
  if guest_create $name "$spec" "" -p; then
    ms=$(elapsed_ms $t0)
    cpu=$(cpu_line $variant $rep "$ticks0")
    echo "XENLAB BENCH domstart variant=$variant rep=$rep create_ms=$ms disks=$n" | tee -a $RUN/results
    echo "$cpu" | tee -a $RUN/results
  else
    echo "XENLAB BENCH domstart variant=$variant rep=$rep error=create-failed" | tee -a $RUN/results
    tail -5 $RUN/xl-create-$name.log
  fi
  mv $XL_LOG_DIR/xl-create-$name.log $RUN/ 2>/dev/null
  xl destroy $name 2>/dev/null
  i=0; while [ "$(loop_count)" != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}
# interleaved: one create of each variant per round, so the lab's drifting load (TCG on shared
# host cores) hits every variant alike
rep=1
while [ $rep -le $REPS ]; do
  for variant in $VARIANTS; do run_variant $variant $rep; done
  rep=$((rep + 1))
done
cp $BB_LOG_DIR/*.log $RUN/ 2>/dev/null || :
