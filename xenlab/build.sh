#!/bin/bash
# xenlab/build.sh: build the real-Xen lab images from Debian bookworm packages.
#
# Nothing Xen-related is installed on the host for this: the packages are fetched with
# `apt-get download` and unpacked with `dpkg -x` into the cache. Outputs, in $XENLAB_CACHE/images:
#   xen         the hypervisor (multiboot ELF, booted by qemu -kernel)
#   vmlinux     the dom0 kernel as an uncompressed ELF (the xz bzImage costs ~2 s under TCG)
#   dom0.cpio   dom0 initramfs: busybox, bash, xl/xenstored/xenconsoled, the stock hotplug scripts,
#               util-linux losetup + flock, the kernel modules (device-mapper and dm-thin-pool for
#               the dmlvm scenario), the guest kernel and initramfs
#   inputs      what the images were built from; the build is skipped while it is unchanged
#
# Host tools needed (Makefile APT_PACKAGES): busybox-static cpio kmod python3 util-linux.
# Environment: XENLAB_CACHE (default /var/cache/blockbroker/xenlab), XENLAB_FORCE=1 to rebuild.
set -euo pipefail

LAB_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${XENLAB_CACHE:-/var/cache/blockbroker/xenlab}
DEBS=$CACHE/debs
IMAGES=$CACHE/images
XEN_VERSION=4.17

die() { echo "xenlab build: $*" >&2; exit 1; }
log() { echo "xenlab build: $*" >&2; }

for tool in apt-get apt-cache dpkg busybox cpio depmod modprobe python3 flock losetup ldd sha256sum; do
  command -v "$tool" >/dev/null || die "missing host tool '$tool' (run 'make install')"
done
# not `busybox --list | grep -q`: under pipefail grep's early exit SIGPIPEs busybox (a false "no sh")
grep -qx sh <<<"$(busybox --list)" || die "busybox has no sh applet"
file_kind=$(od -An -tx1 -N4 "$(command -v busybox)" | tr -d ' ')
[ "$file_kind" = 7f454c46 ] || die "busybox is not an ELF binary"
ldd "$(command -v busybox)" >/dev/null 2>&1 && die "busybox is dynamically linked; install busybox-static"

kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-amd64 (run 'apt-get update')"
KVER=${kernel_pkg#linux-image-}

PACKAGES=(
  "xen-hypervisor-$XEN_VERSION-amd64" "$kernel_pkg"
  "xen-utils-$XEN_VERSION" xen-utils-common xenstore-utils
  libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 "libxenmisc$XEN_VERSION"
  libxenstore4 libxentoollog1 libyajl2 libxendevicemodel1 libxentoolcore1 libxenhypfs1
)

# The inputs: exact package versions, the lab's own files baked into the images, and the host
# binaries copied in. Any change rebuilds; otherwise the cached images are reused as they are.
declare -A CANDIDATE
resolve_candidates() {
  while read -r pkg version; do CANDIDATE[$pkg]=$version; done < <(
    apt-cache policy "${PACKAGES[@]}" 2>/dev/null |
      awk '/^[^ ]/ {sub(":$", "", $1); pkg = $1} /Candidate:/ {print pkg, $2}')
}
resolve_candidates
for pkg in "${PACKAGES[@]}"; do
  case ${CANDIDATE[$pkg]:-} in "" | "(none)")
    log "apt does not know $pkg yet: apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    resolve_candidates; break ;;
  esac
done
candidate_version() { echo "${CANDIDATE[$1]:-}"; }
inputs() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do echo "deb $pkg $(candidate_version "$pkg")"; done
  for pkg in busybox-static bash util-linux libc6 libgcc-s1; do
    echo "host $pkg $(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null)"
  done
  (cd "$LAB_SRC" && sha256sum build.sh dom0/init guest/init)
}
new_inputs=$(inputs)
if grep -q ' (none)$\| $' <<<"$new_inputs"; then
  die "unresolved package versions (run 'apt-get update'):
