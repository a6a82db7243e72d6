#!/usr/bin/env bash
# Builds Kubernetes commands from the Go module proxy into .cache/kube/bin and
# prints their paths, one per line: hack/kube-build.sh kube-apiserver kubelet …
# (also e2e.test, a slim External Storage suite, and agnhost, a test image).
# The module is generated from hack/kube/*.in (k8s.io/kubernetes with one
# replace per staging module), so the main module never depends on
# k8s.io/kubernetes. Each binary is rebuilt only when its stamp (version and
# flags) changes. All are compiled with the same flags (optimised), so the
# packages they share — most of them: the API types, client-go, apimachinery
# — compile once into the Go build cache: kube-apiserver for make test, then
# the e2e's control plane and node commands reuse them. (An unoptimised
# kube-apiserver compiled about 28% faster, but then nothing of it was shared
# and the e2e's cold build compiled the whole tree a second time.)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
K8S_VERSION=${K8S_VERSION:-v1.34.4}
dir=$PWD/.cache/kube
src="" # the generated module a command builds in (set by prepare)
mkdir -p "$dir/bin"

# Two generated modules: src for the commands (what make test needs) and
# src-e2e for e2e.test and agnhost (what make e2e needs), so that the test
# suite's dependencies never weigh on make test.
prepared=""
prepare() { # prepare src|src-e2e
	local name=$1 files key
	case $name in
	src) files="hack/kube/go.mod.in hack/kube/tools.go.in" ;;
	src-e2e) files="hack/kube/go.mod.in hack/kube/e2e-tools.go.in hack/kube/e2e_test.go.in" ;;
	esac
	src=$dir/$name
	case " $prepared " in *" $name "*) return ;; esac
	prepared="$prepared $name"
	# shellcheck disable=SC2086
	key="$K8S_VERSION $(cat $files | sha256sum | cut -c1-16)"
	if [ -f "$src/go.sum" ] && [ "$(cat "$src/version" 2>/dev/null)" = "$key" ]; then
		return
	fi
	echo "kube-build: preparing the k8s.io/kubernetes $K8S_VERSION module in $src" >&2
	rm -rf "$src"; mkdir -p "$src"
	# k8s.io/kubernetes requires its staging modules at v0.0.0 with replaces
	# into ./staging, which a module zip does not carry: point each at its
	# release.
	local gomod staging replaces
	gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
	staging=v0${K8S_VERSION#v1}
	replaces=$(grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging" '{print "\t"$1" => "$1" "v}')
	awk -v ver="$K8S_VERSION" -v rep="$replaces" '{gsub("@K8S_VERSION@", ver); if ($0 == "@REPLACES@") print rep; else print}' hack/kube/go.mod.in > "$src/go.mod"
	case $name in
	src) cp hack/kube/tools.go.in "$src/tools.go" ;;
	src-e2e)
		cp hack/kube/e2e-tools.go.in "$src/tools.go"
		mkdir -p "$src/e2e"
		cp hack/kube/e2e_test.go.in "$src/e2e/e2e_test.go"
		;;
	esac
	(cd "$src" && GOFLAGS=-mod=mod go mod tidy >&2)
	echo "$key" > "$src/version"
}

minor=$(echo "$K8S_VERSION" | cut -d. -f2)
# Test infrastructure, never debugged: no DWARF, neither compiled
# (-dwarf=false: about a tenth of the compile's CPU) nor linked (-s -w).
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
for cmd in "$@"; do
	case $cmd in
	kube-apiserver | kube-controller-manager | kube-scheduler | kubelet | kube-proxy | kubectl | e2e.test | agnhost) ;;
	*) echo "kube-build: unknown command $cmd" >&2; exit 2 ;;
	esac
	bin=$dir/bin/$cmd
	id="$K8S_VERSION"
	stale() { [ ! -x "$bin" ] || [ "$(cat "$bin.version" 2>/dev/null)" != "$id" ]; }
	# One build at a time (make test's kube-apiserver and the e2e's
	# prebuild may run side by side): the generated module is rewritten by
	# prepare. Checked again under the lock: the other may have built it.
	if stale; then
		exec 9>"$dir/.build.lock"
		flock 9
	fi
	if stale; then
		case $cmd in e2e.test | agnhost) prepare src-e2e ;; *) prepare src ;; esac
		echo "kube-build: building $cmd $K8S_VERSION from the Go module proxy (once)" >&2
		start=$(date +%s)
		case $cmd in
		e2e.test) (cd "$src" && CGO_ENABLED=0 go test -c -trimpath -gcflags=all=-dwarf=false -ldflags "$ldflags" -o "$bin" ./e2e >&2) ;;
		agnhost) (cd "$src" && CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false -ldflags "$ldflags" -o "$bin" k8s.io/kubernetes/test/images/agnhost >&2) ;;
		*) (cd "$src" && CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false -ldflags "$ldflags" -o "$bin" "k8s.io/kubernetes/cmd/$cmd" >&2) ;;
		esac
		echo "$id" > "$bin.version"
		echo "kube-build: built $cmd in $(( $(date +%s) - start )) s" >&2
	fi
	exec 9>&-
	echo "$bin"
done
