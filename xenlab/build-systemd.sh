#!/bin/bash
# xenlab/build-systemd.sh: the lab's second dom0 flavour: Debian 12 with systemd as PID 1.
#
# Built from Debian packages only (mmdebstrap, the host's apt sources): systemd, dbus, polkitd,
# xen-utils-4.17 (Debian's /etc/init.d/xen, run by systemd as xen.service, starts xenstored and
# xenconsoled), udev, python3.11 and what blockbroker's package depends on, so `apt install
# ./blockbroker_*.deb` needs no network in dom0. Outputs, in $XENLAB_CACHE/systemd:
#   rootfs.img  ext4 root filesystem (QEMU opens it with snapshot=on: runs never change it)
#   initrd.cpio busybox + virtio_blk + ext4 modules; mounts /dev/vda and switch_roots to systemd
#   inputs      what they were built from; the build is skipped while it is unchanged
# The hypervisor, the dom0 kernel and the guest kernel/initramfs are build.sh's (run first).
# Environment: XENLAB_CACHE, XENLAB_FORCE=1 to rebuild.
set -euo pipefail

LAB_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
IMAGES=$CACHE/images
OUT=$CACHE/systemd
die() { echo "xenlab build-systemd: $*" >&2; exit 1; }
log() { echo "xenlab build-systemd: $*" >&2; }

"$LAB_SRC/build.sh" || die "the base images (build.sh) failed"
for tool in mmdebstrap mkfs.ext4 cpio depmod modprobe busybox; do
  command -v "$tool" >/dev/null || die "missing host tool '$tool' (apt-get install mmdebstrap e2fsprogs)"
done

# Packages of the root filesystem: the init system and buses, Xen's userspace, and the
# blockbroker package's dependencies (debian/control), so it installs offline.
PACKAGES=(systemd systemd-sysv udev dbus polkitd xen-utils-4.17 xen-utils-common xenstore-utils
          kmod python3.11 python3 libcap2 libseccomp2 util-linux procps)
KVER=$(awk '$1 == "deb" && $2 ~ /^linux-image-[0-9]/ {sub("linux-image-", "", $2); print $2}' "$IMAGES/inputs")
[ -n "$KVER" ] || die "no kernel version in $IMAGES/inputs"

inputs() {
  echo "packages ${PACKAGES[*]}"
  apt-cache policy "${PACKAGES[@]}" 2>/dev/null |
    awk '/^[^ ]/ {sub(":$", "", $1); pkg = $1} /Candidate:/ {print "deb", pkg, $2}'
  echo "base $(sha256sum <"$IMAGES/inputs" | cut -d' ' -f1)"
  (cd "$LAB_SRC" && sha256sum build-systemd.sh dom0-systemd/*)
}
new_inputs=$(inputs)
uptodate() { [ -z "${XENLAB_FORCE:-}" ] && [ -f "$OUT/inputs" ] && [ "$new_inputs" = "$(cat "$OUT/inputs")" ]; }
if uptodate; then log "images up to date in $OUT"; exit 0; fi
exec 9>"$CACHE/build-systemd.lock"
flock 9
if uptodate; then log "images up to date in $OUT"; exit 0; fi

started=$EPOCHREALTIME
work=$(mktemp -d "$CACHE/build-systemd.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$work/out" "$work/kernel"
dpkg -x "$(compgen -G "$CACHE/debs/linux-image-${KVER}_*.deb" | head -1)" "$work/kernel"
depmod -b "$work/kernel" "$KVER"
ko_paths() {  # module names -> .ko paths (dependencies first, each once)
  local mod
  for mod in "$@"; do modprobe -d "$work/kernel" -S "$KVER" --show-depends "$mod"; done |
    awk '$1 == "insmod" && !seen[$2]++ {print $2}'
}

# 1. the root filesystem (no docs, man pages or locales: smaller image, faster boot)
log "mmdebstrap bookworm (${#PACKAGES[@]} packages + dependencies)"
mmdebstrap --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --aptopt='APT::Install-Recommends "false"' \
  bookworm "$root" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" >&2 ||
  die "mmdebstrap failed (is deb.debian.org reachable?)"

# 2. dom0's kernel modules (only those the lab needs), loaded by systemd-modules-load
mods=(xen-evtchn xen-gntdev xen-gntalloc xenfs xen-blkback loop virtio_pci virtio_blk ext4
      9pnet_virtio 9p)
ko_paths "${mods[@]}" | while read -r ko; do
  rel=${ko#"$work/kernel/"}; mkdir -p "$root/$(dirname "$rel")"; cp "$ko" "$root/$rel"
done
cp "$work/kernel/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$KVER/"
depmod -b "$root" "$KVER"
printf '%s\n' xen-evtchn xen-gntdev xen-gntalloc xen-blkback loop 9pnet_virtio 9p \
  >"$root/etc/modules-load.d/xenlab.conf"

# 3. the lab's configuration: guest images, the scenario runner, consoles, no getty
mkdir -p "$root/usr/share/xenlab" "$root/run/xenlab" "$root/var/log/xen/console"
(cd "$root" && cpio -i --quiet -d 'usr/share/xenlab/*' <"$IMAGES/dom0.cpio")
install -m 0755 "$LAB_SRC/dom0-systemd/xenlab-run" "$root/usr/local/sbin/xenlab-run"
install -m 0644 "$LAB_SRC/dom0-systemd/xenlab-run.service" "$root/etc/systemd/system/"
ln -s ../xenlab-run.service "$root/etc/systemd/system/multi-user.target.wants/xenlab-run.service"
# guests' consoles to files, as the busybox dom0 runs xenconsoled (lib.sh reads them)
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >>"$root/etc/default/xen"
echo xenlab-dom0 >"$root/etc/hostname"
echo '/dev/vda / ext4 rw,noatime 0 1' >"$root/etc/fstab"
for unit in serial-getty@hvc0.service getty@tty1.service console-getty.service \
            apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
            fstrim.timer systemd-timesyncd.service xendomains.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
: >"$root/etc/machine-id"                # a fresh one each boot (the image is read-only per run)

# 4. the disk image and the boot initramfs
size_mb=$(( $(du -sm "$root" | cut -f1) * 3 / 2 + 512 ))
mkfs.ext4 -q -F -L xenlab-root -d "$root" "$work/out/rootfs.img" "${size_mb}M" ||
  die "mkfs.ext4 -d failed"
ird=$work/initrd
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$(command -v busybox)" "$ird/bin/busybox"
for a in sh mount umount insmod switch_root sleep cat echo mkdir; do ln -s busybox "$ird/bin/$a"; done
ko_paths virtio_pci virtio_blk ext4 | while read -r ko; do
  cp "$ko" "$ird/lib/modules/"; basename "$ko" >>"$ird/modules.order"
done
install -m 0755 "$LAB_SRC/dom0-systemd/initrd-init" "$ird/init"
(cd "$ird" && find . | cpio -H newc -o --quiet) >"$work/out/initrd.cpio"

echo "$new_inputs" >"$work/out/inputs.pending"
rm -rf "$OUT.old"; [ -d "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$work/out" "$OUT"
mv "$OUT/inputs.pending" "$OUT/inputs"
rm -rf "$OUT.old"
log "built $OUT in $(awk -v a="$EPOCHREALTIME" -v b="$started" 'BEGIN {printf "%.1f", a - b}') s"
ls -l "$OUT" >&2
