// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"
)

// Backend names a kernel interface for attaching devices.
type Backend int

const (
	// BackendAuto lets New choose: netlink when the "nbd" generic netlink
	// family resolves, ioctl otherwise.
	BackendAuto Backend = iota
	// BackendNetlink is the generic netlink interface (NBD_CMD_CONNECT …).
	BackendNetlink
	// BackendIoctl is the ioctl interface (NBD_SET_SOCK … NBD_DO_IT).
	BackendIoctl
)

// String returns "auto", "netlink" or "ioctl".
func (b Backend) String() string {
	switch b {
	case BackendAuto:
		return "auto"
	case BackendNetlink:
		return "netlink"
	case BackendIoctl:
		return "ioctl"
	}
	return fmt.Sprintf("Backend(%d)", int(b))
}

// Config describes one attach.
type Config struct {
	// Sockets are connected sockets in the NBD transmission phase, one per
	// connection. The kernel takes its own reference on each; Attach does
	// not close them, so the caller closes them once Attach returns
	// (successfully or not).
	Sockets []*os.File
	// SizeBytes is the export size. The kernel exposes it in 512-byte
	// sectors; a tail that is not a multiple of BlockSize is not
	// addressable.
	SizeBytes uint64
	// BlockSize is the logical block size: a power of two from 512 to the
	// page size. Zero means 512 (the kernel's own default when the
	// attribute is omitted is 1024, which misparses partition tables).
	BlockSize uint64
	// ServerFlags are the 16-bit transmission flags the server sent
	// (NBD_FLAG_*). More than one socket requires NBD_FLAG_CAN_MULTI_CONN.
	ServerFlags uint16
	// Timeout is the per-request I/O timeout, in whole seconds (rounded
	// up). It is always sent, so a value left by a previous user of the
	// device is never inherited. Zero means: with one connection a
	// request waits indefinitely (the kernel only warns) and is never
	// moved to a replacement socket, so a Supervisor cannot rescue
	// requests in flight when the link dies; with several connections
	// the block layer's 30 s default still triggers the retry path.
	// A non-zero Timeout marks a connection dead when a request exceeds
	// it (emitting LINK_DEAD) and requeues the request, which then waits
	// up to DeadConnTimeout for a RECONFIGURE.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a replacement socket
	// (RECONFIGURE) once every connection is dead, in whole seconds
	// (rounded up). Zero fails such I/O at once and leaves the device
	// unusable; a Supervisor needs it non-zero. Netlink only: the ioctl
	// interface has no reconnect.
	DeadConnTimeout time.Duration
	// BackendID is the volume identity recorded by the kernel
	// (NBD_ATTR_BACKEND_IDENTIFIER, /sys/block/nbdN/backend). Required
	// for netlink; RECONFIGURE and Resize must quote it. At most
	// MaxBackendIDLen bytes, without NUL or newline. With ioctl it is
	// only remembered in memory.
	BackendID string
	// Index asks for /dev/nbd<Index>. Nil lets the kernel pick a free
	// device or create one (netlink: the INDEX attribute is omitted; the
	// value 0xFFFFFFFF is rejected by newer kernels) or searches for a free
	// one (ioctl).
	Index *uint32
	// ReadOnly makes the device read-only even if the export is
	// writable, by adding NBD_FLAG_READ_ONLY to the flags given to the
	// kernel (which then marks the disk read-only). A read-only export
	// always gives a read-only device.
	ReadOnly bool
}

// MaxBackendIDLen bounds Config.BackendID. CSI volume IDs are at most 128
// bytes; the kernel itself shows the identifier in a sysfs file.
const MaxBackendIDLen = 256

// DefaultBlockSize is used when Config.BlockSize is zero.
const DefaultBlockSize = 512

// Reconfig changes a connected netlink device (NBD_CMD_RECONFIGURE).
// Zero or nil fields are left unchanged.
type Reconfig struct {
	// BackendID must equal the identifier the device was attached with;
	// the kernel refuses a mismatch.
	BackendID string
	// Sockets replace dead connections, one each; sockets beyond the
	// number of dead slots are ignored by the kernel. The caller closes
	// them afterwards.
	Sockets []*os.File
	// SizeBytes resizes the device when non-zero. The block size is kept.
	SizeBytes uint64
	// Timeout, when set, replaces the per-request timeout (see Config).
	Timeout *time.Duration
	// DeadConnTimeout, when set, replaces the dead-connection timeout.
	DeadConnTimeout *time.Duration
}

