#!/usr/bin/env bash
# Prints the hash of what the CRDs are generated from (the API types, the
# pinned controller-gen, the generator script) and the hash of the CRDs.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
inputs=$(cat $(find pkg/apis -name '*.go' | sort) hack/tools/go.mod hack/tools/go.sum hack/generate-crds.sh | sha256sum | cut -d' ' -f1)
outputs=$(cat $(find charts/nbd-csi/crds -name '*.yaml' | sort) | sha256sum | cut -d' ' -f1)
echo "inputs $inputs"
echo "crds $outputs"
