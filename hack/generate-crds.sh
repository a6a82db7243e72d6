#!/usr/bin/env bash
# Generates the CRD manifests (charts/nbd-csi/crds) from the Go types in
# pkg/apis with controller-gen, pinned in hack/tools/go.mod, and records in
# hack/crds.stamp a hash of the inputs and of the result, so that
# hack/verify-deploy.sh can tell fresh CRDs without building controller-gen.
# Usage: hack/generate-crds.sh [OUTDIR]   (OUTDIR given: no stamp written)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=${1:-charts/nbd-csi/crds}
mkdir -p "$out"
go tool -modfile=hack/tools/go.mod controller-gen crd paths=./pkg/apis/... output:crd:dir="$out"
if [ $# -eq 0 ]; then
	hack/crds-hash.sh > hack/crds.stamp
fi
