#!/usr/bin/env bash
# Adds the project's SPDX license line to Go files that lack it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
git ls-files --cached --others --exclude-standard '*.go' | while IFS= read -r f; do
	[ -f "$f" ] || continue
	if [ "$(head -n1 "$f")" != "// SPDX-License-Identifier: Apache-2.0" ]; then
		{ printf '// SPDX-License-Identifier: Apache-2.0\n\n'; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
	fi
done
