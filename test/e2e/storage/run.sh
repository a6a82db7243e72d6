#!/usr/bin/env bash
# Runs the upstream Kubernetes External Storage suite (a slim e2e.test built
# by hack/kube-build.sh from the Go module proxy) against the cluster in
# KUBECONFIG, with test/e2e/storage/testdriver.yaml declaring what nbd-csi
# supports. Specs whose capabilities the driver does not declare skip
# themselves; Disruptive, Serial, Slow, Windows and alpha-feature specs are
# left out. Prints one line per spec that ran and a summary.
#
#   E2E_STORAGE_FOCUS  ginkgo focus regexp (default: the whole suite)
#   E2E_STORAGE_SKIP   ginkgo skip regexp (default below)
#   E2E_STORAGE_MIN    fewest specs that must have run and passed (default 30
#                      with the default focus, else 1): a suite that skips
#                      everything, e.g. after a capability typo, fails
#   E2E_ARTIFACTS      where the JUnit report and log go (.cache/e2e/artifacts)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
: "${KUBECONFIG:?KUBECONFIG must point at the cluster}"
out=${E2E_ARTIFACTS:-$PWD/.cache/e2e/artifacts}
mkdir -p "$out"
e2e=$(hack/kube-build.sh e2e.test)
focus=${E2E_STORAGE_FOCUS:-External.Storage}
skip=${E2E_STORAGE_SKIP:-'\[Disruptive\]|\[Serial\]|\[Slow\]|\[Feature:|\[FeatureGate:|Pre-provisioned|Snapshot'}
start=$SECONDS
status=0
"$e2e" -kubeconfig="$KUBECONFIG" -storage.testdriver="$PWD/test/e2e/storage/testdriver.yaml" \
	-ginkgo.focus="$focus" -ginkgo.skip="$skip" -ginkgo.no-color -ginkgo.v \
	-ginkgo.junit-report="$out/storage-junit.xml" -ginkgo.timeout=4h \
	-report-dir="$out" >"$out/storage.log" 2>&1 || status=$?
min=${E2E_STORAGE_MIN:-$([ -z "${E2E_STORAGE_FOCUS:-}" ] && echo 30 || echo 1)}
python3 - "$out/storage-junit.xml" "$min" <<'PY' || status=$?
import re, sys, xml.etree.ElementTree as ET
counts = {}
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    if tc.get("name", "").startswith("[Report"):
        continue  # the report's own entry, not a spec
    st = tc.get("status") or ("failed" if tc.find("failure") is not None else "passed")
    counts[st] = counts.get(st, 0) + 1
    if st == "skipped":
        continue
    name = re.sub(r"^\[It\] External Storage \[Driver: [^]]*\] ", "", tc.get("name"))
    print(f"storage: {st.upper():7} {float(tc.get('time', 0)):6.1f}s {name}")
print("storage: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
if counts.get("passed", 0) < int(sys.argv[2]):
    print(f"storage: only {counts.get('passed', 0)} specs passed, want at least {sys.argv[2]} (E2E_STORAGE_MIN)")
    sys.exit(1)
PY
echo "storage: suite took $((SECONDS - start)) s (exit $status); log and JUnit report in $out"
exit "$status"
