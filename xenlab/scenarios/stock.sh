# Scenario "stock": the lab itself, without blockbroker. Xen's own `block` hotplug script
# attaches a file-backed disk to a PV guest, and the host's python from the project venv reads
# this dom0's XenStore through pyxs in the chroot (the route blockbroker's daemons take).
. /run/xenlab/scenarios/lib.sh

expect dom0-xenstored "xenstored answers; dom0 name=$(xenstore-read /local/domain/0/name)" \
  test "$(xenstore-read /local/domain/0/name)" = Domain-0

# -- Xen's stock block script: file target -> losetup -> physical-device -> blkback -> guest
want=$(make_image $IMAGE_DIR/stock.img STOCK 8)
loops_before=$(loop_count)
t0=$(now)
if guest_create stock1 "format=raw, vdev=xvda, access=ro, target=$IMAGE_DIR/stock.img" \
     "xenlab.wait=xvda"; then
  create_ms=$(elapsed_ms $t0)
  got=$(guest_disk_md5 stock1 xvda 90)
  expect stock-block-guest-reads "xl create ${create_ms} ms; guest md5=$got image md5=$want" \
    test -n "$got" -a "$got" = "$want"
  guest_wait stock1 '^GUEST done' 30 >/dev/null
  i=0; while domid_of stock1 >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  sleep 1   # the remove hotplug runs after the domain is gone
  expect stock-block-loop-freed "loop devices before=$loops_before after=$(loop_count)" \
    test "$(loop_count)" = "$loops_before"
else
  check stock-block-guest-reads FAIL "xl create failed: $(tail -3 $RUN/xl-create-stock1.log | tr '\n' ' ')"
  check stock-block-loop-freed FAIL "no guest"
fi

# -- the host's python and the project venv, chrooted, against this dom0's xenstored
t0=$(now)
out=$(in_host $VENV/bin/python3 - <<'PY' 2>&1
import sys
import pyxs
with pyxs.Client(unix_socket_path="/run/xenstored/socket") as client:
    name = client.read(b"/local/domain/0/name").decode()
    domains = sorted(client.list(b"/local/domain"))
print(f"python {sys.version.split()[0]} pyxs name={name} domains={b','.join(domains).decode()}")
PY
)
expect host-venv-pyxs "$out ($(elapsed_ms $t0) ms)" eval 'echo "$out" | grep -q "pyxs name=Domain-0"'

# -- what a host program costs to start in the chroot (9p, TCG): the per-call price of the CLI
for cmd in "python3 -S -c pass" "python3 -c pass" "blockbroker --help"; do
  t0=$(now); in_host $cmd >/dev/null 2>&1; first=$(elapsed_ms $t0)
  t0=$(now); in_host $cmd >/dev/null 2>&1; second=$(elapsed_ms $t0)
  echo "XENLAB NOTE chroot-start '$cmd' first=${first}ms again=${second}ms" | tee -a $RUN/results
done
