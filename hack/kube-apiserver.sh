#!/usr/bin/env bash
# Prints the path of a kube-apiserver binary for the Kubernetes store's
# contract tests: $KUBE_APISERVER if set, else one built from the Go module
# proxy by hack/kube-build.sh (about 9 minutes on 2 cores the first time,
# cached in .cache/kube after that).
set -euo pipefail
if [ -n "${KUBE_APISERVER:-}" ]; then echo "$KUBE_APISERVER"; exit 0; fi
exec "$(git rev-parse --show-toplevel)/hack/kube-build.sh" kube-apiserver
