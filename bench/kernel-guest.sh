#!/bin/sh
# Runs inside the test/vm VM (bench/kernel.sh puts it there): attach latency,
# sequential throughput and stage time of nbd-csi against nbd-client on the
# same nbdkit export, and `nbd-csi probe` against `nbdinfo --size`, in the
# same run. Prints a Markdown table and RATIO lines (ratio and target).
set -eu
bin=/bin/nbd-csi
N=${BENCH_N:-15}
work=$(mktemp -d)
sock=$work/nbd.sock
nbdkit --foreground --exit-with-parent -U "$sock" memory size=1G &
kit=$!
while [ ! -S "$sock" ]; do sleep 0.05; done
uri="nbd+unix:///?socket=$sock"
now() { /bin/date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Attach latency: process start to usable device, then detach, N times.
: > "$work/ours"; : > "$work/ref"
for i in $(seq "$N"); do
	t0=$(now); dev=$("$bin" attach --id "b$i" "$uri"); t1=$(now)
	echo $(( (t1 - t0) / 1000 )) >> "$work/ours"
	"$bin" detach --id "b$i"
	t0=$(now); nbd-client -unix "$sock" /dev/nbd5 -b 512 >/dev/null 2>&1; t1=$(now)
	echo $(( (t1 - t0) / 1000 )) >> "$work/ref"
	nbd-client -d /dev/nbd5 >/dev/null 2>&1
done
a_ours=$(median < "$work/ours"); a_ref=$(median < "$work/ref")

# Sequential 1 MiB O_DIRECT throughput over 256 MiB (MB/s).
tput() { # dev dir
	if [ "$2" = w ]; then
		/bin/dd if=/dev/zero of="$1" bs=1M count=256 oflag=direct 2>&1 | awk '/copied/ {print $(NF-1)}'
	else
		/bin/dd if="$1" of=/dev/null bs=1M count=256 iflag=direct 2>&1 | awk '/copied/ {print $(NF-1)}'
	fi
}
# Warm-up: nbdkit's memory plugin allocates on first write, so the first
# writer would pay for it; fill the range once before measuring.
nbd-client -unix "$sock" /dev/nbd5 -b 512 >/dev/null 2>&1; tput /dev/nbd5 w >/dev/null; nbd-client -d /dev/nbd5 >/dev/null 2>&1
dev=$("$bin" attach --id tput "$uri"); w_ours=$(tput "$dev" w); r_ours=$(tput "$dev" r); "$bin" detach --id tput
nbd-client -unix "$sock" /dev/nbd5 -b 512 >/dev/null 2>&1; w_ref=$(tput /dev/nbd5 w); r_ref=$(tput /dev/nbd5 r); nbd-client -d /dev/nbd5 >/dev/null 2>&1
dev=$("$bin" attach --id tput4 --connections 4 "$uri"); w_ours4=$(tput "$dev" w); r_ours4=$(tput "$dev" r); "$bin" detach --id tput4
nbd-client -unix "$sock" /dev/nbd5 -b 512 -C 4 >/dev/null 2>&1; w_ref4=$(tput /dev/nbd5 w); r_ref4=$(tput /dev/nbd5 r); nbd-client -d /dev/nbd5 >/dev/null 2>&1

# One `nbd-csi probe` process against one `nbdinfo --size` process, unix
# socket and TCP loopback, alternating, median of N each (µs).
port=10809
nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" memory size=1G &
kit_tcp=$!
until nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1; do sleep 0.05; done
probe() { # uri -> "ours ref" medians in µs
	: > "$work/p_ours"; : > "$work/p_ref"
	for i in $(seq "$N"); do
		t0=$(now); "$bin" probe "$1" >/dev/null; t1=$(now)
		echo $(( (t1 - t0) / 1000 )) >> "$work/p_ours"
		t0=$(now); nbdinfo --size "$1" >/dev/null; t1=$(now)
		echo $(( (t1 - t0) / 1000 )) >> "$work/p_ref"
	done
	echo "$(median < "$work/p_ours") $(median < "$work/p_ref")"
}
set -- $(probe "$uri"); p_unix_ours=$1; p_unix_ref=$2
set -- $(probe "nbd://127.0.0.1:$port"); p_tcp_ours=$1; p_tcp_ref=$2
kill $kit_tcp

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
msf() { awk -v x="$1" 'BEGIN{printf "%.1f", x/1000}'; }
echo "BENCH-BEGIN"
echo "| measure | nbd-csi | nbd-client | ratio |"
echo "|---|---:|---:|---:|"
echo "| attach latency, median of $N (ms) | $(msf "$a_ours") | $(msf "$a_ref") | $(ratio "$a_ours" "$a_ref") |"
echo "| probe process vs \`nbdinfo --size\`, unix, median of $N (ms) | $(msf "$p_unix_ours") | $(msf "$p_unix_ref") | $(ratio "$p_unix_ours" "$p_unix_ref") |"
echo "| probe process vs \`nbdinfo --size\`, TCP, median of $N (ms) | $(msf "$p_tcp_ours") | $(msf "$p_tcp_ref") | $(ratio "$p_tcp_ours" "$p_tcp_ref") |"
echo "| write 1 MiB O_DIRECT, 1 connection (MB/s) | $w_ours | $w_ref | $(ratio "$w_ours" "$w_ref") |"
echo "| read 1 MiB O_DIRECT, 1 connection (MB/s) | $r_ours | $r_ref | $(ratio "$r_ours" "$r_ref") |"
echo "| write, 4 connections (MB/s) | $w_ours4 | $w_ref4 | $(ratio "$w_ours4" "$w_ref4") |"
echo "| read, 4 connections (MB/s) | $r_ours4 | $r_ref4 | $(ratio "$r_ours4" "$r_ref4") |"
echo "| write, 4 vs 1 connection (nbd-csi) | | | $(ratio "$w_ours4" "$w_ours") |"
echo "| read, 4 vs 1 connection (nbd-csi) | | | $(ratio "$r_ours4" "$r_ours") |"
echo "BENCH-END"
# Ratios with a target (bench/kernel.sh checks them).
echo "RATIO| attach, nbd-csi / nbd-client | $(ratio "$a_ours" "$a_ref") | 0.8 |"
echo "RATIO| probe process / nbdinfo --size, unix | $(ratio "$p_unix_ours" "$p_unix_ref") | 1.0 |"
echo "RATIO| probe process / nbdinfo --size, TCP | $(ratio "$p_tcp_ours" "$p_tcp_ref") | 1.0 |"
kill $kit
