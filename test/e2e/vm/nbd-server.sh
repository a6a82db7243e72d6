#!/usr/bin/env bash
# The e2e pool for the vm provider: nbdkit's file plugin serving every file
# of a directory as an export on the host's side of the bridge the nodes
# share (nbd://10.99.0.1:10809). The nbd-e2e StorageClass (exportFilter
# disk*) gets E2E_EXPORTS files of E2E_EXPORT_SIZE (disk01…, 12 of 512M);
# nbd-e2e-grow (grow*) two of 512M that TestExpandVolume grows, kept apart
# so that a grown export never serves another test's claim.
#   start | stop | restart   (restart keeps the files: the outage test)
#   grow EXPORT SIZE         (truncate an export to a larger size: new
#                             connections see it; the expansion test)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
RUN=${E2E_CACHE:-$PWD/.cache/e2e}/run
POOL=$RUN/pool
PID=$RUN/pids/nbdkit
ADDR=${E2E_NBD_ADDR:-10.99.0.1}
EXPORTS=${E2E_EXPORTS:-12}

# exports PREFIX COUNT SIZE: $POOL/PREFIX01… of SIZE, those missing.
exports() {
	local i
	for i in $(seq -f %02g 1 "$2"); do
		[ -e "$POOL/$1$i" ] || truncate -s "$3" "$POOL/$1$i"
	done
}

start() {
	mkdir -p "$POOL" "$RUN/pids" "$RUN/logs"
	exports disk "$EXPORTS" "${E2E_EXPORT_SIZE:-512M}"
	exports grow 2 512M
	# nbdkit daemonizes itself and writes its pid file.
	nbdkit -P "$PID" -i "$ADDR" -p 10809 file dir="$POOL" >>"$RUN/logs/nbdkit.log" 2>&1 < /dev/null
	for _ in $(seq 100); do
		nbdinfo --list "nbd://$ADDR:10809" >/dev/null 2>&1 && { echo "nbdkit serving $(ls "$POOL" | wc -l) exports on nbd://$ADDR:10809"; return; }
		sleep 0.1
	done
	echo "nbdkit did not start: $(tail -5 "$RUN/logs/nbdkit.log")" >&2
	exit 1
}

stop() {
	if [ -f "$PID" ]; then
		kill -9 "$(cat "$PID")" 2>/dev/null || true
		rm -f "$PID"
	fi
}

grow() {
	case ${1:-} in "" | */* | .*) echo "grow: bad export name '${1:-}'" >&2; exit 2 ;; esac
	[ -f "$POOL/$1" ] || { echo "grow: no export $1 in $POOL" >&2; exit 1; }
	[ -n "${2:-}" ] || { echo "usage: $0 grow EXPORT SIZE" >&2; exit 2; }
	truncate -s "$2" "$POOL/$1"
	echo "export $1 is now $(stat -c %s "$POOL/$1") bytes"
}

case ${1:-} in
start) start ;;
stop) stop ;;
restart) stop; sleep "${E2E_OUTAGE:-5}"; start ;;
grow) grow "${2:-}" "${3:-}" ;;
*) echo "usage: $0 start|stop|restart|grow EXPORT SIZE" >&2; exit 2 ;;
esac
