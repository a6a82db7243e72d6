// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// Bounds on volume context values; anything outside is InvalidArgument.
const (
	maxConnections     = 16
	maxTimeout         = 24 * time.Hour
	defaultDeadConnTmo = 5 * time.Minute
	// defaultTimeout is the per-request timeout. It must not be 0 for
	// requests in flight when a connection dies to be retried on the new
	// one: with one connection and no timeout the kernel waits forever.
	defaultTimeout = 30 * time.Second
	maxMkfsOptions = 1024
)

// VolumeParams are the validated node-side volume context values.
type VolumeParams struct {
	// URI is the export.
	URI *nbd.URI
	// Connections is the socket count (used only with multi-conn exports).
	Connections int
	// Timeout is the per-request I/O timeout; 0 means the kernel default.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a reconnect.
	DeadConnTimeout time.Duration
	// BlockSize overrides the device block size; 0 means from the server.
	BlockSize uint32
	// MkfsOptions are extra mkfs arguments.
	MkfsOptions []string
	// Encrypted puts LUKS2 under the filesystem or block device.
	Encrypted bool
	// TLSMode is KeyTLS: TLSKernel, TLSAuto (default) or TLSRelay.
	TLSMode string
}

// nodeKeys are the volume context keys the node understands.
var nodeKeys = map[string]bool{
	KeyURI: true, KeyConnections: true, KeyTimeout: true,
	KeyDeadConnectionTimeout: true, KeyBlockSize: true, KeyMkfsOptions: true,
	KeyServerID:  true, // the controller's (fencing by export); the node ignores it
	KeyEncrypted: true, KeyTLS: true,
}

// ParseVolumeContext validates a volume context. Keys containing "/" are
// reserved for Kubernetes and sidecars (csi.storage.k8s.io/…,
// storage.kubernetes.io/csiProvisionerIdentity) and are ignored; any other
// unknown key is an error naming it.
func ParseVolumeContext(vc map[string]string) (*VolumeParams, error) {
	for k := range vc {
		if !nodeKeys[k] && !strings.Contains(k, "/") {
			return nil, fmt.Errorf("volume context: unknown key %q (known: uri, connections, timeout, deadConnectionTimeout, blockSize, mkfsOptions, serverID, encrypted, tls)", k)
		}
	}
	p := &VolumeParams{Connections: 1, DeadConnTimeout: defaultDeadConnTmo, TLSMode: TLSAuto}
	raw, ok := vc[KeyURI]
	if !ok || raw == "" {
		return nil, fmt.Errorf("volume context: %q is required (the NBD URI of the export)", KeyURI)
	}
	u, err := nbd.ParseURI(raw)
	if err != nil {
		return nil, fmt.Errorf("volume context %q: %w", KeyURI, err)
	}
	p.URI = u
	if v, ok := vc[KeyConnections]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxConnections {
			return nil, fmt.Errorf("volume context %q: %q is not an integer from 1 to %d", KeyConnections, v, maxConnections)
		}
		p.Connections = n
	}
	if p.Timeout, err = durationKey(vc, KeyTimeout, defaultTimeout); err != nil {
		return nil, err
	}
	if p.DeadConnTimeout, err = durationKey(vc, KeyDeadConnectionTimeout, defaultDeadConnTmo); err != nil {
		return nil, err
	}
	if v, ok := vc[KeyBlockSize]; ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || (n != 512 && n != 1024 && n != 2048 && n != 4096) {
			return nil, fmt.Errorf("volume context %q: %q must be 512, 1024, 2048 or 4096", KeyBlockSize, v)
		}
		p.BlockSize = uint32(n)
	}
	if v, ok := vc[KeyMkfsOptions]; ok {
		if len(v) > maxMkfsOptions {
			return nil, fmt.Errorf("volume context %q: longer than %d bytes", KeyMkfsOptions, maxMkfsOptions)
		}
		p.MkfsOptions = strings.Fields(v)
	}
	if v, ok := vc[KeyEncrypted]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("volume context %q: %q is not true or false", KeyEncrypted, v)
		}
		p.Encrypted = b
	}
	if v, ok := vc[KeyTLS]; ok {
		if v != TLSKernel && v != TLSAuto && v != TLSRelay {
			return nil, fmt.Errorf("volume context %q: %q must be %q, %q or %q", KeyTLS, v, TLSKernel, TLSAuto, TLSRelay)
		}
		p.TLSMode = v
	}
	return p, nil
}

// durationKey parses a duration value: a Go duration ("90s", "5m") or a
// plain number of seconds. It must lie in [0, 24h] and be whole seconds
// (the kernel counts in seconds).
func durationKey(vc map[string]string, key string, def time.Duration) (time.Duration, error) {
	v, ok := vc[key]
	if !ok {
		return def, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.ParseUint(v, 10, 32)
		if nerr != nil {
			return 0, fmt.Errorf("volume context %q: %q is not a duration (e.g. \"30s\", \"5m\")", key, v)
		}
		d = time.Duration(n) * time.Second
	}
	if d < 0 || d > maxTimeout || d%time.Second != 0 {
		return 0, fmt.Errorf("volume context %q: %q must be whole seconds between 0 and 24h", key, v)
	}
	return d, nil
}
