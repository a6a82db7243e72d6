#!/usr/bin/env bash
# make e2e: creates a cluster (E2E_PROVIDER=vm or kind), installs nbd-csi
# with the chart, starts an NBD server pool, runs the e2e tests, collects
# logs on failure, and deletes the cluster (unless E2E_KEEP=1). The tests
# themselves are test/e2e/tests.sh (our Go tests, then the upstream External
# Storage suite).
#
# E2E_SMOKE=1 (make e2e-smoke, what CI runs): the vm provider with one
# worker, the chart with its default values plus a StorageClass
# (values-smoke.yaml), TestDataSurvivesPods and
# TestNodePluginRestartWhileWriting, no upstream suite; each of those tests
# must pass (a skip or a missing test fails the run).
#
# Otherwise the vm provider boots, besides its E2E_NODES workers, one whose
# kernel refuses nbd (E2E_NODES_WITHOUT_NBD, default 1):
# TestNoVolumesOnNodeWithoutNBD proves no NBD volume is ever placed there;
# and after the tests it runs the README's cluster quick start as written
# (test/e2e/quickstart.sh; E2E_QUICKSTART=0 skips it).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PROVIDER=${E2E_PROVIDER:-kind}
if [ "${E2E_SMOKE:-}" = 1 ]; then
	[ "$PROVIDER" = vm ] || { echo "E2E_SMOKE=1 runs on the vm provider (E2E_PROVIDER=$PROVIDER)" >&2; exit 2; }
	export E2E_NODES=1 E2E_STORAGE=0 E2E_NODES_WITHOUT_NBD=0
	export E2E_RUN='^(TestDataSurvivesPods|TestNodePluginRestartWhileWriting)$'
	export E2E_REQUIRE_PASS="TestDataSurvivesPods TestNodePluginRestartWhileWriting"
fi
helm=$(hack/helm.sh)
status=0
case $PROVIDER in
vm)
	test/e2e/vm/cluster.sh build
	export E2E_NODES_WITHOUT_NBD=${E2E_NODES_WITHOUT_NBD:-1}
	# The names the test expects without nbd (cluster.sh numbers them after
	# the capable nodes: vmnode3 with two of those).
	E2E_NODE_WITHOUT_NBD=""
	for i in $(seq $((${E2E_NODES:-2} + 1)) $((${E2E_NODES:-2} + E2E_NODES_WITHOUT_NBD))); do
		E2E_NODE_WITHOUT_NBD="$E2E_NODE_WITHOUT_NBD vmnode$i"
	done
	export E2E_NODE_WITHOUT_NBD=${E2E_NODE_WITHOUT_NBD# }
	if [ -n "$E2E_NODE_WITHOUT_NBD" ] && [ -z "${E2E_RUN:-}" ]; then
		export E2E_REQUIRE_PASS="${E2E_REQUIRE_PASS:-} TestNoVolumesOnNodeWithoutNBD"
	fi
	start=$SECONDS
	# A plain assignment keeps cluster.sh's exit status (set -e, pipefail):
	# a failed up stops here, with its cause on screen, not at helm later.
	KUBECONFIG=$(test/e2e/vm/cluster.sh up | sed -n 's/^KUBECONFIG=//p')
	[ -n "$KUBECONFIG" ] || { echo "e2e: cluster.sh up printed no KUBECONFIG" >&2; exit 1; }
	export KUBECONFIG
	echo "e2e: cluster up in $((SECONDS - start)) s"
	cleanup() {
		if [ "$status" -ne 0 ]; then test/e2e/vm/cluster.sh logs "${E2E_ARTIFACTS:-.cache/e2e/artifacts}" || true; fi
		test/e2e/vm/nbd-server.sh stop || true
		[ "${E2E_KEEP:-}" = 1 ] || test/e2e/vm/cluster.sh down
	}
	trap cleanup EXIT
	# The chart as released: make release's package (hack/release.sh),
	# not the source directory. The smoke builds the amd64 binary and the
	# chart only (CI's budget: cross-compiling arm64 and two debootstraps
	# for the images cost minutes cold) and runs the nbd-csi image
	# cluster.sh built from this commit.
	release=${E2E_CACHE:-$PWD/.cache/e2e}/release
	start=$SECONDS
	if [ "${E2E_SMOKE:-}" = 1 ]; then
		RELEASE_ARCHES=amd64 RELEASE_IMAGES=0 make -s release RELEASE_DIR="$release" >/dev/null
	else
		make -s release RELEASE_DIR="$release" >/dev/null
	fi
	chart=$(ls "$release"/nbd-csi-*.tgz)
	echo "e2e: make release in $((SECONDS - start)) s: installing $chart"
	# make e2e: the release image too (amd64 docker-archive), replacing
	# the one cluster.sh baked into the nodes under the same name.
	if [ "${E2E_SMOKE:-}" != 1 ]; then
		image=$(ls "$release"/nbd-csi-*-image-linux-amd64.tar)
		test/e2e/vm/cluster.sh load "$image" >/dev/null
		echo "e2e: loaded $image into every node"
	fi
	test/e2e/vm/nbd-server.sh start
	values=test/e2e/values-vm.yaml
	[ "${E2E_SMOKE:-}" = 1 ] && values=test/e2e/values-smoke.yaml
	export E2E_SERVER_RESTART_CMD="$PWD/test/e2e/vm/nbd-server.sh restart"
	export E2E_GROW_EXPORT_CMD="$PWD/test/e2e/vm/nbd-server.sh grow \"\$EXPORT\" \"\$SIZE\""
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
"$helm" install nbd-csi "${chart:-charts/nbd-csi}" --namespace kube-system -f "$values" --wait --timeout 10m || status=$?
echo "e2e: driver installed in $((SECONDS - start)) s (helm exit $status)"
if [ "$status" -eq 0 ]; then
	test/e2e/tests.sh || status=$?
fi
# Last, on the vm provider (not the smoke): the README's quick start as
# written, after removing the e2e's own install (E2E_QUICKSTART=0 skips).
if [ "$status" -eq 0 ] && [ "$PROVIDER" = vm ] && [ "${E2E_SMOKE:-}" != 1 ] && [ "${E2E_QUICKSTART:-1}" = 1 ]; then
	"$helm" uninstall nbd-csi --namespace kube-system --wait --timeout 10m || status=$?
	[ "$status" -ne 0 ] || E2E_CHART=$chart test/e2e/quickstart.sh || status=$?
fi
exit "$status"
