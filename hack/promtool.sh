#!/usr/bin/env bash
# Prints the path of a promtool binary: the installed one, else the one in
# Debian's prometheus package, unpacked into .cache/bin (apt-get download:
# no install, so no Prometheus server is started; about 20 MB, once).
# test/chart's TestPrometheusRules checks and unit-tests the chart's alerts
# and the dashboard's queries with it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
bin=.cache/bin/promtool
if [ ! -x "$bin" ]; then
	if ! command -v apt-get >/dev/null; then
		echo "promtool is not installed and this is not a Debian machine: install Prometheus' promtool and put it in PATH" >&2
		exit 1
	fi
	echo "unpacking promtool from Debian's prometheus package into .cache/bin" >&2
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	chmod 755 "$tmp"
	if ! (cd "$tmp" && apt-get download prometheus >download.log 2>&1); then
		cat "$tmp/download.log" >&2
		echo "apt-get download prometheus failed (run apt-get update?)" >&2
		exit 1
	fi
	dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
	mkdir -p .cache/bin
	install -m 0755 "$tmp/x/usr/bin/promtool" "$bin"
fi
echo "$PWD/$bin"
