#!/bin/sh
# Creates sparse files in /pool and serves them with nbdkit's file plugin:
# for the nbd-e2e StorageClass (exportFilter disk*) EXPORTS of SIZE
# (disk01…, 12 of 512M); for nbd-e2e-grow (grow*) two of 512M, which
# TestExpandVolume grows with truncate. When nbdkit dies (the server-outage test kills it: kill -9
# $(cat /run/nbdkit.pid)) it is started again after OUTAGE seconds.
set -e
mkdir -p /pool
# exports PREFIX COUNT SIZE: /pool/PREFIX01… of SIZE, those missing.
exports() {
	i=1
	while [ "$i" -le "$2" ]; do
		f=/pool/$1$(printf %02d "$i")
		[ -e "$f" ] || truncate -s "$3" "$f"
		i=$((i + 1))
	done
}
exports disk "${EXPORTS:-12}" "${SIZE:-512M}"
exports grow 2 512M
while :; do
	nbdkit -f -P /run/nbdkit.pid -p 10809 file dir=/pool || true
	sleep "${OUTAGE:-5}"
done
