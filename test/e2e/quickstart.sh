#!/usr/bin/env bash
# docs/install.md's "Quick start on a cluster", run as written against the vm
# cluster in KUBECONFIG (make e2e runs it last, after removing the e2e's own
# install of the chart): the block between <!-- e2e:quickstart --> and
# <!-- /e2e:quickstart --> of docs/install.md, with one substitution — the chart
# reference oci://ghcr.io/nbd-csi/charts/nbd-csi --version X becomes the
# package make release made (E2E_CHART), as no registry is reachable here.
# It applies deploy/examples/nbd-server-pool.yaml as it is in the tree.
#
# What a real cluster has and the vm cluster lacks is provided first, the
# way an admin would:
#   - a default StorageClass for the pool's claim: static local volumes
#     (kubernetes.io/no-provisioner) with one 100Gi local PV on vmnode1,
#     its directory owned by the pool's user (65532);
#   - cluster DNS for Service names (nbd.storage.svc): dnsmasq on the host
#     (10.99.0.1, the nodes' clusterDNS), answering for every Service's
#     ClusterIP, its records refreshed from the API server every 2 s.
# Fails when the pod does not read back what it wrote.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
: "${KUBECONFIG:?KUBECONFIG not set}"
: "${E2E_CHART:?E2E_CHART: the chart package to install (make release)}"
RUN=${E2E_CACHE:-$PWD/.cache/e2e}/run
HOST_IP=10.99.0.1
helm=$(hack/helm.sh)
# kubectl at the cluster's version, from the Go module proxy like the
# cluster itself (a fresh machine has none; Debian's is 1.20).
kubectl=$(hack/kube-build.sh kubectl)
# The block calls helm and kubectl by name.
PATH=$(dirname "$helm"):$(dirname "$kubectl"):$PATH
export PATH KUBECONFIG
log() { echo "[quickstart $(date +%T)] $*" >&2; }

# The block, as written.
block=$(awk '/^<!-- e2e:quickstart/{on=1; next} /^<!-- \/e2e:quickstart -->/{on=0} on' docs/install.md |
	sed -n '/^```sh$/,/^```$/p' | sed '1d;$d')
[ -n "$block" ] || { echo "quickstart: no e2e:quickstart block in docs/install.md" >&2; exit 1; }
ref='oci://ghcr.io/nbd-csi/charts/nbd-csi --version [0-9][0-9.]*'
[ "$(grep -c -- "helm install nbd-csi $ref" <<<"$block")" = 1 ] ||
	{ echo "quickstart: docs/install.md's block does not install the chart from $ref exactly once" >&2; exit 1; }
script=$(sed "s#$ref#$E2E_CHART#" <<<"$block")

# Cluster DNS.
dns=$RUN/dns
mkdir -p "$dns"
: > "$dns/hosts"
dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$dns/hosts" \
	--listen-address=$HOST_IP --bind-interfaces --port=53 --user=root \
	--local=/cluster.local/ --local=/svc/ --log-facility="$dns/dnsmasq.log" &
dnsmasq_pid=$!
(
	while kill -0 "$dnsmasq_pid" 2>/dev/null; do
		if kubectl get svc -A -o jsonpath='{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local {.metadata.name}.{.metadata.namespace}.svc{"\n"}{end}' \
			2>/dev/null | grep -v '^None ' > "$dns/hosts.new" && ! cmp -s "$dns/hosts.new" "$dns/hosts"; then
			mv "$dns/hosts.new" "$dns/hosts"
			kill -HUP "$dnsmasq_pid"
		fi
		sleep 2
	done
) &
sync_pid=$!
cleanup() {
	kill "$sync_pid" "$dnsmasq_pid" 2>/dev/null || true
}
trap cleanup EXIT

# A default StorageClass: one local volume on the first node.
node=$(kubectl get nodes -l topology.nbd-csi.io/nbd-capable=true -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
[ -n "$node" ] || node=vmnode1
E2E_NODE=${node#vmnode} test/e2e/vm/cluster.sh sh 'mkdir -p /var/lib/nbd-pool && chown 65532:65532 /var/lib/nbd-pool' >/dev/null
kubectl apply -f - <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: nbd-pool-local}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: local
  persistentVolumeReclaimPolicy: Retain
  local: {path: /var/lib/nbd-pool}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - {key: kubernetes.io/hostname, operator: In, values: [$node]}
YAML

log "running docs/install.md's quick start (chart: $E2E_CHART)"
start=$SECONDS
out=$(mktemp)
if ! bash -euo pipefail -x -c "$script" 2>&1 | tee "$out"; then
	log "the quick start failed after $((SECONDS - start)) s"
	kubectl get pods -A -o wide || true
	kubectl describe pod hello || true
	kubectl -n storage describe pod nbd-0 || true
	rm -f "$out"
	exit 1
fi
if ! grep -qx 'hello from nbd-csi' "$out"; then
	log "the pod did not read back 'hello from nbd-csi'"
	rm -f "$out"
	exit 1
fi
rm -f "$out"
log "quick start passed in $((SECONDS - start)) s"
# Clean up as docs/install.md says (what an admin does after trying it).
kubectl delete pod/hello pvc/hello --timeout=5m
kubectl delete -f deploy/examples/nbd-server-pool.yaml --timeout=5m
"$helm" uninstall nbd-csi --namespace kube-system --wait --timeout 5m
