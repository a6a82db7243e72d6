#!/usr/bin/env bash
# Kernel TLS benchmark in the test/vm VM: nbd-csi with kernel TLS vs its
# relay vs nbd-client's TLS on one nbdkit TLS export, same run.
# Usage: bench/ktls.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CGO_ENABLED=0 go build -o "$work/nbd-csi" ./cmd/nbd-csi
# A throwaway CA and server certificate for 127.0.0.1 (GnuTLS wants the CA
# to be one and the leaf to allow digital signatures).
mkdir "$work/certs"
(
	cd "$work/certs"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem \
		-days 2 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null
	printf 'subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > ext
	openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile ext 2>/dev/null
	rm -f server.csr ext ca-key.pem ca-cert.srl
)
args=(-file "$work/nbd-csi:/bin/nbd-csi" -file bench/ktls-guest.sh:/bin/ktls-guest.sh)
for f in ca-cert.pem server-cert.pem server-key.pem; do
	args+=(-file "$work/certs/$f:/certs/$f")
done
# BENCH_LOG=FILE keeps the whole VM output (for a failing run).
go run ./test/vm/cmd/vmrun -timeout 20m -mem 3072 "${args[@]}" -- \
	'modprobe nbd nbds_max=16 max_part=0 && modprobe tls && modprobe aesni-intel && sh -x /bin/ktls-guest.sh 2>/tmp/trace || { tail -30 /tmp/trace; exit 1; }' \
	| tee "${BENCH_LOG:-/dev/null}" | sed -n '/BENCH-BEGIN/,/BENCH-END/p' | grep -v BENCH-
