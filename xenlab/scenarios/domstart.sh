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
# Per-disk cost = (median(variant) - median(none)) / 4. Paused guests keep the measurement
# free of guest boot CPU (TCG runs everything on 2 host cores).
# Prints: XENLAB BENCH domstart variant=<v> rep=<n> create_ms=<ms> disks=<n>
. /run/xenlab/scenarios/lib.sh
REPS=$(cat $RUN/domstart.reps 2>/dev/null || echo 5)
DISKS="a b c d"
VARIANTS=$(cat $RUN/domstart.variants 2>/dev/null || echo "none stock")
case " $VARIANTS " in *" blockbroker"*) . $RUN/scenarios/bbstack.sh; bb_stack_start ;; esac
case " $VARIANTS " in *" blockbroker_nopre "*)
  cp /etc/xen/scripts/blockbroker-block /etc/xen/scripts/blockbroker-block-nopre ;; esac

for d in $DISKS; do make_image $IMAGE_DIR/bench-$d.img "BENCH-$d" 4 >/dev/null; done

run_variant() {  # run_variant VARIANT REP: one timed create and its destroy
  variant=$1; rep=$2; spec=""; n=0
  if [ "$variant" != none ]; then
    for d in $DISKS; do
      script=""; [ "$variant" = blockbroker ] && script="script=blockbroker-block, "
      [ "$variant" = blockbroker_nopre ] && script="script=blockbroker-block-nopre, "
      spec="$spec;format=raw, vdev=xvd$d, access=ro, ${script}target=$IMAGE_DIR/bench-$d.img"
      n=$((n + 1))
    done
  fi
  name=bench-$variant-$rep
  t0=$(now)
  if guest_create $name "$spec" "" -p; then
    ms=$(elapsed_ms $t0)
    echo "XENLAB BENCH domstart variant=$variant rep=$rep create_ms=$ms disks=$n" | tee -a $RUN/results
  else
    echo "XENLAB BENCH domstart variant=$variant rep=$rep error=create-failed" | tee -a $RUN/results
    tail -5 $RUN/xl-create-$name.log
  fi
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