$(grep ' (none)$\| $' <<<"$new_inputs")"
fi
if [ -z "${XENLAB_FORCE:-}" ] && [ -f "$IMAGES/inputs" ] &&
   [ "$new_inputs" = "$(cat "$IMAGES/inputs")" ]; then
  log "images up to date in $IMAGES"
  exit 0
fi

started=$EPOCHREALTIME
mkdir -p "$DEBS"
exec 9>"$CACHE/build.lock"
flock 9   # one build at a time; a second caller waits, then finds the images up to date
if [ -z "${XENLAB_FORCE:-}" ] && [ -f "$IMAGES/inputs" ] &&
   [ "$new_inputs" = "$(cat "$IMAGES/inputs")" ]; then
  log "images up to date in $IMAGES"
  exit 0
fi
# 1. fetch the exact versions (kept by file name, so a new version is a new download)
missing=()
for pkg in "${PACKAGES[@]}"; do
  version=$(candidate_version "$pkg")
  compgen -G "$DEBS/${pkg}_${version//:/%3a}_*.deb" >/dev/null || missing+=("$pkg=$version")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "downloading ${missing[*]}"
  # apt drops to user _apt for downloads; let it write the cache dir
  getent passwd _apt >/dev/null && chown _apt "$DEBS"
  (cd "$DEBS" && apt-get download -q "${missing[@]}") >&2 ||
    die "apt-get download failed: the Xen lab cannot be built without the Debian packages"
fi

work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
X=$work/debs
mkdir -p "$X" "$work/out"
for pkg in "${PACKAGES[@]}"; do
  version=$(candidate_version "$pkg")
  dpkg -x "$(compgen -G "$DEBS/${pkg}_${version//:/%3a}_*.deb" | head -1)" "$X"
done

# 2. hypervisor and kernel
zcat "$X/boot/xen-$XEN_VERSION-amd64.gz" >"$work/out/xen"
python3 - "$X/boot/vmlinuz-$KVER" "$work/out/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vmlinuz: no xz payload found")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if not elf.startswith(b"\x7fELF"):
    sys.exit("vmlinuz: payload is not an ELF vmlinux")
open(sys.argv[2], "wb").write(elf)
PY
gzip -1 -c "$work/out/vmlinux" >"$work/out/vmlinux.gz"   # guests: smallest to load under TCG

MODULES=$X/lib/modules/$KVER/kernel
depmod -b "$X" "$KVER"

new_root() {  # a busybox root with the usual directories
  local root=$1 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,root,mnt,lib/modules}
  mkdir -p "$root"/{lib64,lib/x86_64-linux-gnu,var/lib,var/log}
  cp "$(command -v busybox)" "$root/bin/busybox"
  for applet in $(busybox --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  ln -sf /run "$root/var/run"
}

modules_in_load_order() {  # module names -> .ko paths, dependencies first, each once
  local mod
  for mod in "$@"; do modprobe -d "$X" -S "$KVER" --show-depends "$mod"; done |
    awk '$1 == "insmod" && !seen[$2]++ {print $2}'
}

pack() { (cd "$1" && find . | cpio -H newc -o --quiet); }

# 3. guest initramfs: busybox + xen-blkfront (+ loop, xen-blkback for a driver domain) + guest/init
guest=$work/guest-root
new_root "$guest"
modules_in_load_order xen-blkfront | while read -r ko; do
  cp "$ko" "$guest/lib/modules/"; basename "$ko" >>"$guest/etc/modules.order"
done
# a driver domain (xenlab.driver=...): loop and xen-blkback, loaded only in that mode
modules_in_load_order loop xen-blkback | while read -r ko; do
  grep -qxF "$(basename "$ko")" "$guest/etc/modules.order" && continue
  cp "$ko" "$guest/lib/modules/"; basename "$ko" >>"$guest/etc/modules.driver"
