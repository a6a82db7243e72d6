#!/usr/bin/env bash
# Fails when a Go file lacks the project's SPDX license line as its first line.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bad=0
while IFS= read -r f; do
	[ -f "$f" ] || continue
	if [ "$(head -n1 "$f")" != "// SPDX-License-Identifier: Apache-2.0" ]; then
		echo "missing license line: $f"
		bad=1
	fi
done < <(git ls-files --cached --others --exclude-standard '*.go')
exit $bad
