#!/usr/bin/env bash
# Fails when the CRDs are not what the Go types generate, or deploy/kubernetes
# is not what the chart renders (run `make generate` to refresh both).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Fast path: the CRDs and their inputs are what the last `make generate`
# recorded. Otherwise generate and compare (builds controller-gen).
if ! cmp -s hack/crds.stamp <(hack/crds-hash.sh); then
	hack/generate-crds.sh "$tmp/crds"
	if ! diff -ru charts/nbd-csi/crds "$tmp/crds"; then
		echo "charts/nbd-csi/crds is stale: run 'make generate'" >&2
		exit 1
	fi
	echo "hack/crds.stamp is stale (the CRDs are fresh): run 'make generate'" >&2
	exit 1
fi
hack/generate-deploy.sh "$tmp"
if ! diff -u deploy/kubernetes/nbd-csi.yaml "$tmp/nbd-csi.yaml"; then
	echo "deploy/kubernetes is stale: run 'make generate'" >&2
	exit 1
fi
