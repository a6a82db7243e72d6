# nbd-csi image: one binary serving the controller (non-root) and the node
# plugin (privileged, set by the chart). Build: make image.
#
# syntax=docker/dockerfile:1
ARG GO_VERSION=1.26
FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG SOURCE_DATE_EPOCH=0
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false \
	-ldflags "-s -w -X main.version=${VERSION}" -o /out/nbd-csi ./cmd/nbd-csi

FROM debian:bookworm-slim
ARG VERSION=dev
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="nbd-csi" \
	org.opencontainers.image.description="Kubernetes CSI driver for NBD (Network Block Device) exports" \
	org.opencontainers.image.licenses="Apache-2.0" \
	org.opencontainers.image.version="${VERSION}" \
	org.opencontainers.image.revision="${COMMIT}"
# mkfs/blkid/resize (e2fsprogs, xfsprogs), mount/umount (util-linux, mount),
# modprobe (kmod).
RUN apt-get update && apt-get install -y --no-install-recommends \
		e2fsprogs xfsprogs util-linux mount kmod ca-certificates \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /out/nbd-csi /usr/bin/nbd-csi
# The controller runs as this user; the node DaemonSet runs as root,
# privileged (it attaches kernel devices and mounts).
USER 65532:65532
ENTRYPOINT ["/usr/bin/nbd-csi"]
