#!/usr/bin/env bash
# Builds the nbd-csi release image for one architecture without a container
# engine, as a docker-archive tar (`docker load`, `ctr images import`,
# `kind load image-archive` read it): what the Dockerfile builds —
# debian:bookworm-slim plus e2fsprogs, xfsprogs, util-linux, mount, kmod,
# cryptsetup-bin, ca-certificates and nbdkit, the binary as /usr/bin/nbd-csi,
# user 65532 — from Debian's archive and test/e2e/tools/mkimage.
#
#   hack/release-image.sh ARCH BINARY VERSION COMMIT OUT.tar
#
# The Debian root filesystem is made by debootstrap's first stage for ARCH
# (no emulator needed: packages are unpacked, not configured) and cached in
# .cache/release per architecture and package list; what the skipped
# maintainer scripts would have made is done here (users and groups, /bin/sh,
# the CA bundle). Needs root (debootstrap). hack/release.sh calls it where
# docker buildx is missing; the release workflow builds with buildx.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ $# -eq 5 ] || { echo "usage: $0 ARCH BINARY VERSION COMMIT OUT.tar" >&2; exit 2; }
arch=$1 bin=$(realpath "$2") version=$3 commit=$4 out=$(realpath -m "$5")
case $arch in amd64 | arm64) ;; *) echo "release-image: ARCH $arch: want amd64 or arm64" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "release-image: needs root (debootstrap); run as root or build with docker buildx" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "release-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
# The Dockerfile's package list.
packages=e2fsprogs,xfsprogs,util-linux,mount,kmod,cryptsetup-bin,ca-certificates,nbdkit
cache=$PWD/.cache/release
tarball=$cache/rootfs-$arch-$(echo "$packages" | sha256sum | cut -c1-12).tar
mkdir -p "$cache"
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

if [ ! -f "$tarball" ]; then
	echo "release-image: debootstrap of bookworm $arch (once)" >&2
	if ! debootstrap --foreign --arch="$arch" --variant=minbase --include="$packages" \
		bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1; then
		tail -20 "$work/debootstrap.log" >&2
		echo "release-image: debootstrap failed" >&2
		exit 1
	fi
	# Unpack every downloaded package (the first stage unpacked only the
	# required ones), through the merged-/usr symlinks.
	for deb in "$root"/var/cache/apt/archives/*.deb; do
		dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
	done
	# What maintainer scripts would have done.
	cp "$root/usr/share/base-passwd/passwd.master" "$root/etc/passwd"
	cp "$root/usr/share/base-passwd/group.master" "$root/etc/group"
	ln -sf dash "$root/usr/bin/sh"
	mkdir -p "$root/etc/ssl/certs"
	(cd "$root/usr/share/ca-certificates" && find . -name '*.crt' | sort | sed 's#^\./##') > "$root/etc/ca-certificates.conf"
	(cd "$root/usr/share/ca-certificates" && find . -name '*.crt' | sort | xargs cat) > "$root/etc/ssl/certs/ca-certificates.crt"
	# bookworm-slim leaves out documentation, and a container needs no
	# package caches or debootstrap's state.
	rm -rf "$root/debootstrap" "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/* \
		"$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/locale"
	tar -C "$root" -cf "$tarball.new" . && mv "$tarball.new" "$tarball"
	rm -rf "$root"
fi
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
# The runtime mounts /proc, /sys and /dev on empty directories, and runc
# refuses anything else ("must be mounted on ordinary directory"; mkimage
# checks): debootstrap leaves /proc a symlink to the host's when it
# believes it runs in a container, and device nodes in /dev.
for d in proc sys dev; do
	rm -rf "${root:?}/$d"
	mkdir -m 0755 "$root/$d"
done
install -m 0755 "$bin" "$root/usr/bin/nbd-csi"
for f in nbdkit mkfs.ext4 mkfs.xfs cryptsetup blkid mount modprobe; do
	[ -L "$root/usr/bin/$f" ] || [ -e "$root/usr/bin/$f" ] || [ -L "$root/usr/sbin/$f" ] || [ -e "$root/usr/sbin/$f" ] ||
		{ echo "release-image: $f missing from the $arch root filesystem" >&2; exit 1; }
done
(cd test/e2e && go run ./tools/mkimage -name "ghcr.io/nbd-csi/nbd-csi:$version" -rootfs "$root" -arch "$arch" \
	-entrypoint '["/usr/bin/nbd-csi"]' -user 65532:65532 \
	-label org.opencontainers.image.title=nbd-csi \
	-label org.opencontainers.image.source=https://github.com/nbd-csi/nbd-csi \
	-label org.opencontainers.image.licenses=Apache-2.0 \
	-label "org.opencontainers.image.version=$version" \
	-label "org.opencontainers.image.revision=$commit" \
	-out "$out")
echo "release-image: $out ($arch)" >&2
