#!/usr/bin/env bash
# The e2e "vm" cluster provider, for hosts whose kernel has no nbd module or
# that run no Docker: the control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) runs as processes on the host;
# E2E_NODES worker nodes (default 2: fencing and cross-node tests need two)
# boot Debian's cloud kernel (which has nbd.ko) under QEMU from one Debian
# root filesystem with containerd, kubelet and kube-proxy, and join over a
# private bridge (host 10.99.0.1, node N at 10.99.0.(1+N), named vmnodeN).
# E2E_NODES_WITHOUT_NBD more nodes (default 0; make e2e: 1), numbered after
# those, boot with module_blacklist=nbd on the kernel command line: their
# kernel refuses the nbd module, as on a distribution without nbd.ko.
# Each node runs on a copy-on-write overlay of the shared disk; its identity
# (name, address, kubelet certificates, pod subnet) is a tar on a second disk.
# Everything is built from Debian's apt and the Go module proxy, cached in
# .cache/e2e; images are built locally and baked into the node.
#
#   test/e2e/vm/cluster.sh build    # binaries, root filesystem, images (cached)
#   test/e2e/vm/cluster.sh prebuild # only the Go builds of build (no root needed)
#   test/e2e/vm/cluster.sh rootfs   # only the root filesystem of build
#   test/e2e/vm/cluster.sh up       # start the cluster; prints KUBECONFIG=…
#   test/e2e/vm/cluster.sh sh CMD   # run CMD on node E2E_NODE (default 1)
#   test/e2e/vm/cluster.sh load TAR # import an image tar into every node
#   test/e2e/vm/cluster.sh logs DIR # collect logs (host components and node)
#   test/e2e/vm/cluster.sh down     # stop everything, remove the tap device
#
# Needs root (tap device, debootstrap, chroot); build and up install the
# Debian packages they need themselves (hack/install-deps.sh e2e-vm).
#
# Fails fast: a node VM, a control-plane process or a build step that fails
# stops the run at once with the last lines of its log on screen, and up
# stops what it started (E2E_KEEP=1 keeps it for a look). QEMU uses KVM only
# after a probe boot with it succeeded (test/vm; NBDCSI_VM_ACCEL=kvm|tcg
# forces either).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ROOT=$PWD
E2E=${E2E_CACHE:-$ROOT/.cache/e2e}
RUN=$E2E/run
FILES=$ROOT/test/e2e/vm/files
BRIDGE=${E2E_BRIDGE:-nbdcsie2e0}
HOST_IP=10.99.0.1
NODES=${E2E_NODES:-2}
NONBD=${E2E_NODES_WITHOUT_NBD:-0}
MEM_NONBD=${E2E_VM_MEM_WITHOUT_NBD:-2048}
# all_nodes: the number of node VMs, nbd-capable and not (what up started,
# for the later sh, load, logs and down).
all_nodes() {
	if [ -f "$RUN/nodes" ]; then cat "$RUN/nodes"; else echo $((NODES + NONBD)); fi
}
# has_nbd N: whether node N's kernel may load nbd.
has_nbd() { [ "$1" -le "$NODES" ]; }
APISERVER_PORT=6443
MEM=${E2E_VM_MEM:-3072}
CPUS=${E2E_VM_CPUS:-2}
node_name() { echo "vmnode$1"; }
node_ip() { echo "10.99.0.$((1 + $1))"; }
node_tap() { echo "${BRIDGE%0}$1"; }

log() { echo "[vm-cluster $(date +%T)] $*" >&2; }
die() { log "$*"; exit 1; }

# tail_log FILE: the last lines of FILE, indented, for an error message.
tail_log() {
	if [ -s "$1" ]; then
		echo "--- last lines of $1:"
		tail -n "${E2E_TAIL:-20}" "$1" | sed 's/^/    /'
	else
		echo "--- $1 is empty or missing"
	fi
}

