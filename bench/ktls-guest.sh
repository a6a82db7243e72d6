#!/bin/sh
# Runs inside the test/vm VM (bench/ktls.sh puts it there): 1 MiB O_DIRECT
# sequential throughput and client CPU per GiB on one TLS export of nbdkit
# (x509, TCP), same run: nbd-csi with kernel TLS, nbd-csi with its relay,
# and nbd-client's own TLS (GnuTLS in a forked userspace proxy). Client CPU
# is the run time of every task in the VM (/proc/schedstat, ns) minus
# nbdkit's own (/proc/PID/schedstat): both count the same way, so the
# client's share (dd, kernel workers, the relay or nbd-client's proxy) is
# what is left. Prints a Markdown table.
set -eu
bin=/bin/nbd-csi
certs=/certs
MB=${BENCH_MB:-128}
work=$(mktemp -d)
port=10809
nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p $port --tls=require --tls-certificates=$certs memory size=1G &
kit=$!
sleep 1
uri="nbds://127.0.0.1:$port/"
busy() { awk '/^cpu[0-9]/ {s += $8} END {printf "%.0f\n", s}' /proc/schedstat; }
kitcpu() { awk '{print $1}' /proc/$kit/schedstat; }

# run DEV w|r → "MB/s client-cpu-seconds-per-GiB"
run() {
	b0=$(busy); k0=$(kitcpu); t0=$(/bin/date +%s%N)
	if [ "$2" = w ]; then
		dd if=/dev/zero of="$1" bs=1M count=$MB oflag=direct 2>/dev/null
	else
		dd if="$1" of=/dev/null bs=1M count=$MB iflag=direct 2>/dev/null
	fi
	t1=$(/bin/date +%s%N); b1=$(busy); k1=$(kitcpu)
	awk -v mb=$MB -v ns=$((t1 - t0)) -v cl=$(( (b1 - b0) - (k1 - k0) )) \
		'BEGIN { printf "%.1f %.2f\n", mb / (ns / 1e9) * 1.048576, cl / 1e9 / (mb / 1024) }'
}

measure() { # name dev
	w=$(run "$2" w); r=$(run "$2" r)
	echo "$1 $w $r" >> "$work/results"
}

# Warm-up: the memory plugin allocates on first write.
dev=$("$bin" attach --tls=kernel --tls-ca $certs/ca-cert.pem --id warm "$uri"); run "$dev" w >/dev/null; "$bin" detach --id warm

: > "$work/results"
dev=$("$bin" attach --tls=kernel --tls-ca $certs/ca-cert.pem --id ktls "$uri")
measure kernel "$dev"
"$bin" detach --id ktls

"$bin" attach --tls=relay --tls-ca $certs/ca-cert.pem --id relay "$uri" > "$work/relaydev" 2>/dev/null &
relay=$!
while [ ! -s "$work/relaydev" ]; do sleep 0.1; done
measure relay "$(cat "$work/relaydev")"
kill -TERM $relay; wait $relay 2>/dev/null || true

nbd-client 127.0.0.1 $port /dev/nbd5 -N "" -b 512 -A $certs/ca-cert.pem -H 127.0.0.1 -x >/dev/null 2>&1
measure nbd-client /dev/nbd5
nbd-client -d /dev/nbd5 >/dev/null 2>&1

get() { awk -v n="$1" -v f="$2" '$1 == n {print $f}' "$work/results"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
echo "BENCH-BEGIN"
echo "| $MB MiB, 1 MiB O_DIRECT, TLS export | kernel TLS | relay | nbd-client TLS | kTLS/relay | kTLS/nbd-client | target (kTLS/relay) |"
echo "|---|---:|---:|---:|---:|---:|---|"
echo "| write (MB/s) | $(get kernel 2) | $(get relay 2) | $(get nbd-client 2) | $(ratio "$(get kernel 2)" "$(get relay 2)") | $(ratio "$(get kernel 2)" "$(get nbd-client 2)") | ≥ 1.5 |"
echo "| read (MB/s) | $(get kernel 4) | $(get relay 4) | $(get nbd-client 4) | $(ratio "$(get kernel 4)" "$(get relay 4)") | $(ratio "$(get kernel 4)" "$(get nbd-client 4)") | ≥ 1.5 |"
echo "| write, client CPU (s/GiB) | $(get kernel 3) | $(get relay 3) | $(get nbd-client 3) | $(ratio "$(get kernel 3)" "$(get relay 3)") | $(ratio "$(get kernel 3)" "$(get nbd-client 3)") | ≤ 0.5 |"
echo "| read, client CPU (s/GiB) | $(get kernel 5) | $(get relay 5) | $(get nbd-client 5) | $(ratio "$(get kernel 5)" "$(get relay 5)") | $(ratio "$(get kernel 5)" "$(get nbd-client 5)") | ≤ 0.5 |"
echo "BENCH-END"
kill $kit
