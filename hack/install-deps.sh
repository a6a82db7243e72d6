#!/usr/bin/env bash
# hack/install-deps.sh GROUP...: makes sure the Debian packages a make
# target needs are installed. The one list of the project's system
# packages: `make test`, `make demo`, .ci/run and the e2e vm provider
# (test/e2e/vm/cluster.sh) all call this script.
#
# Groups:
#   vm      the real-kernel VM rig (test/vm): QEMU, busybox, cpio, kmod,
#           cryptsetup (encrypted volumes; pkg/crypt tests it on the host), and
#           the servers, clients and file system tools copied into the guest
#   demo    make demo: nbdkit and the VM rig (for hosts without nbd)
#   test    make test: the VM rig, a C compiler for -race, openssl, etcd, GNU time
#           (the Kubernetes store's tests), strace (which bytes blkid reads:
#           pkg/driver's blank-device tests), git, make, and procps (pgrep
#           and ps: .ci/run, which test/scripts runs, stops its jobs with them)
#   e2e-vm  make e2e E2E_PROVIDER=vm: the VM rig plus debootstrap, etcd,
#           socat, iproute2, python3, curl, xz (test/e2e/vm/cluster.sh),
#           dnsmasq (the cluster DNS of test/e2e/quickstart.sh), procps
#           (pgrep: cluster.sh stops what it started, .ci/run its jobs)
#
# Only packages that are missing are installed. As root: apt-get update,
# then apt-get install of those. Otherwise it prints the one command to run
# and exits 1. With every package present it does nothing (and needs no root).
set -euo pipefail

packages() {
	case $1 in
	vm)
		echo qemu-system-x86 qemu-utils busybox-static cpio kmod libc-bin \
			nbdkit nbd-server nbd-client libnbd-bin \
			e2fsprogs xfsprogs util-linux mount coreutils cryptsetup-bin libgcc-s1
		;;
	demo)
		packages vm
		;;
	test)
		packages vm
		echo gcc libc6-dev openssl ca-certificates git make etcd-server time strace procps
		;;
	e2e-vm)
		packages vm
		echo debootstrap etcd-server openssl ca-certificates socat iproute2 python3 curl xz-utils gzip git dnsmasq-base procps
		;;
	*)
		return 1
		;;
	esac
}

if [ $# -eq 0 ]; then
	echo "usage: $0 GROUP... (groups: vm demo test e2e-vm)" >&2
	exit 2
fi
want=()
for g in "$@"; do
	list=$(packages "$g") || { echo "install-deps: unknown group '$g' (groups: vm demo test e2e-vm)" >&2; exit 2; }
	# shellcheck disable=SC2206 # word splitting of the package list is intended
	want+=($list)
done

if ! command -v dpkg-query >/dev/null; then
	echo "install-deps: no dpkg-query: not a Debian-family system; install the equivalents of: ${want[*]}" >&2
	exit 1
fi

# One dpkg-query for all: it prints a line per known package (and complains
# on stderr about unknown ones, which are missing too).
declare -A installed=()
while read -r name status; do
	[ "$status" = "install ok installed" ] && installed[${name%%:*}]=1
done < <(dpkg-query -W -f='${Package} ${Status}\n' "${want[@]}" 2>/dev/null || true)
missing=()
declare -A seen=()
for p in "${want[@]}"; do
	[ -z "${seen[$p]:-}" ] || continue
	seen[$p]=1
	[ -n "${installed[$p]:-}" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	{
		echo "install-deps: missing Debian packages: ${missing[*]}"
		echo "Run as root:"
		echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
	} >&2
	exit 1
fi

echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
