#!/bin/sh
# Creates EXPORTS sparse files of SIZE (12 of 512M) and LARGE_EXPORTS of
# LARGE_SIZE (4 of 2G: the volume-expand specs claim 1Gi and expand to
# 2Gi) in /pool and serves them with nbdkit's file plugin; when nbdkit dies
# (the server-outage test kills it: kill -9 $(cat /run/nbdkit.pid)) it is
# started again after OUTAGE seconds. TestExpandVolume grows a file with
# truncate.
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
exports large "${LARGE_EXPORTS:-4}" "${LARGE_SIZE:-2G}"
while :; do
	nbdkit -f -P /run/nbdkit.pid -p 10809 file dir=/pool || true
	sleep "${OUTAGE:-5}"
done
