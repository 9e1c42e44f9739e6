#!/bin/sh
# blockbroker-block: libxl hotplug script for vbd backends; hands the disk to blockbroker's policyd.
#
# THE PREVIOUS SHIPPED SCRIPT, kept only as bench/bench_blockscript.py's comparison candidate
# ("previous sh+dbus-send"). The shipped one is src/client/blockbroker-block.c (docs/client.md).
#
# Runs as root, spawned by libxl (or `xl devd` in a driver domain) once per disk, which waits
# for it: its start-up is the per-disk cost, so it is POSIX sh around one dbus-send (measured in
# docs/client.md: a Python entry point costs 5-25x more). It trusts its environment (libxl's);
# policyd re-validates XENBUS_PATH and reads params/mode from XenStore itself.
#
#   XENBUS_PATH=/local/domain/<be>/backend/vbd/<fe>/<devid> blockbroker-block add|remove
#
# libxl really passes XENBUS_PATH relative to the backend domain's home (backend/vbd/<fe>/<devid>,
# seen in the Xen lab); both forms are accepted, by policyd and by xenstore-write alike.
#
# add:    calls Attach(XENBUS_PATH); policyd opens the disk through the broker and writes
#         physical-device, physical-device-path, diskseq and hotplug-status=connected (what
#         Xen's own block script's success() writes; libxl 4.17 only checks the exit status,
#         older toolstacks wait for the node) in one transaction, so on success this writes
#         nothing. On failure: writes hotplug-error (the D-Bus error name and message; libxl
#         logs it) and hotplug-status=error, exits 1.
# remove: calls Detach(XENBUS_PATH). Writes nothing to XenStore (libxl is deleting the dir).
#         A backend policyd does not know (NotFound: the add failed or never ran) is success.
# Exit statuses: 0 ok, 1 Attach/Detach failed, 2 usage (bad $1 or XENBUS_PATH).
# DBUS_SYSTEM_BUS_ADDRESS and XENSTORED_PATH are honoured (by dbus-send and, on the error
# path, xenstore-exists/xenstore-write).

PATH=/usr/bin:/bin:/usr/sbin:/sbin
export PATH

usage() {
	printf '%s\n' "blockbroker-block: $1" >&2
	printf '%s\n' "usage: XENBUS_PATH=[/local/domain/<be>/]backend/vbd/<fe>/<devid> $0 add|remove" >&2
	exit 2
}

case "$XENBUS_PATH" in
/local/domain/*/backend/* | backend/*) ;;
*) usage "XENBUS_PATH must be a backend path (backend/... or /local/domain/<be>/backend/...), got '$XENBUS_PATH'" ;;
esac

# dbus-send is written out in each $(...) (not in a function) so that the subshell execs it
# directly instead of forking once more. --reply-timeout (8 s) stays well under libxl's hotplug
# timeout (40 s in Xen 4.17), so the error below is written before libxl gives up.
case "$1" in
add)
	if err=$(dbus-send --system --print-reply=literal --reply-timeout=8000 \
		--dest=org.qubes.BlockBroker1 /org/qubes/BlockBroker1 \
		org.qubes.BlockBroker1.Manager.Attach "string:$XENBUS_PATH" 2>&1 >/dev/null); then
		exit 0 # hotplug-status=connected was written by Attach, with the trio
	fi
	err=${err#Error }
	err=${err:-"policyd Attach failed without a message"}
	printf '%s\n' "blockbroker-block add $XENBUS_PATH: $err" >&2
	# Only if libxl has not removed the dir meanwhile (a write would recreate it and leak).
	if xenstore-exists "$XENBUS_PATH" 2>/dev/null; then
		xenstore-write "$XENBUS_PATH/hotplug-error" "$err" "$XENBUS_PATH/hotplug-status" error
	fi
	exit 1
	;;
remove)
	err=$(dbus-send --system --print-reply=literal --reply-timeout=8000 \
		--dest=org.qubes.BlockBroker1 /org/qubes/BlockBroker1 \
		org.qubes.BlockBroker1.Manager.Detach "string:$XENBUS_PATH" 2>&1 >/dev/null) && exit 0
	case "$err" in
	"Error org.qubes.BlockBroker1.Error.NotFound:"*) exit 0 ;;
	esac
	printf '%s\n' "blockbroker-block remove $XENBUS_PATH: ${err#Error }" >&2
	exit 1
	;;
*) usage "unknown command '$1'" ;;
esac
