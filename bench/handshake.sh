#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# bench/handshake.sh — connect→ready cost of the nbd-csi NBD client compared
# with libnbd's nbdinfo, on one nbdkit memory export reached over a unix
# socket and over TCP loopback, all in the same run.
#
# It measures:
#   1. in process (go test -bench BenchmarkHandshake, pkg/nbd/bench_test.go):
#      nbd.Probe (userspace and kernel profiles) and nbd.Dial + Close;
#   2. one process per operation: `bin/nbd-csi probe URI` against
#      `nbdinfo URI` and `nbdinfo --size URI` (hyperfine if installed,
#      otherwise a date +%s%N loop).
# and prints the per-op times and the ratios ours/nbdinfo (target ≤ 1.0).
#
# Usage: bench/handshake.sh [--runs N] [--benchtime D] [--count C] [--write-docs]
#   --runs N       process runs per command (default 200)
#   --benchtime D  go test -benchtime (default 2s)
#   --count C      go test -count; the median is reported (default 5)
#   --write-docs   replace the generated part of docs/performance.md
#                  ("Handshake" section, between the handshake:begin/end
#                  markers) with this run's results
set -euo pipefail

RUNS=200
BENCHTIME=2s
COUNT=5
WRITE_DOCS=0
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) RUNS=$2; shift 2 ;;
	--benchtime) BENCHTIME=$2; shift 2 ;;
	--count) COUNT=$2; shift 2 ;;
	--write-docs) WRITE_DOCS=1; shift ;;
	-h | --help) sed -n '3,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument: $1" >&2; exit 2 ;;
	esac
done

cd "$(dirname "$0")/.."
for tool in go nbdkit nbdinfo; do
	command -v "$tool" >/dev/null || { echo "bench/handshake.sh: $tool is not installed" >&2; exit 1; }
done

echo "building bin/nbd-csi" >&2
mkdir -p bin
go build -o bin/nbd-csi ./cmd/nbd-csi

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

# start_nbdkit URI ARGS... starts nbdkit in the background and waits (at
# most 10 s) until nbdinfo can reach URI. Returns 1 if nbdkit died.
start_nbdkit() {
	local uri=$1
	shift
	nbdkit --foreground --exit-with-parent "$@" memory size=64M 2>>"$tmp/nbdkit.log" &
	local pid=$!
	pids+=("$pid")
	for _ in $(seq 200); do
		if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
		kill -0 "$pid" 2>/dev/null || return 1
		sleep 0.05
	done
	echo "nbdkit did not become ready at $uri" >&2
	exit 1
}

sock="$tmp/nbd.sock"
URI_UNIX="nbd+unix:///?socket=$sock"
start_nbdkit "$URI_UNIX" --unix "$sock"
URI_TCP=
for _ in 1 2 3 4 5; do
	port=$((20000 + RANDOM % 40000))
	if start_nbdkit "nbd://127.0.0.1:$port/" --ipaddr 127.0.0.1 --port "$port"; then
		URI_TCP="nbd://127.0.0.1:$port/"
		break
	fi
done
[ -n "$URI_TCP" ] || { echo "could not start nbdkit on TCP" >&2; exit 1; }

# 1. In process.
echo "go test -bench (benchtime $BENCHTIME, count $COUNT)" >&2
NBDCSI_BENCH_URI_UNIX=$URI_UNIX NBDCSI_BENCH_URI_TCP=$URI_TCP \
	go test ./pkg/nbd/ -run '^$' -bench '^BenchmarkHandshake$' \
	-benchtime "$BENCHTIME" -count "$COUNT" >"$tmp/go.txt"
# median ns/op per benchmark name (GOMAXPROCS suffix removed) → "name ns"
awk '/^BenchmarkHandshake/ { n = $1; sub(/-[0-9]+$/, "", n); print n, $3 }' "$tmp/go.txt" |
	sort -k1,1 -k2,2n |
	awk '{ v[$1, ++k[$1]] = $2 }
		END { for (n in k) print n, v[n, int((k[n] + 1) / 2)] }' | sort >"$tmp/go.med"
go_ns() { awk -v n="BenchmarkHandshake/$1" '$1 == n { print $2 }' "$tmp/go.med"; }

