# syntax=docker/dockerfile:1
# nbd-csi image: one binary serving the controller (non-root) and the node
# plugin (privileged, set by the chart). Build: make image (VERSION is the
# chart's appVersion or the release tag vX.Y.Z on HEAD; docs/install.md).
#
# The binary is reproducible: the Go toolchain is pinned by GO_VERSION, the
# modules by go.sum, and it is built with -trimpath and without VCS stamping
# (version and commit come from build args). Checked: the binary of an
# image built with VENDORED=true was bit-identical (sha256) to
# `go build -mod=vendor` with the same flags on the host. The Debian
# packages are whatever bookworm serves on the day; pin the base images by
# digest (--build-arg) for identical layers.
ARG GO_VERSION=1.26
ARG GO_IMAGE=golang:${GO_VERSION}-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${GO_IMAGE} AS build
WORKDIR /src
# VENDORED=true (make image VENDORED=true): the context carries vendor/ and
# nothing is downloaded, for builders that cannot reach the module proxy
# (air-gapped, or behind a TLS-intercepting proxy whose CA the image lacks).
ARG VENDORED=false
COPY go.mod go.sum ./
RUN [ "$VENDORED" = true ] || go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN mod=readonly; [ "$VENDORED" = true ] && mod=vendor; \
	CGO_ENABLED=0 go build -mod=$mod -trimpath -buildvcs=false \
	-ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/nbd-csi ./cmd/nbd-csi

FROM ${BASE_IMAGE}
ARG VERSION=dev
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="nbd-csi" \
	org.opencontainers.image.description="Kubernetes CSI driver for NBD (Network Block Device) exports" \
	org.opencontainers.image.source="https://github.com/nbd-csi/nbd-csi" \
	org.opencontainers.image.licenses="Apache-2.0" \
	org.opencontainers.image.version="${VERSION}" \
	org.opencontainers.image.revision="${COMMIT}"
# mkfs/fsck/blkid/resize (e2fsprogs, xfsprogs), mount/umount (mount,
# util-linux), modprobe (kmod), cryptsetup for encrypted volumes
# (cryptsetup-bin: the tool without the boot-time scripts); nbdkit for the
# export pool of deploy/examples/nbd-server-pool.yaml (`nbd-csi run-server -- nbdkit …`).
RUN apt-get update && apt-get install -y --no-install-recommends \
		e2fsprogs xfsprogs util-linux mount kmod cryptsetup-bin ca-certificates nbdkit \
	&& rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/ldconfig/aux-cache
COPY --from=build /out/nbd-csi /usr/bin/nbd-csi
# The controller runs as this user; the node DaemonSet runs as root,
# privileged (it attaches kernel devices and mounts).
USER 65532:65532
ENTRYPOINT ["/usr/bin/nbd-csi"]
