#!/usr/bin/env bash
# make e2e: creates a cluster (E2E_PROVIDER=vm or kind), installs nbd-csi
# with the chart, starts an NBD server pool, runs the e2e tests, collects
# logs on failure, and deletes the cluster (unless E2E_KEEP=1). Our Go tests
# (E2E_GO=0 skips them, E2E_RUN=Regexp picks) run first, then the upstream
# External Storage suite (test/e2e/storage; E2E_STORAGE=0 skips it).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PROVIDER=${E2E_PROVIDER:-kind}
helm=$(hack/helm.sh)
status=0
case $PROVIDER in
vm)
	test/e2e/vm/cluster.sh build
	start=$SECONDS
	eval "$(test/e2e/vm/cluster.sh up | grep '^KUBECONFIG=')"
	export KUBECONFIG
	echo "e2e: cluster up in $((SECONDS - start)) s"
	cleanup() {
		if [ "$status" -ne 0 ]; then test/e2e/vm/cluster.sh logs "${E2E_ARTIFACTS:-.cache/e2e/artifacts}" || true; fi
		test/e2e/vm/nbd-server.sh stop || true
		[ "${E2E_KEEP:-}" = 1 ] || test/e2e/vm/cluster.sh down
	}
	trap cleanup EXIT
	test/e2e/vm/nbd-server.sh start
	values=test/e2e/values-vm.yaml
	export E2E_SERVER_RESTART_CMD="$PWD/test/e2e/vm/nbd-server.sh restart"
	;;
kind)
	exec test/e2e/kind/run.sh
	;;
*)
	echo "E2E_PROVIDER=$PROVIDER: want vm or kind" >&2
	exit 2
	;;
esac
start=$SECONDS
"$helm" install nbd-csi charts/nbd-csi --namespace kube-system -f "$values" --wait --timeout 10m || status=$?
echo "e2e: driver installed in $((SECONDS - start)) s (helm exit $status)"
if [ "$status" -eq 0 ]; then
	if [ "${E2E_GO:-1}" = 1 ]; then
		(cd test/e2e && NBDCSI_REQUIRE_E2E=1 go test -count=1 -v -timeout 60m ${E2E_RUN:+-run "$E2E_RUN"} .) || status=$?
	fi
	# The upstream External Storage suite (E2E_STORAGE=0 leaves it out).
	if [ "${E2E_STORAGE:-1}" = 1 ]; then
		test/e2e/storage/run.sh || status=$?
	fi
fi
exit "$status"