# 2. One process per operation: mean µs per run.
proc_us() { # command...
	if command -v hyperfine >/dev/null; then
		hyperfine -N --warmup 10 --runs "$RUNS" --export-csv "$tmp/hf.csv" "$*" >/dev/null 2>&1
		awk -F, 'NR == 2 { printf "%.0f\n", $2 * 1e6 }' "$tmp/hf.csv"
	else
		local start end
		for _ in $(seq 10); do "$@" >/dev/null; done
		start=$(date +%s%N)
		for _ in $(seq "$RUNS"); do "$@" >/dev/null; done
		end=$(date +%s%N)
		echo $(((end - start) / RUNS / 1000))
	fi
}
declare -A P
for l in unix tcp; do
	uri=$URI_UNIX
	[ "$l" = tcp ] && uri=$URI_TCP
	echo "process runs ($l, $RUNS each)" >&2
	P[ours_$l]=$(proc_us bin/nbd-csi probe "$uri")
	P[nbdinfo_$l]=$(proc_us nbdinfo "$uri")
	P[size_$l]=$(proc_us nbdinfo --size "$uri")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
us() { awk -v ns="$1" 'BEGIN { printf "%.0f", ns / 1000 }'; }

{
	echo "Measured $(date -u +%Y-%m-%d) on $(uname -sr), $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo));"
	echo "$(nbdkit --version | head -1), $(nbdinfo --version | head -1), $(go version | cut -d' ' -f3),"
	echo "hyperfine: $(command -v hyperfine >/dev/null && hyperfine --version || echo "not installed (date loop)")."
	echo "Export: \`nbdkit memory size=64M\` on a unix socket and on 127.0.0.1 TCP."
	echo "Command: \`bench/handshake.sh --runs $RUNS --benchtime $BENCHTIME --count $COUNT\`."
	echo
	echo "In process (median of $COUNT \`go test -bench\` runs, µs per connect→ready):"
	echo
	echo "| operation | unix | tcp |"
	echo "|---|---:|---:|"
	for b in probe-userspace probe-kernel dial-kernel dial-userspace; do
		echo "| \`$b\` | $(us "$(go_ns unix/$b)") | $(us "$(go_ns tcp/$b)") |"
	done
	echo
	echo "One process per operation (mean of $RUNS runs, µs):"
	echo
	echo "| command | unix | tcp |"
	echo "|---|---:|---:|"
	echo "| \`nbd-csi probe URI\` | ${P[ours_unix]} | ${P[ours_tcp]} |"
	echo "| \`nbdinfo URI\` | ${P[nbdinfo_unix]} | ${P[nbdinfo_tcp]} |"
	echo "| \`nbdinfo --size URI\` | ${P[size_unix]} | ${P[size_tcp]} |"
	echo
	echo "Ratios ours/nbdinfo (target ≤ 1.0):"
	echo
	echo "| comparison | unix | tcp |"
	echo "|---|---:|---:|"
	echo "| \`nbd-csi probe\` / \`nbdinfo\` (processes) | $(ratio "${P[ours_unix]}" "${P[nbdinfo_unix]}") | $(ratio "${P[ours_tcp]}" "${P[nbdinfo_tcp]}") |"
	echo "| \`nbd-csi probe\` / \`nbdinfo --size\` (processes) | $(ratio "${P[ours_unix]}" "${P[size_unix]}") | $(ratio "${P[ours_tcp]}" "${P[size_tcp]}") |"
	echo "| in-process \`Probe\` (userspace) / \`nbdinfo --size\` process | $(ratio "$(go_ns unix/probe-userspace)" "$((P[size_unix] * 1000))") | $(ratio "$(go_ns tcp/probe-userspace)" "$((P[size_tcp] * 1000))") |"
} >"$tmp/result.md"

cat "$tmp/result.md"

if [ "$WRITE_DOCS" = 1 ]; then
	doc=docs/performance.md
	begin='<!-- handshake:begin (generated by bench/handshake.sh --write-docs) -->'
	end='<!-- handshake:end -->'
	if ! grep -qF "$begin" "$doc" 2>/dev/null; then
		echo "$doc has no '$begin' marker; not written" >&2
		exit 1
	fi
	awk -v b="$begin" -v e="$end" -v f="$tmp/result.md" '
		$0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
		$0 == e { skip = 0 }
		!skip { print }' "$doc" >"$tmp/doc.md"
	cat "$tmp/doc.md" >"$doc"
	echo "updated $doc" >&2
fi