// Status is one device as NBD_CMD_STATUS reports it.
type Status struct {
	// Index is N in /dev/nbdN.
	Index uint32
	// Connected is the kernel's view: the device has a configuration
	// (config_refs != 0). Note that merely opening /dev/nbdN creates one,
	// so an idle device that udev or blkid holds open counts as connected.
	Connected bool
}

// Device is an NBD device as the kernel reports it.
type Device struct {
	// Index is N in /dev/nbdN.
	Index uint32
	// Path is the device node, e.g. /dev/nbd3 (under Options.DevRoot).
	Path string
	// BackendID is /sys/block/nbdN/backend (netlink devices); for devices
	// this process attached with ioctl, the Config.BackendID.
	BackendID string
	// SizeBytes is the device size (/sys/block/nbdN/size × 512).
	SizeBytes uint64
	// Connected is the kernel's view (see Status.Connected).
	Connected bool
	// PID is /sys/block/nbdN/pid, the process that started the device;
	// 0 when the device is not started (the file exists only while it is).
	PID int
	// ReadOnly is /sys/block/nbdN/ro.
	ReadOnly bool

	// session is set for a device this process attached with ioctl.
	session *session
}

// ProcessBound reports whether the device ends with this process (it was
// attached here with ioctl).
func (d *Device) ProcessBound() bool { return d.session != nil }

// Done returns a channel that is closed when an ioctl-attached device has
// ended (NBD_DO_IT returned, the sockets were cleared). For netlink devices
// and devices found by List it returns nil: nothing in this process ends
// them, and receiving from a nil channel blocks forever.
func (d *Device) Done() <-chan struct{} {
	if d.session == nil {
		return nil
	}
	return d.session.done
}

// Wait blocks until Done is closed or ctx ends, and returns NBD_DO_IT's
// outcome (nil after a requested disconnect). It returns ErrNotProcessBound
// at once for devices that do not depend on this process.
func (d *Device) Wait(ctx context.Context) error {
	if d.session == nil {
		return ErrNotProcessBound
	}
	select {
	case <-d.session.done:
		return d.session.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// session tracks an ioctl-attached device: the thread blocked in NBD_DO_IT.
type session struct {
	index     uint32
	backendID string
	done      chan struct{}
	err       error // valid once done is closed
}

func newSession(index uint32, backendID string) *session {
	return &session{index: index, backendID: backendID, done: make(chan struct{})}
}

func (s *session) finish(err error) {
	s.err = err
	close(s.done)
}

// Attacher is the kernel side of attaching NBD exports. Netlink and Ioctl
// implement it.
type Attacher interface {
	// Attach hands cfg.Sockets to the kernel and returns once the device
	// is usable: started (/sys/block/nbdN/pid exists), showing the size,
	// and its device node present. A backend ID that is already attached
	// gives ErrAlreadyAttached.
	Attach(ctx context.Context, cfg Config) (*Device, error)
	// Detach disconnects /dev/nbd<index> gracefully and waits until the
	// kernel has released it. A device that is not started is not an
	// error. It works when the server is gone.
	Detach(ctx context.Context, index uint32) error
	// DetachBackend detaches the device carrying backendID; none is not
	// an error.
	DetachBackend(ctx context.Context, backendID string) error
	// Reconfigure changes a connected device (netlink only).
	Reconfigure(ctx context.Context, index uint32, rc Reconfig) error
	// Resize sets the device size and waits until sysfs shows it.
	Resize(ctx context.Context, index uint32, backendID string, sizeBytes uint64) error
	// Status lists every nbd device with the kernel's connected flag.
	Status(ctx context.Context) ([]Status, error)
	// List reads every nbd device from the kernel (sysfs and Status).
	List(ctx context.Context) ([]Device, error)
	// FindByBackend returns the started device carrying backendID, or
	// ErrNotFound.
	FindByBackend(ctx context.Context, backendID string) (*Device, error)
	// Backend tells which kernel interface this is.
	Backend() Backend
	// Close releases this Attacher's resources. It detaches nothing.
	Close() error
}

// claims tracks backend IDs with an Attach in flight in this process, so
// that two concurrent attaches of one backend cannot both pass the check
// for an existing device.
type claims struct {
	mu  sync.Mutex
	ids map[string]bool
}

// claim reserves id; the returned release must be called. An empty id
// needs no reservation.
func (c *claims) claim(id string) (release func(), err error) {
	if id == "" {
		return func() {}, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ids[id] {
		return nil, fmt.Errorf("%w: backend %q is being attached", ErrAlreadyAttached, id)
	}
	if c.ids == nil {
		c.ids = map[string]bool{}
	}
	c.ids[id] = true
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.ids, id)
	}, nil
}