# check_procs: every process start_bg started (control plane, node VMs) must
# still run; the first that exited stops the run with its log on screen.
check_procs() {
	local f name
	for f in "$RUN"/pids/*; do
		[ -e "$f" ] || continue
		name=$(basename "$f")
		kill -0 "$(cat "$f")" 2>/dev/null && continue
		case $name in
		qemu*)
			die "QEMU of $(node_name "${name#qemu}") exited
$(tail_log "$RUN/logs/$name.log")
$(tail_log "$RUN/logs/console${name#qemu}.log")"
			;;
		nbdkit) ;; # nbd-server.sh's, which reports its own failures
		*)
			die "$name exited
$(tail_log "$RUN/logs/$name.log")"
			;;
		esac
	done
}

# ---------------------------------------------------------------- build

kernel_deb() {
	local deb
	local cache=${NBDCSI_VM_CACHE:-$ROOT/.cache/vm}
	deb=$(ls "$cache"/kernel/*/kernel.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ]; then
		# The test/vm rig downloads and caches the kernel package.
		go run ./test/vm/cmd/vmrun -q -- true >/dev/null
		deb=$(ls "$cache"/kernel/*/kernel.deb | head -n1)
	fi
	echo "$deb"
}

build_rootfs() {
	if [ -f "$E2E/rootfs.tar" ]; then return; fi
	log "debootstrap of the node root filesystem (once, ~3 min)"
	# A debootstrap killed half-way (.ci/run's KILL, the OOM killer) leaves
	# its mounts (proc, sys) inside, where rm -rf would fail.
	local m
	for m in $(findmnt -rn -o TARGET | awk -v p="$E2E/rootfs.new/" 'index($0, p) == 1' | sort -r); do umount -l "$m" || true; done
	rm -rf "$E2E/rootfs.new"
	debootstrap --variant=minbase \
		--include=containerd,runc,containernetworking-plugins,iptables,iproute2,util-linux,mount,kmod,e2fsprogs,xfsprogs,procps,ca-certificates,conntrack,socat,ethtool,iputils-ping \
		bookworm "$E2E/rootfs.new" http://deb.debian.org/debian >"$E2E/debootstrap.log" 2>&1 ||
		die "debootstrap failed
$(tail_log "$E2E/debootstrap.log")"
	tar -C "$E2E/rootfs.new" -cf "$E2E/rootfs.tar.new" . || die "archiving the root filesystem failed"
	mv "$E2E/rootfs.tar.new" "$E2E/rootfs.tar"
	rm -rf "$E2E/rootfs.new"
}

# copy_with_libs ROOTFS DEST BIN...: copies binaries of ROOTFS and the
# shared libraries they load into DEST.
copy_with_libs() {
	local rootfs=$1 dest=$2
	shift 2
	local f lib
	for f in "$@"; do
		mkdir -p "$dest/$(dirname "$f")"
		cp -aL "$rootfs/$f" "$dest/$f"
		for lib in $(chroot "$rootfs" ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
			mkdir -p "$dest/$(dirname "$lib")"
			[ -e "$dest/$lib" ] || cp -aL "$rootfs/$lib" "$dest/$lib"
		done
	done
}

mkimage() { (cd "$ROOT/test/e2e" && go run ./tools/mkimage "$@"); }

# app_version: the chart's appVersion, its default nbd-csi image tag.
app_version() { sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/charts/nbd-csi/Chart.yaml"; }
# nbdcsi_image: the chart's default nbd-csi image reference.
nbdcsi_image() { echo "ghcr.io/nbd-csi/nbd-csi:$(app_version)"; }

build_images() {
	local img=$E2E/images work=$E2E/imgwork
	mkdir -p "$img"
	rm -rf "$work"; mkdir -p "$work"
	# pause: our own, under the name containerd asks for.
	if [ ! -f "$img/pause.tar" ]; then
		mkdir -p "$work/pause"
		(cd test/e2e && CGO_ENABLED=0 go build -o "$work/pause/pause" ./images/pause)
		mkimage -name registry.k8s.io/pause:3.10.1 -rootfs "$work/pause" -entrypoint '["/pause"]' -out "$img/pause.tar"
	fi
	# busybox for the test pods.
	mkdir -p "$work/busybox/bin" "$work/busybox/tmp"
	cp /bin/busybox "$work/busybox/bin/busybox"
	for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$work/busybox/bin/$a"; done
	if [ ! -f "$img/busybox.tar" ]; then
		mkimage -name nbd-csi-e2e/busybox:1 -rootfs "$work/busybox" -cmd '["sh"]' -out "$img/busybox.tar"
	fi
	# ... and under the name the README's quick start gives its pod
	# (busybox:1.37; Debian's busybox, the pod only runs sh in it).
	if [ ! -f "$img/busybox-1.37.tar" ]; then
		mkimage -name docker.io/library/busybox:1.37 -rootfs "$work/busybox" -cmd '["sh"]' -out "$img/busybox-1.37.tar"
	fi
	# The images the upstream External Storage suite runs, under the names
	# it asks for: its busybox, agnhost (built from the module proxy) on
	# busybox, and for nginx and jessie-dnsutils stand-ins (busybox; the
	# suite only runs shell commands in them). Not when the suite will not
	# run (E2E_STORAGE=0: the smoke, whose cold start in CI they would
	# lengthen by an agnhost build).
	if [ "${E2E_STORAGE:-1}" = 0 ]; then
		log "E2E_STORAGE=0: the upstream suite's images are not built"
	else
		build_suite_images "$img" "$work"
	fi
	build_rest_images "$img" "$work"
}

# build_suite_images IMG WORK: the upstream External Storage suite's images.
build_suite_images() {
	local img=$1 work=$2
	if [ ! -f "$img/e2e-busybox.tar" ]; then
		mkimage -name registry.k8s.io/e2e-test-images/busybox:1.37.0-1 -rootfs "$work/busybox" -cmd '["sh"]' -out "$img/e2e-busybox.tar"
	fi
	# multiVolume specs run their commands (dd, md5sum, sh) in
	# jessie-dnsutils: busybox under that name stands in.
	if [ ! -f "$img/e2e-jessie-dnsutils.tar" ]; then
		mkimage -name registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7 -rootfs "$work/busybox" -cmd '["sh"]' -out "$img/e2e-jessie-dnsutils.tar"
	fi
	if [ ! -f "$img/e2e-agnhost.tar" ]; then
		mkdir -p "$work/agnhost"; cp -a "$work/busybox/." "$work/agnhost/"
		cp "$(hack/kube-build.sh agnhost)" "$work/agnhost/agnhost"
		mkimage -name registry.k8s.io/e2e-test-images/agnhost:2.56 -rootfs "$work/agnhost" -entrypoint '["/agnhost"]' -cmd '["pause"]' -out "$img/e2e-agnhost.tar"
	fi
	if [ ! -f "$img/e2e-nginx.tar" ]; then
		mkdir -p "$work/nginx"; cp -a "$work/busybox/." "$work/nginx/"; mkdir -p "$work/nginx/usr/share/nginx/html"
		mkimage -name registry.k8s.io/e2e-test-images/nginx:1.14-4 -rootfs "$work/nginx" \
			-entrypoint '["/bin/httpd","-f","-p","80","-h","/usr/share/nginx/html"]' -out "$img/e2e-nginx.tar"
	fi
}

# build_sidecars: the CSI sidecars at the releases the chart pins, built
# from their upstream source under the image names the chart's defaults
# give (registry.k8s.io/sig-storage/CMD:VERSION; test/chart
# TestChartE2EValues checks they agree), so the chart installs them
# unchanged. Three come from the Go module proxy; node-driver-registrar's
# module is not served there, so its upstream source is kept verbatim in
# test/e2e/third_party.
build_sidecars() {
	build_sidecar provisioner github.com/kubernetes-csi/external-provisioner/v6 v6.4.0 csi-provisioner
	build_sidecar attacher github.com/kubernetes-csi/external-attacher/v4 v4.13.0 csi-attacher
	build_sidecar resizer github.com/kubernetes-csi/external-resizer/v2 v2.3.0 csi-resizer
	build_sidecar registrar ./test/e2e/third_party/node-driver-registrar v2.17.0 csi-node-driver-registrar
}

# build_rest_images IMG WORK: the sidecars (built by build_sidecars unless
# cached) and nbd-csi.
build_rest_images() {
	local img=$1 work=$2
	build_sidecars
	# nbd-csi, always rebuilt (it is what is under test): the binary plus the
	# filesystem and module tools the node plugin runs, from the node's
	# Debian root filesystem, under the chart's default image reference
	# (ghcr.io/nbd-csi/nbd-csi:APPVERSION), so the chart installs it with its
	# default values.
	log "nbd-csi image $(nbdcsi_image)"
	local rf=$E2E/rootfs-img
	if [ ! -d "$rf/usr" ]; then mkdir -p "$rf" && tar -C "$rf" -xf "$E2E/rootfs.tar"; fi
	mkdir -p "$work/nbd-csi/usr/local/bin" "$work/nbd-csi/tmp" "$work/nbd-csi/etc" "$work/nbd-csi/run"
	CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=$(app_version) -X main.commit=$(git rev-parse HEAD)" -o "$work/nbd-csi/usr/local/bin/nbd-csi" ./cmd/nbd-csi
	copy_with_libs "$rf" "$work/nbd-csi" \
		/usr/sbin/mkfs.ext4 /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/fsck.ext4 /usr/sbin/resize2fs /usr/sbin/dumpe2fs /usr/sbin/tune2fs \
		/usr/sbin/mkfs.xfs /usr/sbin/xfs_repair /usr/sbin/xfs_growfs /usr/sbin/xfs_db /usr/sbin/xfs_io /usr/sbin/fsck.xfs \
		/usr/sbin/blkid /usr/bin/mount /usr/bin/umount /usr/sbin/fsck /usr/sbin/blockdev /usr/bin/kmod
	ln -sf /usr/bin/kmod "$work/nbd-csi/usr/sbin/modprobe"
	[ -f "$rf/etc/mke2fs.conf" ] && cp "$rf/etc/mke2fs.conf" "$work/nbd-csi/etc/"
	for d in bin sbin lib lib64; do [ -e "$work/nbd-csi/$d" ] || ln -s "usr/$d" "$work/nbd-csi/$d"; done
	mkimage -name "$(nbdcsi_image)" -rootfs "$work/nbd-csi" -entrypoint '["/usr/local/bin/nbd-csi"]' -out "$img/nbd-csi.tar"
	rm -rf "$work"
}

# build_sidecar NAME SOURCE VERSION CMD: builds an upstream CSI sidecar
# into the image registry.k8s.io/sig-storage/CMD:VERSION (the reference the
# chart's defaults give), cached as images/NAME-VERSION.tar. SOURCE is a
# module (MODULE@VERSION from the Go module proxy) or ./DIR, upstream source
# kept in this repository; either is built as its own main module with its
# dependencies from the proxy (-mod=mod: no vendor directory), without DWARF
# (as hack/kube-build.sh: test infrastructure; a tenth less compile CPU).
build_sidecar() {
	local name=$1 mod=$2 ver=$3 cmd=$4 img=$E2E/images
	[ -f "$img/$name-$ver.tar" ] && return
	mkdir -p "$img"
	rm -f "$img/$name.tar" "$img/$name"-*.tar
	log "building $cmd $ver from upstream source and the Go module proxy (once)"
	local dir src
	case $mod in
	./*) dir=$ROOT/${mod#./} ;;
	*) dir=$(go mod download -json "$mod@$ver" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p') ;;
	esac
	[ -f "$dir/go.mod" ] || die "$cmd: no go.mod in $dir"
	src=$E2E/src/$name
	rm -rf "$src"; mkdir -p "$src"
	cp -r "$dir/." "$src/"; chmod -R u+w "$src"
	mkdir -p "$E2E/imgwork/$name"
	(cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -gcflags=all=-dwarf=false -ldflags "-s -w -X main.version=$ver" -o "$E2E/imgwork/$name/$cmd" "./cmd/$cmd" >&2) ||
		die "building $cmd $ver failed"
	mkimage -name "registry.k8s.io/sig-storage/$cmd:$ver" -rootfs "$E2E/imgwork/$name" -entrypoint "[\"/$cmd\"]" -out "$img/$name-$ver.tar"
}

# kill_tree PID: PID and every process below it.
kill_tree() {
	local c
	for c in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$c"; done
	kill "$1" 2>/dev/null || true
}

# prebuild: the Go builds of build that need neither root nor the root
# filesystem: the Kubernetes commands, then the pinned sidecars (cached).
# .ci/run starts it, and rootfs, beside make test (nice 19), as a head start
# for the smoke: build finds what they finished and builds the rest.
prebuild() {
	mkdir -p "$E2E"
	log "Kubernetes binaries"
	hack/kube-build.sh kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy >/dev/null
	build_sidecars
}

# rootfs: the nodes' root filesystem alone (debootstrap; root, cached).
rootfs() {
	mkdir -p "$E2E"
	hack/install-deps.sh e2e-vm
	build_rootfs
}

ROOTFS_PID=""
build() {
	mkdir -p "$E2E"
	hack/install-deps.sh e2e-vm
	# The debootstrap waits mostly on the network and dpkg, the Go builds on
	# the CPU: cold, it runs beside them (build_rootfs's die says why it
	# failed; a failed Go build stops it).
	if [ ! -f "$E2E/rootfs.tar" ]; then
		build_rootfs &
		ROOTFS_PID=$!
		trap '[ -z "$ROOTFS_PID" ] || kill_tree "$ROOTFS_PID"' EXIT
	fi
	prebuild
	if [ -n "$ROOTFS_PID" ]; then
		wait "$ROOTFS_PID" || exit 1
		ROOTFS_PID=""
		trap - EXIT
	fi
	build_images
	log "built: $(ls "$E2E/images" | tr '\n' ' ')"
}

# ---------------------------------------------------------------- PKI

pki() {
	local p=$RUN/pki
	mkdir -p "$p"
	cd "$p"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=nbd-csi-e2e-ca" 2>/dev/null
	openssl genrsa -out sa.key 2048 2>/dev/null
	openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	cert() { # name subject sans
		openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
		printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n%s' "${3:+subjectAltName=$3}" > "$1.ext"
		openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 2 -extfile "$1.ext" 2>/dev/null
	}
	cert apiserver "/CN=kube-apiserver" "IP:$HOST_IP,IP:10.0.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
	cert admin "/O=system:masters/CN=admin"
	cert kcm "/CN=system:kube-controller-manager"
	cert scheduler "/CN=system:kube-scheduler"
	cert proxy "/CN=system:kube-proxy"
	local who i
	for who in admin kcm scheduler proxy; do
		kubeconfig "$who" > "$who.kubeconfig"
	done
	for i in $(seq "$(all_nodes)"); do
		cert "node$i" "/O=system:nodes/CN=system:node:$(node_name "$i")"
		cert "kubelet$i" "/CN=$(node_name "$i")" "IP:$(node_ip "$i"),DNS:$(node_name "$i")"
		kubeconfig "node$i" > "node$i.kubeconfig"
	done
	cd "$ROOT"
}

kubeconfig() {
	local p=$RUN/pki
	cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://$HOST_IP:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$p/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 < "$p/$1.crt")
    client-key-data: $(base64 -w0 < "$p/$1.key")
contexts:
- name: e2e
  context: {cluster: e2e, user: $1}
current-context: e2e
EOF
}

# ---------------------------------------------------------------- up / down

start_bg() { # name cmd...: starts a host process, remembers its pid
	local name=$1
	shift
	setsid "$@" >"$RUN/logs/$name.log" 2>&1 < /dev/null &
	echo $! > "$RUN/pids/$name"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

control_plane() {
	local p=$RUN/pki bin=$ROOT/.cache/kube/bin etcdc etcdp
	etcdc=$(free_port); etcdp=$(free_port)
	start_bg etcd etcd --name=e2e --data-dir="$RUN/etcd" \
		--listen-client-urls=http://127.0.0.1:$etcdc --advertise-client-urls=http://127.0.0.1:$etcdc \
		--listen-peer-urls=http://127.0.0.1:$etcdp --initial-advertise-peer-urls=http://127.0.0.1:$etcdp \
		--initial-cluster=e2e=http://127.0.0.1:$etcdp --log-level=warn
	start_bg kube-apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:$etcdc \
		--bind-address=$HOST_IP --advertise-address=$HOST_IP --secure-port=$APISERVER_PORT \
		--tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
		--client-ca-file="$p/ca.crt" --authorization-mode=Node,RBAC --allow-privileged=true \
		--service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$p/sa.pub" \
		--service-account-signing-key-file="$p/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
		--kubelet-client-certificate="$p/admin.crt" --kubelet-client-key="$p/admin.key" \
		--kubelet-preferred-address-types=InternalIP,Hostname --enable-priority-and-fairness=false
	local deadline=$((SECONDS + 120))
	until curl -sfk --max-time 5 --cert "$p/admin.crt" --key "$p/admin.key" "https://$HOST_IP:$APISERVER_PORT/readyz" >/dev/null 2>&1; do
		check_procs
		[ "$SECONDS" -lt "$deadline" ] || die "kube-apiserver not ready after 120 s
$(tail_log "$RUN/logs/kube-apiserver.log")
$(tail_log "$RUN/logs/etcd.log")"
		sleep 0.2
	done
	start_bg kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$p/kcm.kubeconfig" \
		--authentication-kubeconfig="$p/kcm.kubeconfig" --authorization-kubeconfig="$p/kcm.kubeconfig" \
		--service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
		--use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 --secure-port="$(free_port)"
	start_bg kube-scheduler "$bin/kube-scheduler" --kubeconfig="$p/scheduler.kubeconfig" \
		--authentication-kubeconfig="$p/scheduler.kubeconfig" --authorization-kubeconfig="$p/scheduler.kubeconfig" \
		--leader-elect=false --bind-address=127.0.0.1 --secure-port="$(free_port)"
}

node_disk() {
	local rf=$RUN/rootfs deb
	log "node disk"
	rm -rf "$rf"; mkdir -p "$rf"
	tar -C "$rf" -xf "$E2E/rootfs.tar"
	deb=$(kernel_deb)
	local kx=$RUN/kernel
	rm -rf "$kx"; mkdir -p "$kx"
	dpkg -x "$deb" "$kx"
	REL=$(ls "$kx/lib/modules")
	mkdir -p "$rf/lib/modules"
	cp -a "$kx/lib/modules/$REL" "$rf/lib/modules/"
	depmod -b "$rf" "$REL"
	VMLINUZ=$kx/boot/vmlinuz-$REL
	install -m 0755 "$ROOT/.cache/kube/bin/kubelet" "$ROOT/.cache/kube/bin/kube-proxy" "$rf/usr/local/bin/"
	install -m 0755 "$FILES/vminit" "$rf/sbin/vminit"
	mkdir -p "$rf/etc/containerd" "$rf/etc/cni/net.d" "$rf/etc/kubernetes/pki" "$rf/opt/images" "$rf/var/lib/kubelet"
	cp "$FILES/containerd.toml" "$rf/etc/containerd/config.toml"
	rm -f "$rf"/etc/cni/net.d/*
	cp "$FILES/10-bridge.conflist" "$rf/etc/cni/net.d/"
	cp "$FILES/kubelet.yaml" "$rf/etc/kubernetes/kubelet.yaml"
	cp "$RUN/pki/ca.crt" "$rf/etc/kubernetes/pki/"
	cp "$RUN/pki/proxy.kubeconfig" "$rf/etc/kubernetes/kube-proxy.kubeconfig"
	cp "$E2E"/images/*.tar "$rf/opt/images/"
	: > "$rf/etc/kubelet-resolv.conf"
	mkfs.ext4 -q -F -L e2eroot -d "$rf" "$RUN/node.img" 8G
	rm -rf "$rf"
	local i
	for i in $(seq "$(all_nodes)"); do node_identity "$i"; done
	# initramfs: busybox and the virtio modules.
	local ir=$RUN/initramfs
	rm -rf "$ir"; mkdir -p "$ir/bin" "$ir/modules"
	cp /bin/busybox "$ir/bin/busybox"
	local m
	for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
		find "$kx/lib/modules/$REL" -name "$m.ko*" -exec cp {} "$ir/modules/" \;
	done
	# The initramfs loads them with busybox insmod, which reads plain .ko.
	for m in "$ir"/modules/*.ko.xz; do [ -e "$m" ] && xz -d "$m"; done
	cp "$FILES/init" "$ir/init"
	(cd "$ir" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$RUN/initrd.img")
	rm -rf "$ir"
	echo "$VMLINUZ" > "$RUN/vmlinuz"
}

# node_identity N: node N's overlay of the shared disk and the tar (read by
# vminit from /dev/vdb) that makes it vmnodeN: name, address, kubelet
# certificates and kubeconfig, its own pod subnet, machine id.
node_identity() {
	local i=$1 d=$RUN/node$i
	rm -rf "$d"; mkdir -p "$d/etc/kubernetes/pki" "$d/etc/cni/net.d"
	qemu-img create -q -f qcow2 -F raw -b "$RUN/node.img" "$RUN/node$i.qcow2"
	node_name "$i" > "$d/etc/hostname"
	# Pod traffic between nodes: a route to every other node's pod subnet
	# through that node (pods reach each other's Services across nodes:
	# the quick start's controller dials the nbdkit pod on another node).
	local j routes=""
	for j in $(seq "$(all_nodes)"); do
		[ "$j" = "$i" ] || routes="$routes 10.244.$j.0/24=$(node_ip "$j")"
	done
	printf 'NODE_IP=%s\nGATEWAY=%s\nPOD_ROUTES="%s"\n' "$(node_ip "$i")" "$HOST_IP" "${routes# }" > "$d/etc/rig.env"
	cp "$RUN/pki/kubelet$i.crt" "$d/etc/kubernetes/pki/kubelet.crt"
	cp "$RUN/pki/kubelet$i.key" "$d/etc/kubernetes/pki/kubelet.key"
	cp "$RUN/pki/node$i.kubeconfig" "$d/etc/kubernetes/kubelet.kubeconfig"
	sed "s#10.244.0.0/24#10.244.$i.0/24#" "$FILES/10-bridge.conflist" > "$d/etc/cni/net.d/10-bridge.conflist"
	head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$d/etc/machine-id"
	tar -C "$d" -cf "$RUN/node$i.id.tar" etc
	rm -rf "$d"
}

net_up() {
	ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
	ip addr replace "$HOST_IP/24" dev "$BRIDGE"
	ip link set "$BRIDGE" up
	local i tap
	for i in $(seq "$(all_nodes)"); do
		tap=$(node_tap "$i")
		ip link show "$tap" >/dev/null 2>&1 || ip tuntap add dev "$tap" mode tap
		ip link set "$tap" master "$BRIDGE" up
	done
}

boot_node() {
	local i=$1 mem=$MEM append="console=ttyS0 root=/dev/vda rw panic=-1 quiet" what=""
	local -a accel
	read -r -a accel <<< "$ACCEL_ARGS"
	if ! has_nbd "$i"; then
		# The kernel itself refuses the module (EPERM, "Module nbd is
		# blacklisted"), whatever modprobe configuration a container has.
		append="$append module_blacklist=nbd"
		mem=$MEM_NONBD
		what=", kernel refuses nbd"
	fi
	log "booting $(node_name "$i") (QEMU ${ACCEL_ARGS}$what)"
	start_bg "qemu$i" qemu-system-x86_64 -m "$mem" -smp "$CPUS" "${accel[@]}" -display none -no-reboot \
		-kernel "$(cat "$RUN/vmlinuz")" -initrd "$RUN/initrd.img" \
		-append "$append" \
		-drive "file=$RUN/node$i.qcow2,if=virtio,format=qcow2,cache=unsafe" \
		-drive "file=$RUN/node$i.id.tar,if=virtio,format=raw,readonly=on" \
		-netdev "tap,id=n0,ifname=$(node_tap "$i"),script=no,downscript=no" \
		-device "virtio-net-pci,netdev=n0,mac=52:54:00:99:00:$(printf %02x "$((1 + i))")" \
		-device virtio-rng-pci -serial "file:$RUN/logs/console$i.log" -monitor none
}


# wait_ready N START: waits until node N is Ready (START: $SECONDS at boot).
wait_ready() {
	local n=$1 start=$2 name _
	name=$(node_name "$n")
	for _ in $(seq 900); do
		check_procs
		if curl -sfk --max-time 5 --cert "$RUN/pki/admin.crt" --key "$RUN/pki/admin.key" \
			"https://$HOST_IP:$APISERVER_PORT/api/v1/nodes/$name" 2>/dev/null |
			python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n["status"]["conditions"]) else 1)' 2>/dev/null; then
			log "node $name Ready after $((SECONDS - start)) s"
			return 0
		fi
		sleep 1
	done
	die "$name not Ready after 900 s
$(tail_log "$RUN/logs/console$n.log")"
}

# start_nodes: boots every node VM and waits until all are Ready; any VM or
# control-plane process that exits meanwhile stops the run.
start_nodes() {
	local i start=$SECONDS
	for i in $(seq "$(all_nodes)"); do boot_node "$i"; done
	for i in $(seq "$(all_nodes)"); do wait_ready "$i" "$start"; done
}

up() {
	[ "$(id -u)" -eq 0 ] || die "needs root (tap device)"
	hack/install-deps.sh e2e-vm
	[ -f "$E2E/rootfs.tar" ] && [ -f "$E2E/images/nbd-csi.tar" ] || build
	down >/dev/null 2>&1 || true
	rm -rf "$RUN"; mkdir -p "$RUN/logs" "$RUN/pids"
	echo $((NODES + NONBD)) > "$RUN/nodes"
	# A failed up stops what it started; the logs stay in $RUN/logs.
	trap 'up_failed $?' EXIT
	ACCEL_ARGS=$(go run ./test/vm/cmd/vmrun -print-accel)
	pki
	net_up # the API server binds to the bridge's address
	control_plane
	node_disk
	start_nodes
	trap - EXIT
	cp "$RUN/pki/admin.kubeconfig" "$RUN/kubeconfig"
	echo "KUBECONFIG=$RUN/kubeconfig"
}

up_failed() {
	[ "$1" -ne 0 ] || return 0
	if [ "${E2E_KEEP:-}" = 1 ]; then
		log "up failed; E2E_KEEP=1 leaves the cluster running (logs in $RUN/logs)"
	else
		log "up failed; stopping what it started (logs in $RUN/logs; E2E_KEEP=1 keeps it running)"
		down >/dev/null 2>&1 || true
	fi
}

down() {
	local f
	for f in "$RUN"/pids/*; do
		[ -e "$f" ] || continue
		kill "$(cat "$f")" 2>/dev/null || true
	done
	sleep 1
	for f in "$RUN"/pids/*; do
		[ -e "$f" ] || continue
		kill -9 "$(cat "$f")" 2>/dev/null || true
		rm -f "$f"
	done
	local l
	for l in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
		ip link del "$l" 2>/dev/null || true
	done
	ip link del "$BRIDGE" 2>/dev/null || true
	log "down"
}

node_sh() { printf '%s\n' "$*" | socat -t 600 - "TCP:$(node_ip "${E2E_NODE:-1}"):2222"; }

# load TAR...: imports images into every node's containerd (like kind
# load): the node's shell reads the command line, ctr the rest.
load() {
	local t i
	for t in "$@"; do
		for i in $(seq "$(all_nodes)"); do
			{ printf 'ctr -n k8s.io images import -\n'; cat "$t"; } | socat -t 600 - "TCP:$(node_ip "$i"):2222"
		done
	done
}

collect_logs() {
	local out=${1:-$RUN/collected}
	mkdir -p "$out"
	cp "$RUN"/logs/*.log "$out/" 2>/dev/null || true
	local f i
	for i in $(seq "$(all_nodes)"); do
		for f in kubelet containerd kube-proxy images; do
			E2E_NODE=$i node_sh "cat /var/log/$f.log" > "$out/$(node_name "$i")-$f.log" 2>/dev/null || true
		done
	done
	curl -sfk --cert "$RUN/pki/admin.crt" --key "$RUN/pki/admin.key" "https://$HOST_IP:$APISERVER_PORT/api/v1/pods" > "$out/pods.json" 2>&1 || true
	log "logs in $out"
}

main() {
	case ${1:-} in
	build) build ;;
	prebuild) prebuild ;;
	rootfs) rootfs ;;
	up) up ;;
	down) down ;;
	sh) shift; node_sh "$@" ;;
	load) shift; load "$@" ;;
	logs) shift; collect_logs "${1:-}" ;;
	*) echo "usage: $0 build|prebuild|rootfs|up|down|sh CMD|load TAR...|logs [DIR]" >&2; exit 2 ;;
	esac
}

# Sourced (by test/scripts), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