done
install -m 0755 "$LAB_SRC/guest/init" "$guest/init"
pack "$guest" >"$work/out/guest.cpio"

# 4. dom0 initramfs
dom0=$work/dom0-root
new_root "$dom0"
xenbin=/usr/lib/xen-$XEN_VERSION/bin
mkdir -p "$dom0$xenbin" "$dom0/etc/xen" "$dom0/var/lib/xen" "$dom0/var/lib/xenstored" \
  "$dom0/var/log/xen/console" "$dom0/usr/share/xenlab"
for b in xl xenstored oxenstored xenconsoled xen-init-dom0 libxl-save-helper xenconsole; do
  [ -e "$X$xenbin/$b" ] && cp "$X$xenbin/$b" "$dom0$xenbin/"
done
for b in xenstore xenstore-read xenstore-write xenstore-list xenstore-ls xenstore-rm \
         xenstore-exists xenstore-chmod xenstore-watch; do
  cp -a "$X/usr/bin/$b" "$dom0/usr/bin/"
done
cp -a "$X/etc/xen/scripts" "$dom0/etc/xen/"
cp "$X/etc/xen/xl.conf" "$dom0/etc/xen/"
# The stock block script needs bash and flock (busybox-static has neither); a real Debian dom0
# runs it with util-linux's losetup, so the lab does too.
cp /bin/bash "$dom0/usr/bin/bash"; ln -sf ../usr/bin/bash "$dom0/bin/bash"
cp /usr/bin/flock "$dom0/usr/bin/flock"
rm -f "$dom0/sbin/losetup" "$dom0/bin/losetup"; cp /sbin/losetup "$dom0/sbin/losetup"
binaries=("$dom0$xenbin"/* "$dom0/usr/bin/xenstore" "$dom0/usr/bin/bash" "$dom0/usr/bin/flock"
          "$dom0/sbin/losetup")
LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu ldd "${binaries[@]}" 2>/dev/null |
  awk '/=> \// {print $3}' | sort -u | while read -r lib; do
    cp -L "$lib" "$dom0/lib/x86_64-linux-gnu/"
  done
cp -L /lib64/ld-linux-x86-64.so.2 "$dom0/lib64/"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$dom0/lib/x86_64-linux-gnu/"  # xl: pthread_cancel dlopen()s it
# dm-thin-pool's crc32c: the generic one; crc32c-intel (pulled in by libcrc32c's softdep) needs
# SSE4.2, which the lab's qemu64 CPU lacks (insmod: No such device)
modules_in_load_order xen-evtchn xen-gntdev xen-gntalloc xenfs xen-blkback xen-blkfront loop \
    crc32c_generic dm-mod dm-thin-pool virtio_pci 9pnet_virtio 9p |
  grep -v '/crc32c-intel\.ko$' | while read -r ko; do
  cp "$ko" "$dom0/lib/modules/"; basename "$ko" >>"$dom0/etc/modules.order"
done
cp "$work/out/vmlinux.gz" "$dom0/usr/share/xenlab/guest-vmlinux.gz"
cp "$work/out/guest.cpio" "$dom0/usr/share/xenlab/guest.cpio"
install -m 0755 "$LAB_SRC/dom0/init" "$dom0/init"
pack "$dom0" >"$work/out/dom0.cpio"

# 5. publish atomically: the inputs file is written last, so a half build is never reused
echo "$new_inputs" >"$work/out/inputs.pending"
rm -rf "$IMAGES.old"; [ -d "$IMAGES" ] && mv "$IMAGES" "$IMAGES.old"
rm -f "$work/out/vmlinux.gz" "$work/out/guest.cpio"
mv "$work/out" "$IMAGES"
mv "$IMAGES/inputs.pending" "$IMAGES/inputs"
rm -rf "$IMAGES.old"
log "built $IMAGES in $(awk -v a="$EPOCHREALTIME" -v b="$started" 'BEGIN {printf "%.1f", a - b}') s"
ls -l "$IMAGES" >&2
