#!/usr/bin/env bash
# Kernel benchmarks in the test/vm VM: nbd-csi attach, probe and data path
# against nbd-client and nbdinfo on the same nbdkit export, NodeStage
# against nbd-client + mkfs + mount, encrypted against plain volumes, and
# the breakdown of attach and stage (TestKernelBenchBreakdown); every
# comparison in the same run. Ends with each ratio that has a target, and a
# MISSED line for each target missed (exit status 0 all the same; 3 with
# BENCH_STRICT=1).
#
# Usage: bench/kernel.sh [PART...]   parts: attach stage encrypted breakdown
# (default: all). NBDCSI_BENCH_BIN=FILE measures that nbd-csi binary
# instead of building this tree's (the in-process rows stay this tree's). The date and the host's load average are printed before
# and after each part: the VM runs under TCG on a shared host, so only
# ratios measured in the same run compare.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(attach stage encrypted breakdown)
bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT
if [ -n "${NBDCSI_BENCH_BIN:-}" ]; then
	# Another build of nbd-csi (e.g. an older commit's, for a before/after
	# table); the guest scripts and tests are this tree's.
	cp "$NBDCSI_BENCH_BIN" "$bindir/nbd-csi"
else
	CGO_ENABLED=0 go build -trimpath -o "$bindir/nbd-csi" ./cmd/nbd-csi
fi
CGO_ENABLED=0 go build -trimpath -o "$bindir/gofloor" ./bench/gofloor
ratios=$bindir/ratios
: > "$ratios"
load() { echo "_$(date -u '+%Y-%m-%d %H:%M UTC'), host load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs ($1)_"; }
# vm SCRIPT ARGS...: run in the VM, print its BENCH/BREAKDOWN rows, keep its RATIO rows.
vm() {
	local script=$1 out
	shift
	out=$(go run ./test/vm/cmd/vmrun "$@" -file "$bindir/nbd-csi:/bin/nbd-csi" -env NBDCSI_BIN=/bin/nbd-csi \
		-file "$bindir/gofloor:/bin/gofloor" -env NBDCSI_GOFLOOR=/bin/gofloor -- "$script")
	grep '^RATIO| ' <<<"$out" >> "$ratios" || true
	sed -n -e '/BENCH-BEGIN/,/BENCH-END/{/BENCH-/d;p}' -e 's/^BENCH| /| /p' -e 's/^BREAKDOWN| /| /p' <<<"$out"
}
for part in "${parts[@]}"; do
	echo
	load "before $part"
	echo
	case $part in
	attach)
		vm 'modprobe nbd nbds_max=16 max_part=0 && /bin/kernel-guest.sh' -timeout 15m -mem 3072 \
			-file bench/kernel-guest.sh:/bin/kernel-guest.sh
		;;
	stage)
		echo "| NodeStage | nbd-csi | nbd-client + mkfs.ext4 + mount | ratio |"
		echo "|---|---:|---:|---:|"
		vm 'modprobe nbd nbds_max=128 max_part=0 && /bin/kernel.test -test.run "^TestKernelBenchStage$" -test.timeout 19m' \
			-timeout 20m -mem 4096 -env NBDCSI_BENCH=1 -gotest ./test/kernel
		;;
	encrypted)
		echo "| block volume, 256 MiB export | plain | encrypted | encrypted/plain |"
		echo "|---|---:|---:|---:|"
		vm 'modprobe nbd nbds_max=16 max_part=0 && /bin/kernel.test -test.run "^TestKernelBenchEncrypted$" -test.timeout 14m' \
			-timeout 15m -mem 3072 -env NBDCSI_BENCH=1 -gotest ./test/kernel | tail -n +2
		;;
	breakdown)
		echo "| step (median of 9) | ms | note |"
		echo "|---|---:|---|"
		vm 'modprobe nbd nbds_max=16 max_part=0 && /bin/kernel.test -test.run "^TestKernelBenchBreakdown$" -test.timeout 19m' \
			-timeout 20m -mem 3072 -env NBDCSI_BENCH=1 -gotest ./test/kernel
		;;
	*)
		echo "bench/kernel.sh: unknown part $part (attach stage encrypted breakdown)" >&2
		exit 2
		;;
	esac
	echo
	load "after $part"
done

echo
echo "| ratio (same run) | measured | target | |"
echo "|---|---:|---:|---|"
missed=0
while IFS='|' read -r _ name value target _; do
	name=$(echo $name) value=$(echo $value) target=$(echo $target)
	if awk -v v="$value" -v t="$target" 'BEGIN { exit !(v != "n/a" && v + 0 <= t + 0) }'; then
		echo "| $name | $value | ≤ $target | met |"
	else
		echo "| $name | $value | ≤ $target | **missed** |"
		missed=$((missed + 1))
	fi
done < "$ratios"
grep -q . "$ratios" || { echo "bench/kernel.sh: no ratios came back from the VM" >&2; exit 1; }
while IFS='|' read -r _ name value target _; do
	if ! awk -v v="$(echo $value)" -v t="$(echo $target)" 'BEGIN { exit !(v != "n/a" && v + 0 <= t + 0) }'; then
		echo "MISSED: $(echo $name) = $(echo $value), target ≤ $(echo $target)"
	fi
done < "$ratios"
if [ "$missed" -gt 0 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then
	exit 3
fi
