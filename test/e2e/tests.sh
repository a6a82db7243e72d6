#!/usr/bin/env bash
# The tests of make e2e, against the cluster in KUBECONFIG with nbd-csi
# installed (both providers call this): our Go tests (E2E_GO=0 skips them,
# E2E_RUN=Regexp picks), then the upstream External Storage suite
# (test/e2e/storage; E2E_STORAGE=0 skips it, and so do nodes without nbd,
# E2E_EXPECT_NO_NBD=1, where it cannot pass). Exits non-zero if any failed,
# and if a test named in E2E_REQUIRE_PASS (space-separated) did not run and
# pass (skipped, or no longer matched by E2E_RUN).
set -uo pipefail
cd "$(git rev-parse --show-toplevel)"
status=0
if [ "${E2E_GO:-1}" = 1 ]; then
	out=$(mktemp)
	(cd test/e2e && NBDCSI_REQUIRE_E2E=1 go test -count=1 -v -timeout 60m ${E2E_RUN:+-run "$E2E_RUN"} .) 2>&1 | tee "$out"
	[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
	for t in ${E2E_REQUIRE_PASS:-}; do
		grep -q -- "^--- PASS: $t " "$out" || { echo "e2e: $t did not pass (required: E2E_REQUIRE_PASS)" >&2; status=1; }
	done
	rm -f "$out"
fi
if [ "${E2E_STORAGE:-1}" = 1 ] && [ "${E2E_EXPECT_NO_NBD:-}" != 1 ]; then
	test/e2e/storage/run.sh || status=$?
fi
exit "$status"
