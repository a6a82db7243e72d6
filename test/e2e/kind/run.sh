#!/usr/bin/env bash
# The kind provider of make e2e: what upstream CI and most users run.
# kind nodes share the host's kernel, so the host needs nbd
# (`sudo modprobe nbd`). Honours KIND_NODE_IMAGE and DOCKER_HOST, so it
# runs unchanged with upstream images and with an offline node image such
# as the one of ../shared/k8s-rig (test/e2e/README.md: the sidecar and test
# images then come from E2E_LOAD_ARCHIVES, selected by E2E_VALUES).
#
# On a host without nbd, E2E_EXPECT_NO_NBD=1 still installs the driver and
# runs TestNodeWithoutNBD only: the node plugin must say why it cannot
# attach (not Ready, /readyz with the reason, FailedMount events), never hang.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
NAME=${E2E_KIND_NAME:-nbd-csi-e2e}
KIND=${KIND:-$(command -v kind || true)}
if [ -z "$KIND" ]; then
	GOBIN=$PWD/.cache/bin go install sigs.k8s.io/kind@v0.33.0
	KIND=$PWD/.cache/bin/kind
fi
if [ ! -e /sys/module/nbd ] && [ "${E2E_EXPECT_NO_NBD:-}" != 1 ]; then
	echo "e2e kind: the host kernel has no nbd module loaded (sudo modprobe nbd); kind nodes share it." >&2
	echo "Use E2E_PROVIDER=vm on hosts without nbd, or E2E_EXPECT_NO_NBD=1 to test how the driver reports it." >&2
	exit 1
fi
command -v docker >/dev/null || { echo "e2e kind: docker is required" >&2; exit 1; }
helm=$(hack/helm.sh)
status=0
cleanup() {
	if [ "$status" -ne 0 ]; then
		out=${E2E_ARTIFACTS:-.cache/e2e/artifacts}
		mkdir -p "$out"
		"$KIND" export logs --name "$NAME" "$out" >/dev/null 2>&1 || true
		echo "e2e: logs in $out" >&2
	fi
	[ "${E2E_KEEP:-}" = 1 ] || "$KIND" delete cluster --name "$NAME"
}
trap cleanup EXIT
start=$SECONDS
# The classic builder: BuildKit needs images an offline host cannot pull.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
# make image: VENDORED=true (E2E_VENDORED) when the builder cannot reach
# the module proxy.
make image IMAGE=nbd-csi-e2e/nbd-csi:e2e VERSION=e2e VENDORED="${E2E_VENDORED:-false}"
docker build -t nbd-csi-e2e/nbdkit:e2e test/e2e/images/nbdkit
echo "e2e: images built in $((SECONDS - start)) s"
"$KIND" create cluster --name "$NAME" --config test/e2e/kind/cluster.yaml ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 5m
export KUBECONFIG=$PWD/.cache/e2e/kind.kubeconfig
mkdir -p .cache/e2e
"$KIND" get kubeconfig --name "$NAME" > "$KUBECONFIG"
"$KIND" load docker-image --name "$NAME" nbd-csi-e2e/nbd-csi:e2e nbd-csi-e2e/nbdkit:e2e
# Images the tests run, when the host has them (elsewhere the nodes pull
# them): E2E_LOAD_IMAGES names images in Docker, E2E_LOAD_ARCHIVES image
# tars (e.g. the ones test/e2e/vm/cluster.sh build makes in .cache/e2e/images).
for img in ${E2E_LOAD_IMAGES:-}; do "$KIND" load docker-image --name "$NAME" "$img"; done
for tar in ${E2E_LOAD_ARCHIVES:-}; do "$KIND" load image-archive --name "$NAME" "$tar"; done
kubectl apply -f test/e2e/kind/nbd-server.yaml
kubectl -n nbd-e2e wait --for=condition=Ready pod/nbd-server --timeout=5m
ip=$(kubectl -n nbd-e2e get service nbd-server -o jsonpath='{.spec.clusterIP}')
wait=--wait
# Node plugins that cannot attach are never Ready: wait for the controller only.
[ "${E2E_EXPECT_NO_NBD:-}" = 1 ] && wait=
"$helm" install nbd-csi charts/nbd-csi --namespace kube-system $wait --timeout 10m \
	--set image.registry= --set image.repository=nbd-csi-e2e/nbd-csi --set image.tag=e2e \
	--set "storageClasses[0].name=nbd-e2e" --set "storageClasses[0].server=nbd://$ip:10809" \
	--set "storageClasses[0].exportFilter=disk*" --set "storageClasses[0].wipeOnDelete=true" \
	--set "storageClasses[0].allowVolumeExpansion=true" \
	--set "storageClasses[1].name=nbd-e2e-grow" --set "storageClasses[1].server=nbd://$ip:10809" \
	--set "storageClasses[1].exportFilter=grow*" --set "storageClasses[1].wipeOnDelete=true" \
	--set "storageClasses[1].allowVolumeExpansion=true" \
	${E2E_VALUES:+-f "$E2E_VALUES"} || status=$?
if [ "$status" -eq 0 ] && [ -z "$wait" ]; then
	kubectl -n kube-system rollout status deploy/nbd-csi-controller --timeout=10m || status=$?
fi
export E2E_SERVER_RESTART_CMD="kubectl -n nbd-e2e exec nbd-server -- sh -c 'kill -9 \$(cat /run/nbdkit.pid)'"
export E2E_GROW_EXPORT_CMD='kubectl -n nbd-e2e exec nbd-server -- truncate -s "$SIZE" "/pool/$EXPORT"'
export E2E_BUSYBOX_IMAGE=${E2E_BUSYBOX_IMAGE:-registry.k8s.io/e2e-test-images/busybox:1.37.0-1}
if [ "$status" -eq 0 ]; then
	test/e2e/tests.sh || status=$?
fi
exit "$status"
