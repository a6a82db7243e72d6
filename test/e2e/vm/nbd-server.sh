#!/usr/bin/env bash
# The e2e pool for the vm provider: nbdkit's file plugin serving every file
# of a directory as an export on the host's side of the bridge the nodes
# share (nbd://10.99.0.1:10809). start | stop | restart (restart keeps the
# files: what the server-outage test needs).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
RUN=${E2E_CACHE:-$PWD/.cache/e2e}/run
POOL=$RUN/pool
PID=$RUN/pids/nbdkit
ADDR=${E2E_NBD_ADDR:-10.99.0.1}
EXPORTS=${E2E_EXPORTS:-12}

start() {
	mkdir -p "$POOL" "$RUN/pids" "$RUN/logs"
	if [ -z "$(ls "$POOL")" ]; then
		for i in $(seq -w 1 "$EXPORTS"); do truncate -s "${E2E_EXPORT_SIZE:-512M}" "$POOL/disk$i"; done
	fi
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

case ${1:-} in
start) start ;;
stop) stop ;;
restart) stop; sleep "${E2E_OUTAGE:-5}"; start ;;
*) echo "usage: $0 start|stop|restart" >&2; exit 2 ;;
esac
