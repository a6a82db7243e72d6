# nbd-csi — see README.md. Every target works on a fresh Debian clone with Go:
# the targets that need Debian packages install them first with
# hack/install-deps.sh (as root; otherwise it prints the apt-get command).

SHELL        := /bin/bash
GO           ?= go
BIN          := bin
# One version for the image tag, the binary and the chart: a release tag
# vX.Y.Z on HEAD gives X.Y.Z, which must equal the chart's appVersion (the
# chart's default image tag); any other commit builds as the appVersion.
APP_VERSION  := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' charts/nbd-csi/Chart.yaml)
VERSION      ?= $(patsubst v%,%,$(or $(shell git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null),$(APP_VERSION)))
IMAGE        ?= ghcr.io/nbd-csi/nbd-csi:$(VERSION)
COMMIT       ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS      := -X main.version=$(VERSION) -X main.commit=$(COMMIT)
FUZZTIME     ?= 5s
# Fuzz targets run briefly by `make test`: package:target pairs.
FUZZ_TARGETS := \
	./pkg/nbd:FuzzParseURI \
	./pkg/nbd:FuzzHandshake \
	./pkg/nbd:FuzzReplies \
	./pkg/nbd:FuzzDecodeInfo \
	./pkg/nbd:FuzzServerKey \
	./pkg/ktls:FuzzStream

DEPS         := hack/install-deps.sh

.PHONY: all build test e2e e2e-smoke kube unit fuzz vm-test bench demo lint verify generate image release clean

all: build

## build: the nbd-csi binary in bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/nbd-csi ./cmd/nbd-csi

## test: every test — unit, interop against real NBD servers, the Kubernetes store on a real API server, fuzz (briefly), real kernel in the VM.
## Installs the Debian packages it needs, and forbids skipping: a test that would skip for lack of a server, the VM rig or the API server fails.
test: export NBDCSI_REQUIRE_SERVERS := 1
test: export NBDCSI_REQUIRE_VM := 1
test: export NBDCSI_REQUIRE_KUBE := 1
test:
	$(DEPS) test
	$(MAKE) verify kube unit fuzz vm-test

## kube: build kube-apiserver from the Go module proxy into .cache/kube for the Kubernetes store's tests (once: ~9 min on 2 cores)
kube:
	@hack/kube-apiserver.sh >/dev/null

## unit: unit and interop tests on the host (real nbdkit/qemu-nbd/nbd-server, etcd + kube-apiserver when built); VM tests are skipped here (-short)
unit:
	$(DEPS) test
	$(GO) test -race -short -count=1 ./...
	cd test/e2e && $(GO) test -race -count=1 ./tools/...

## fuzz: run each fuzz target for $(FUZZTIME)
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 200x $$pkg; \
	done

## vm-test: kernel tests inside a QEMU VM running Debian's 6.1 kernel (test/vm/README.md)
vm-test:
	$(DEPS) vm
	$(GO) test -count=1 -timeout 10m -run '^TestVM' ./test/vm/
	hack/vm-test.sh

## e2e: the cluster suite (test/e2e/README.md); E2E_PROVIDER=kind (default: Docker + host nbd) or vm (QEMU worker, no Docker needed)
E2E_PROVIDER ?= kind
e2e:
	E2E_PROVIDER=$(E2E_PROVIDER) test/e2e/run.sh

## e2e-smoke: what CI runs after make test: the vm provider, one worker, the chart as shipped, TestDataSurvivesPods and TestNodePluginRestartWhileWriting (root)
e2e-smoke:
	E2E_PROVIDER=vm E2E_SMOKE=1 test/e2e/run.sh

## bench: benchmarks against the reference tools, same run, with ratios
bench: build
	$(DEPS) test
	$(GO) test -run '^$$' -bench . -benchtime 200x ./pkg/nbd/
	bench/handshake.sh
	bench/kernel.sh
	bench/ktls.sh
	$(GO) test -run '^$$' -bench BenchmarkCreateDelete -benchtime 200x ./pkg/driver/
	$(GO) test -run '^$$' -bench BenchmarkWipe -benchtime 1x -timeout 30m -v ./bench/wipe/
	KUBE_APISERVER=$$(hack/kube-apiserver.sh) $(GO) test -run '^$$' -bench BenchmarkKubeClaimRelease -benchtime 200x -timeout 30m ./pkg/store/kubestore/

## demo: start a real NBD server and show what nbd-csi does with it
demo: build
	$(DEPS) demo
	hack/demo.sh

## lint: static checks
# vet with the flags of every static build of this module (the VM's test
# binaries, the release and e2e image binaries: CGO_ENABLED=0 -trimpath),
# so that cold they compile the dependencies once, not twice (no package of
# this module uses cgo).
lint:
	@cgo=$$($(GO) list -f '{{range .CgoFiles}}{{$$.Dir}}/{{.}} {{end}}' ./...); if [ -n "$$cgo" ]; then echo "cgo files, which make lint's vet (CGO_ENABLED=0) would skip: $$cgo"; exit 1; fi
	CGO_ENABLED=0 $(GO) vet -trimpath ./...
	cd test/e2e && $(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	hack/verify-license.sh

## verify: everything `make test` checks before running tests (incl. CRDs and deploy/ up to date)
verify: lint
	$(GO) mod verify >/dev/null
	@for m in . test/e2e hack/tools; do (cd $$m && $(GO) mod tidy -diff >/dev/null) || { echo "$$m: go.mod/go.sum not tidy: run 'go mod tidy' there"; exit 1; }; done
	hack/verify-deploy.sh

## generate: CRDs from pkg/apis (controller-gen), then deploy/kubernetes from the Helm chart
generate:
	hack/generate-crds.sh
	hack/generate-deploy.sh

## image: the container image IMAGE (needs a Docker engine; VENDORED=true builds without reaching the module proxy)
image:
	@if [ "$(VENDORED)" = true ]; then trap 'rm -rf vendor' EXIT; $(GO) mod vendor || exit 1; fi; \
	docker build --build-arg VENDORED=$(or $(VENDORED),false) --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) -t $(IMAGE) .

## release: every release artifact in dist/ without pushing: binaries for linux/amd64 and arm64, SHA256SUMS, the chart package, and the multi-arch image where docker buildx is present
RELEASE_DIR ?= dist
release:
	VERSION=$(VERSION) hack/release.sh $(RELEASE_DIR)

clean:
	rm -rf $(BIN) build dist
