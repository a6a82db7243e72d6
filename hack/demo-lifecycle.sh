#!/bin/sh
# The volume-lifecycle half of `make demo`, run where the kernel has nbd:
# on the host, or (by hack/demo.sh) as root inside the test/vm VM. Starts a
# real nbdkit serving a pool of disk images, `nbd-csi serve`, and walks one
# volume through the CSI services. Arguments: NBD_CSI_BIN DEMO_CLIENT_BIN.
set -eu
bin=$1
client=$2
work=$(mktemp -d)
cleanup() {
	[ -n "${serve:-}" ] && kill "$serve" 2>/dev/null
	[ -n "${kit:-}" ] && kill "$kit" 2>/dev/null
	wait 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$work/pool" "$work/kubelet"
for n in 1 2 3; do truncate -s 1G "$work/pool/disk$n"; done
# wipeOnDelete is not asked for: the demo pool is fresh sparse files
sock=$work/nbd.sock
nbdkit --foreground --exit-with-parent -U "$sock" file dir="$work/pool" &
kit=$!
"$bin" serve --mode=all --endpoint="unix://$work/csi.sock" --node-id=demo-node \
	--kubelet-dir="$work/kubelet" --state-dir="$work/state" --store-path="$work/store.db" >"$work/serve.log" 2>&1 &
serve=$!
i=0
while [ ! -S "$sock" ] || [ ! -S "$work/csi.sock" ]; do
	i=$((i + 1))
	[ $i -gt 100 ] && { echo "demo: servers did not start"; cat "$work/serve.log"; exit 1; }
	sleep 0.1
done
echo "==> nbdkit serves the pool disk1..disk3 (1 GiB each) on $sock; nbd-csi serve (controller + node) on $work/csi.sock"
if ! "$client" --endpoint="unix://$work/csi.sock" --kubelet-dir="$work/kubelet" --server="nbd+unix:///?socket=$sock" --size=$((512 << 20)); then
	echo "--- nbd-csi serve log"; cat "$work/serve.log"; exit 1
fi
