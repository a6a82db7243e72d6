#!/bin/sh
# Creates EXPORTS sparse files of SIZE in /pool and serves them with
# nbdkit's file plugin; when nbdkit dies (the server-outage test kills it:
# kill -9 $(cat /run/nbdkit.pid)) it is started again after OUTAGE seconds.
set -e
mkdir -p /pool
i=1
while [ "$i" -le "${EXPORTS:-12}" ]; do
	f=/pool/disk$(printf %02d "$i")
	[ -e "$f" ] || truncate -s "${SIZE:-512M}" "$f"
	i=$((i + 1))
done
while :; do
	nbdkit -f -P /run/nbdkit.pid -p 10809 file dir=/pool || true
	sleep "${OUTAGE:-5}"
done
