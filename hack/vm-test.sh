#!/usr/bin/env bash
# Runs the real-kernel test suites in one QEMU VM (test/vm): each package's
# tests are compiled on the host and run as root inside the guest, where the
# nbd module, real servers, mkfs and mount are available.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
VM_TIMEOUT=${VM_TIMEOUT:-25m}
# Packages with kernel tests, each with its -test.run pattern: the
# TestKernel* suites, and csi-sanity with the real node (test/sanity uses the
# real attacher and mounter where the kernel has nbd).
pkgs=(./pkg/device ./test/kernel ./test/sanity)
declare -A run=([./pkg/device]='^TestKernel' [./test/kernel]='^TestKernel' [./test/sanity]='^TestSanity$')

# The plugin binary, for tests that run `nbd-csi serve` as a process.
bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT
CGO_ENABLED=0 go build -o "$bindir/nbd-csi" ./cmd/nbd-csi
args=(-file "$bindir/nbd-csi:/bin/nbd-csi" -env NBDCSI_BIN=/bin/nbd-csi)
script="modprobe nbd nbds_max=16 max_part=0"
for p in "${pkgs[@]}"; do
	args+=(-gotest "$p")
	name=$(basename "$p")
	script+=" && echo '=== $name' && /bin/$name.test -test.v -test.timeout ${VM_TIMEOUT} -test.run '${run[$p]}'"
done
start=$(date +%s)
go run ./test/vm/cmd/vmrun -timeout "$VM_TIMEOUT" -mem 3072 "${args[@]}" -- "$script"
echo "vm-test: kernel suites passed in $(( $(date +%s) - start ))s"
