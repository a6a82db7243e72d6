#!/usr/bin/env bash
# Builds every release artifact locally, pushing nothing (the release
# workflow, .github/workflows/release.yml, runs the same steps and then
# pushes and signs): the nbd-csi binaries for linux/amd64 and linux/arm64,
# their SHA256SUMS, the chart package, and — where a Docker engine with
# buildx is present — the multi-arch image as an OCI archive with SBOM and
# provenance attestations; without buildx, as root, one docker-archive per
# architecture (nbd-csi-VERSION-image-linux-ARCH.tar, hack/release-image.sh;
# RELEASE_IMAGES=0 leaves the image out).
# Usage: hack/release.sh [OUTDIR]   (default dist/)
# RELEASE_ARCHES (default "amd64 arm64") narrows the binaries (the e2e
# smoke consumes only the chart and builds amd64 alone).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=${1:-dist}
app=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/nbd-csi/Chart.yaml)
chart=$(sed -n 's/^version: *\(.*\)$/\1/p' charts/nbd-csi/Chart.yaml)
version=${VERSION:-$app}
tag=$(git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null || true)
if [ -n "$tag" ] && [ "${tag#v}" != "$app" ]; then
	echo "release tag $tag does not match the chart's appVersion $app (the chart's default image tag)" >&2
	exit 1
fi
commit=$(git rev-parse HEAD)
rm -rf "$out"; mkdir -p "$out"
for arch in ${RELEASE_ARCHES:-amd64 arm64}; do
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch go build -trimpath -buildvcs=false \
		-ldflags "-s -w -X main.version=$version -X main.commit=$commit" \
		-o "$out/nbd-csi-$version-linux-$arch" ./cmd/nbd-csi
done
"$(hack/helm.sh)" package charts/nbd-csi --destination "$out" >/dev/null
if [ "${RELEASE_IMAGES:-1}" = 0 ]; then
	echo "RELEASE_IMAGES=0: image not built" >&2
elif docker buildx version >/dev/null 2>&1; then
	docker buildx build --platform linux/amd64,linux/arm64 \
		--build-arg VERSION="$version" --build-arg COMMIT="$commit" \
		--sbom=true --provenance=mode=max \
		--output "type=oci,dest=$out/nbd-csi-$version-image.oci.tar" \
		-t "ghcr.io/nbd-csi/nbd-csi:$version" .
elif [ "$(id -u)" -eq 0 ]; then
	# No container engine: the same image, one docker-archive per
	# architecture, from Debian's packages (hack/release-image.sh).
	for arch in ${RELEASE_ARCHES:-amd64 arm64}; do
		hack/release-image.sh "$arch" "$out/nbd-csi-$version-linux-$arch" "$version" "$commit" \
			"$out/nbd-csi-$version-image-linux-$arch.tar"
	done
else
	echo "no docker buildx and not root: image not built (run as root for docker-archive images made by hack/release-image.sh; the release workflow builds it with buildx)" >&2
fi
(cd "$out" && sha256sum nbd-csi-* > SHA256SUMS)
echo "release $version (chart $chart) in $out:"
ls -l "$out"
