#!/usr/bin/env bash
# Prints the path of a kube-apiserver binary for the Kubernetes store's
# contract tests: $KUBE_APISERVER if set, else one built from the Go module
# proxy into .cache/kube (about 8 minutes on 2 cores the first time, cached
# after that). The module is generated from hack/kube/*.in so that the main
# module never depends on k8s.io/kubernetes.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
K8S_VERSION=${K8S_VERSION:-v1.34.4}
BUILD_ID="$K8S_VERSION -N -l"
if [ -n "${KUBE_APISERVER:-}" ]; then echo "$KUBE_APISERVER"; exit 0; fi
dir=.cache/kube
bin=$dir/bin/kube-apiserver
stamp=$dir/bin/kube-apiserver.version
if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$BUILD_ID" ]; then echo "$PWD/$bin"; exit 0; fi

echo "building kube-apiserver $K8S_VERSION from the Go module proxy into $dir (once; ~8 min on 2 cores)" >&2
start=$(date +%s)
src=$dir/src
rm -rf "$src"; mkdir -p "$src" "$dir/bin"
# k8s.io/kubernetes requires its staging modules at v0.0.0 with replaces into
# ./staging, which a module zip does not carry: point each at its release.
gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
staging=v0${K8S_VERSION#v1}
replaces=$(grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging" '{print "\t"$1" => "$1" "v}')
awk -v ver="$K8S_VERSION" -v rep="$replaces" '{gsub("@K8S_VERSION@", ver); if ($0 == "@REPLACES@") print rep; else print}' hack/kube/go.mod.in > "$src/go.mod"
cp hack/kube/tools.go.in "$src/tools.go"
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
# A test fixture: compiled without optimisation (-N -l), which shortens the
# cold build that CI pays on every fresh machine.
(cd "$src" && GOFLAGS=-mod=mod go mod tidy >&2 && CGO_ENABLED=0 go build -trimpath -gcflags=all="-N -l" -ldflags "$ldflags" -o "$PWD/../bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2)
echo "$BUILD_ID" > "$stamp"
echo "built kube-apiserver in $(( $(date +%s) - start )) s" >&2
echo "$PWD/$bin"
