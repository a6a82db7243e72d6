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
	// KeyServerID declares the identity of the export's server (also a
	// StorageClass parameter), overriding the one derived from the URI
	// (nbd.URI.ServerKey): for a server reached under two addresses or
	// names that NBD cannot tell apart. Volumes naming one export must
	// agree on it; the node ignores it. Up to 253 bytes of letters, digits,
	// ".", "-", "_", ":".
	KeyServerID = "serverID"
	// KeyEncrypted ("true"/"false", default false) stores the volume
	// LUKS2-encrypted: the node formats a blank export with LUKS2 and
	// opens it with the passphrase from the node-stage secret key
	// SecretEncryptionPassphrase.
	KeyEncrypted = "encrypted"
	// KeyTLS chooses how a TLS volume's data path is encrypted on the
	// node: TLSKernel (the kernel's TLS layer, kTLS; attaching fails where
	// the kernel cannot), TLSAuto (the default: kTLS where the kernel can,
	// else the plugin's relay, visibly) or TLSRelay (always the relay).
	// Ignored for plaintext volumes.
	KeyTLS = "tls"
)

// Values of KeyTLS.
const (
	TLSKernel = "kernel"
	TLSAuto   = "auto"
	TLSRelay  = "relay"
	// TLSMixed is no value of KeyTLS but an Attachment.TLS: a
	// multi-connection TLSAuto volume of which only some connections went
	// through the relay.
	TLSMixed = "mixed"
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

// Topology segment keys. Kubelet copies each segment a node plugin reports
// in NodeGetInfo to a label of its Node (and never changes a label's value
// afterwards: a key a node may gain later is reported only with its final
// value, never as "false").
const (
	// TopologyKeyNode names the node.
	TopologyKeyNode = "topology.nbd-csi.io/node"
	// TopologyKeyCapable is reported, with the value TopologyCapable, only
	// by a node whose kernel can attach NBD devices (the nbd module loads and
	// its interface answers). Every volume the controller provisions is
	// accessible only from nodes with this segment, so the scheduler never
	// places a pod with an NBD volume on a node that would fail to stage it.
	TopologyKeyCapable = "topology.nbd-csi.io/nbd-capable"
	// TopologyCapable is TopologyKeyCapable's only value.
	TopologyCapable = "true"
)
