#!/usr/bin/env bash
# Runs the real-kernel test suites in one QEMU VM (test/vm): each package's
# tests are compiled on the host and run as root inside the guest, where the
# nbd module, real servers, mkfs and mount are available.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
VM_TIMEOUT=${VM_TIMEOUT:-40m}
# Kernel suites as "package:-test.run pattern": the TestKernel* suites, and
# csi-sanity with the real node, in-process, against the `nbd-csi serve`
# binary and in-process with encrypted volumes (ginkgo runs once per
# process, hence three runs of test/sanity).
suites=(
	"./pkg/device:^TestKernel"
	"./test/kernel:^TestKernel"
	"./test/sanity:^TestSanity\$"
	"./test/sanity:^TestSanityBinary\$"
	"./test/sanity:^TestSanityEncrypted\$"
)

# The plugin binary, for tests that run `nbd-csi serve` as a process.
# aesni-intel provides gcm(aes) to the kernel's TLS layer; on a real node
# udev loads it at boot (CPU modalias), in the VM nothing does.
bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$bindir/nbd-csi" ./cmd/nbd-csi
args=(-file "$bindir/nbd-csi:/bin/nbd-csi" -env NBDCSI_BIN=/bin/nbd-csi)
script="modprobe nbd nbds_max=16 max_part=0 && modprobe unix_diag && modprobe inet_diag && modprobe tcp_diag && { modprobe aesni-intel || modprobe gcm; }"
declare -A built=()
for suite in "${suites[@]}"; do
	p=${suite%%:*}
	pattern=${suite#*:}
	name=$(basename "$p")
	if [ -z "${built[$p]:-}" ]; then
		args+=(-gotest "$p")
		built[$p]=1
	fi
	script+=" && echo '=== $name $pattern' && /bin/$name.test -test.v -test.timeout ${VM_TIMEOUT} -test.run '$pattern'"
done
start=$(date +%s)
go run ./test/vm/cmd/vmrun -timeout "$VM_TIMEOUT" -mem 3072 "${args[@]}" -- "$script"
echo "vm-test: kernel suites passed in $(( $(date +%s) - start ))s"
