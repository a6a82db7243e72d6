// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"errors"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	mount "k8s.io/mount-utils"
)

// AttachSpec is what the node asks the kernel side to attach.
type AttachSpec struct {
	// VolumeID identifies the volume; the device is tagged with it so it can
	// always be found again, also by a restarted plugin.
	VolumeID string
	// URI is the export.
	URI *nbd.URI
	// TLS is the TLS material from the node-stage secret, nil for none.
	TLS *nbd.TLSOptions
	// Connections, Timeout, DeadConnTimeout and BlockSize come from the
	// volume context.
	Connections     int
	Timeout         time.Duration
	DeadConnTimeout time.Duration
	BlockSize       uint32
	// ReadOnly attaches a read-only device even if the export is writable.
	ReadOnly bool
	// TLSMode is KeyTLS (TLSKernel, TLSAuto or TLSRelay; empty means
	// TLSAuto); it matters only for a TLS export.
	TLSMode string
}

// Attachment is a volume attached on this node, as the kernel reports it.
type Attachment struct {
	// VolumeID is the volume the device is tagged with.
	VolumeID string
	// Device is the block device path, e.g. /dev/nbd3.
	Device string
	// Size is the device size in bytes.
	Size uint64
	// ReadOnly tells whether the device refuses writes.
	ReadOnly bool
	// Healthy is false while the connection is dead or reconnecting;
	// Condition then says why.
	Healthy   bool
	Condition string
	// TLS is how a TLS volume's connections are encrypted: TLSKernel,
	// TLSRelay, or TLSMixed when only some go through the relay (empty
	// for a plaintext volume, or when unknown, e.g. for a volume adopted
	// after a restart before its first reconnect). TLSFallback says why a
	// TLSAuto volume uses the relay (for TLSMixed: how many connections).
	TLS         string
	TLSFallback string
}

// ErrNotAttached is returned by VolumeAttacher.Lookup for a volume with no
// device on this node.
var ErrNotAttached = errors.New("volume is not attached on this node")

// ErrAdopting is returned for a volume whose device a restarted plugin is
// still adopting (reconnecting to its server); the operation can be retried
// (Unavailable).
var ErrAdopting = errors.New("volume is being adopted after a plugin restart")

// VolumeAttacher is the kernel side of the node service: negotiate with the
// server and attach, find, resize and detach devices. The real one is
// pkg/attach; tests use a stateful fake.
type VolumeAttacher interface {
	// Attach attaches the export and returns once the device is usable.
	Attach(ctx context.Context, spec AttachSpec) (*Attachment, error)
	// Lookup finds the device of a volume, or returns ErrNotAttached.
	Lookup(ctx context.Context, volumeID string) (*Attachment, error)
	// List returns every device this driver attached on the node.
	List(ctx context.Context) ([]Attachment, error)
	// Detach disconnects the volume's device and waits until it is
	// released. Detaching a volume that is not attached succeeds.
	Detach(ctx context.Context, volumeID string) error
	// Resize asks the server for the export size again and resizes the
	// device; it returns the new size.
	Resize(ctx context.Context, volumeID string, spec AttachSpec) (uint64, error)
	// Adopt resumes looking after a volume attached by an earlier process
	// (reconnects, health); ErrNotAttached if it has no device.
	Adopt(ctx context.Context, spec AttachSpec) error
	// Ready reports whether the node can attach at all (kernel support,
	// netlink or ioctl usable); the error says why not.
	Ready(ctx context.Context) error
}

// Mounter is what the node service needs for filesystems and bind mounts:
// mount.Interface plus formatting, resizing and a few file helpers. It
// exists so that tests can use a stateful fake instead of real mounts.
type Mounter interface {
	mount.Interface
	// FormatAndMount formats source with fsType unless it already holds a
	// filesystem, then mounts it at target.
	FormatAndMount(source, target, fsType string, options, formatOptions []string) error
	// GetDiskFormat returns the filesystem on a device, "" if none.
	GetDiskFormat(device string) (string, error)
	// ResizeFS grows the filesystem on device mounted at path to fill it.
	ResizeFS(device, path string) error
	// IsBlockDevice reports whether path is a block device node.
	IsBlockDevice(path string) (bool, error)
	// MakeDir creates a directory and its parents.
	MakeDir(path string) error
	// MakeFile creates an empty file (a bind-mount target for a device).
	MakeFile(path string) error
	// Remove removes a file or empty directory; a missing path is fine.
	Remove(path string) error
	// Stats returns filesystem usage of the filesystem holding path.
	Stats(path string) (*FSStats, error)
	// BlockSize returns the size in bytes of a block device.
	BlockSize(path string) (uint64, error)
}

// FSStats is filesystem usage.
type FSStats struct {
	TotalBytes, AvailableBytes, UsedBytes int64
	TotalInodes, FreeInodes, UsedInodes   int64
}
