// SPDX-License-Identifier: Apache-2.0

package driver

import "github.com/nbd-csi/nbd-csi/pkg/crypt"

// DefaultDriverName is the CSI driver name unless --driver-name says
// otherwise.
const DefaultDriverName = "nbd.csi.nbd-csi.io"

// Volume context keys (PersistentVolume volumeAttributes; the controller
// passes the same keys through from StorageClass parameters). Every key is
// documented in docs/parameters.md.
const (
	// KeyURI is the NBD URI of the export (nbd://, nbds://, nbd+unix://,
	// nbds+unix://). Required.
	KeyURI = "uri"
	// KeyConnections is the number of sockets per device; used only when
	// the export advertises multi-conn. Integer 1..16, default 1.
	KeyConnections = "connections"
	// KeyTimeout is the per-request I/O timeout (Go duration, default
	// "30s"); a request that takes longer marks the connection dead and is
	// retried after the reconnect. "0" lets a request wait indefinitely on a
	// single connection, and then requests in flight when the server dies
	// are never retried.
	KeyTimeout = "timeout"
	// KeyDeadConnectionTimeout is how long I/O waits for a reconnect after
	// the connection died (Go duration, default 5m).
	KeyDeadConnectionTimeout = "deadConnectionTimeout"
	// KeyBlockSize overrides the logical block size of the device (512,
	// 1024, 2048 or 4096).
	KeyBlockSize = "blockSize"
	// KeyMkfsOptions are extra options for mkfs, split on whitespace.
	KeyMkfsOptions = "mkfsOptions"
	// KeyEncrypted ("true"/"false", default false) stores the volume
	// LUKS2-encrypted: the node formats a blank export with LUKS2 and
	// opens it with the passphrase from the node-stage secret key
	// SecretEncryptionPassphrase.
	KeyEncrypted = "encrypted"
)

// Node-stage secret keys (the kubernetes.io/tls convention).
const (
	SecretCA   = "ca.crt"
	SecretCert = "tls.crt"
	SecretKey  = "tls.key"
	// SecretEncryptionPassphrase holds the passphrase of an encrypted
	// volume (exact bytes: a trailing newline is part of it).
	SecretEncryptionPassphrase = crypt.SecretPassphraseKey
)

// Filesystem types the node can create.
const (
	FSExt4 = "ext4"
	FSXFS  = "xfs"
	// DefaultFSType is used when the request names none.
	DefaultFSType = FSExt4
)

// TopologyKeyNode is the topology segment key naming the node.
const TopologyKeyNode = "topology.nbd-csi.io/node"
