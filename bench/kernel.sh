#!/usr/bin/env bash
# Kernel benchmarks in the test/vm VM: nbd-csi attach and data path against
# nbd-client on the same nbdkit export, same run. Usage: bench/kernel.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT
CGO_ENABLED=0 go build -o "$bindir/nbd-csi" ./cmd/nbd-csi
go run ./test/vm/cmd/vmrun -timeout 10m -mem 3072 -file "$bindir/nbd-csi:/bin/nbd-csi" \
	-file bench/kernel-guest.sh:/bin/kernel-guest.sh -- 'modprobe nbd nbds_max=16 max_part=0 && /bin/kernel-guest.sh' \
	| sed -n '/BENCH-BEGIN/,/BENCH-END/p' | grep -v BENCH-
echo
echo "| NodeStage | nbd-csi | nbd-client + mkfs.ext4 + mount | ratio |"
echo "|---|---:|---:|---:|"
go run ./test/vm/cmd/vmrun -timeout 15m -mem 4096 -env NBDCSI_BENCH=1 -gotest ./test/kernel -- \
	'modprobe nbd nbds_max=128 max_part=0 && /bin/kernel.test -test.run TestKernelBenchStage -test.timeout 14m' \
	| sed -n 's/^BENCH| /| /p'
echo
echo "| block volume, 256 MiB export | plain | encrypted | encrypted/plain |"
echo "|---|---:|---:|---:|"
go run ./test/vm/cmd/vmrun -timeout 15m -mem 3072 -env NBDCSI_BENCH=1 -gotest ./test/kernel -- \
	'modprobe nbd nbds_max=16 max_part=0 && /bin/kernel.test -test.run TestKernelBenchEncrypted -test.timeout 14m' \
	| sed -n 's/^BENCH| /| /p' | tail -n +2
