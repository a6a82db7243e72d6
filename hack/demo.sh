#!/usr/bin/env bash
# make demo: starts a real NBD server (nbdkit, file plugin serving a directory
# of disk images as a pool of exports) on a unix socket in a temp dir and shows
# what nbd-csi does with it: list the pool, probe each export, then walk a
# volume through the CSI node services on a real kernel (the host's when it
# has nbd, else Debian's in a QEMU VM).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
BIN=${BIN:-bin/nbd-csi}
hack/install-deps.sh demo # make demo ran it already; this is for hack/demo.sh run by hand

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Creating a pool of three sparse disk images in $work/pool"
mkdir -p "$work/pool"
truncate -s 1G "$work/pool/small"
truncate -s 4G "$work/pool/medium"
truncate -s 16G "$work/pool/large"
ls -ls "$work/pool"

sock="$work/nbd.sock"
step "Starting nbdkit (file plugin, one export per image) on $sock"
nbdkit --foreground --exit-with-parent -U "$sock" file dir="$work/pool" &
pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "demo: nbdkit did not start"; exit 1; }

server="nbd+unix:///?socket=$sock"
step "nbd-csi list $server"
"$BIN" list "$server"

for e in small medium large; do
	step "nbd-csi probe nbd+unix:///$e?socket=$sock"
	"$BIN" probe "nbd+unix:///$e?socket=$sock"
done

step "nbd-csi probe --json (machine-readable, fields in docs/cli.md)"
"$BIN" probe --json "nbd+unix:///small?socket=$sock"

step "An export that does not exist gives a one-line error and exit status 1"
set +e
"$BIN" probe "nbd+unix:///missing?socket=$sock"
echo "exit status: $?"
set -e

step "Volume lifecycle through the CSI services (provision, publish, stage, write, read back, unstage, unpublish, delete)"
bindir="$work/bin"
mkdir -p "$bindir"
CGO_ENABLED=0 go build -o "$bindir/nbd-csi" ./cmd/nbd-csi
CGO_ENABLED=0 go build -o "$bindir/demo-lifecycle" ./hack/demo-lifecycle
if [ "$(id -u)" = 0 ] && { [ -d /sys/module/nbd ] || modprobe nbd 2>/dev/null; }; then
	echo "The host kernel has nbd: running here."
	hack/demo-lifecycle.sh "$bindir/nbd-csi" "$bindir/demo-lifecycle"
else
	echo "The host kernel has no nbd driver: running in a QEMU VM with Debian's kernel (test/vm)."
	go run ./test/vm/cmd/vmrun -timeout 5m \
		-file "$bindir/nbd-csi:/bin/nbd-csi" -file "$bindir/demo-lifecycle:/bin/demo-lifecycle" \
		-file "hack/demo-lifecycle.sh:/bin/demo-lifecycle.sh" \
		-- 'modprobe nbd && /bin/demo-lifecycle.sh /bin/nbd-csi /bin/demo-lifecycle'
fi

step "Done."
