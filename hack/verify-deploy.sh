#!/usr/bin/env bash
# Fails when deploy/kubernetes is not what the chart renders (run
# `make generate` to refresh it).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
hack/generate-deploy.sh "$tmp"
if ! diff -u deploy/kubernetes/nbd-csi.yaml "$tmp/nbd-csi.yaml"; then
	echo "deploy/kubernetes is stale: run 'make generate'" >&2
	exit 1
fi
