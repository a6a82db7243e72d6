#!/usr/bin/env bash
# Generates the CRD manifests (charts/nbd-csi/crds) from the Go types in
# pkg/apis with controller-gen, pinned in hack/tools/go.mod.
# Usage: hack/generate-crds.sh [OUTDIR]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=${1:-charts/nbd-csi/crds}
mkdir -p "$out"
go tool -modfile=hack/tools/go.mod controller-gen crd paths=./pkg/apis/... output:crd:dir="$out"
