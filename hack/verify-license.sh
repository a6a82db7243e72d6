#!/usr/bin/env bash
# Fails when a Go file lacks the project's SPDX license line as its first line.
# Upstream source kept verbatim under a third_party/ directory keeps its own
# header (its README.md names origin and licence).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bad=0
while IFS= read -r f; do
	[ -f "$f" ] || continue
	case $f in */third_party/*) continue ;; esac
	if [ "$(head -n1 "$f")" != "// SPDX-License-Identifier: Apache-2.0" ]; then
		echo "missing license line: $f"
		bad=1
	fi
done < <(git ls-files --cached --others --exclude-standard '*.go')
exit $bad
