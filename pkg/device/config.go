// SPDX-License-Identifier: Apache-2.0

package device

import (
	"fmt"
	"math"
	"math/bits"
	"os"
	"strings"
	"time"

	"k8s.io/utils/exec"
)

// Transmission flags the kernel understands, from include/uapi/linux/nbd.h
// (NBD_FLAG_*; the same bits as the NBD spec's transmission flags).
const (
	flagHasFlags        uint16 = 1 << 0
	flagReadOnly        uint16 = 1 << 1
	flagSendFlush       uint16 = 1 << 2
	flagSendFUA         uint16 = 1 << 3
	flagRotational      uint16 = 1 << 4
	flagSendTrim        uint16 = 1 << 5
	flagSendWriteZeroes uint16 = 1 << 6
	flagCanMultiConn    uint16 = 1 << 8

	// kernelFlags are the flags that change what the kernel sends; the
	// Supervisor compares only these when a server comes back.
	kernelFlags = flagHasFlags | flagReadOnly | flagSendFlush | flagSendFUA |
		flagRotational | flagSendTrim | flagSendWriteZeroes | flagCanMultiConn
)

// Client flags (NBD_ATTR_CLIENT_FLAGS), include/uapi/linux/nbd.h.
const (
	// cflagDestroyOnDisconnect deletes the device when it is disconnected.
	cflagDestroyOnDisconnect uint64 = 1 << 0
	// cflagDisconnectOnClose disconnects when the last opener closes the
	// device. Never set here: a CSI volume is opened and closed many
	// times (mkfs, mount, blkid) and must survive that.
	cflagDisconnectOnClose uint64 = 1 << 1
)

// Options configure New, NewNetlink and NewIoctl. The zero value is usable.
type Options struct {
	// Backend selects the kernel interface; BackendAuto (zero) prefers
	// netlink and falls back to ioctl.
	Backend Backend
	// SysRoot is where sysfs is mounted; "" means "/sys".
	SysRoot string
	// DevRoot is where the device nodes are; "" means "/dev".
	DevRoot string
	// Module configures loading the nbd module (New only).
	Module ModuleOptions
	// DestroyOnDisconnect sets NBD_CFLAG_DESTROY_ON_DISCONNECT on netlink
	// attaches, so the kernel deletes a device when it is disconnected.
	// Off by default: devices are then reused by later attaches (the
	// kernel picks the first unused one), device node names stay stable,
	// and a device that is disconnected while a mount still holds it
	// keeps its node until released. Devices created beyond nbds_max stay
	// until the module is unloaded either way unless this is set.
	DestroyOnDisconnect bool
	// WaitTimeout bounds waiting for the kernel (readiness after Attach,
	// release after Detach, the new size after Resize) when the context
	// has no deadline; 0 means 30 s.
	WaitTimeout time.Duration
}

// ModuleOptions configure loading the nbd kernel module.
type ModuleOptions struct {
	// Skip disables loading: New then only checks /sys/module/nbd.
	Skip bool
	// ModprobePath is the modprobe program; "" means "modprobe" on PATH.
	ModprobePath string
	// NbdsMax is the nbds_max module parameter: how many devices exist
	// at load (netlink creates more on demand; ioctl is limited to these).
	// 0 means 16, the kernel's default.
	NbdsMax int
	// MaxPart is the max_part module parameter: partitions per device.
	// 0 (the default) disables partition scanning, so attaching does not
	// trigger partition-table reads and udev events; volumes are used
	// whole. Module parameters are fixed once the module is loaded.
	MaxPart int
	// Exec runs modprobe; nil means k8s.io/utils/exec.New().
	Exec exec.Interface
}

const (
	defaultSysRoot     = "/sys"
	defaultDevRoot     = "/dev"
	defaultWaitTimeout = 30 * time.Second
	defaultNbdsMax     = 16
)

func (o Options) withDefaults() Options {
	if o.SysRoot == "" {
		o.SysRoot = defaultSysRoot
	}
	if o.DevRoot == "" {
		o.DevRoot = defaultDevRoot
	}
	if o.WaitTimeout <= 0 {
		o.WaitTimeout = defaultWaitTimeout
	}
	if o.Module.ModprobePath == "" {
		o.Module.ModprobePath = "modprobe"
	}
	if o.Module.NbdsMax <= 0 {
		o.Module.NbdsMax = defaultNbdsMax
	}
	if o.Module.MaxPart < 0 {
		o.Module.MaxPart = 0
	}
	if o.Module.Exec == nil {
		o.Module.Exec = exec.New()
	}
	return o
}

// devicePath is /dev/nbd<index> under root.
func devicePath(devRoot string, index uint32) string {
	return fmt.Sprintf("%s/nbd%d", strings.TrimRight(devRoot, "/"), index)
}

// seconds converts a timeout to whole seconds, rounding up so that a
// sub-second timeout never becomes 0 (which means "none" to the kernel).
func seconds(d time.Duration, field string) (uint64, error) {
	if d < 0 {
		return 0, fmt.Errorf("%w: %s %v is negative", ErrInvalidConfig, field, d)
	}
	return uint64((d + time.Second - 1) / time.Second), nil
}

// normalized is a validated Config with defaults applied.
type normalized struct {
	Config
	flags           uint16 // ServerFlags plus READ_ONLY when ReadOnly
	timeoutSec      uint64
	deadConnSec     uint64
	expectedSectors uint64 // what /sys/block/nbdN/size must show
}

// sizeShown reports whether /sys/block/nbdN/size (sectors) shows the
// configured size: the kernel sets the capacity to size >> 9; a kernel that
// rounds the size down to whole blocks first shows a little less.
func (n normalized) sizeShown(sectors uint64) bool {
	return sectors == n.expectedSectors || sectors == (n.SizeBytes/n.BlockSize*n.BlockSize)>>9
}

// normalize validates c. requireBackend is true for netlink, where the
// backend identifier is how devices are found again.
func (c Config) normalize(requireBackend bool) (normalized, error) {
	n := normalized{Config: c}
	if len(c.Sockets) == 0 {
		return n, fmt.Errorf("%w: no sockets", ErrInvalidConfig)
	}
	for i, s := range c.Sockets {
		if s == nil {
			return n, fmt.Errorf("%w: socket %d is nil", ErrInvalidConfig, i)
		}
	}
	if c.SizeBytes == 0 {
		return n, fmt.Errorf("%w: size is 0", ErrInvalidConfig)
	}
	if c.SizeBytes > math.MaxInt64 {
		return n, fmt.Errorf("%w: size %d exceeds the kernel's loff_t", ErrInvalidConfig, c.SizeBytes)
	}
	if n.BlockSize == 0 {
		n.BlockSize = DefaultBlockSize
	}
	if err := validBlockSize(n.BlockSize); err != nil {
		return n, err
	}
	if len(c.Sockets) > 1 && c.ServerFlags&flagCanMultiConn == 0 {
		return n, fmt.Errorf("%w: %d sockets but the server did not set NBD_FLAG_CAN_MULTI_CONN",
			ErrInvalidConfig, len(c.Sockets))
	}
	if err := validBackendID(c.BackendID, requireBackend); err != nil {
		return n, err
	}
	var err error
	if n.timeoutSec, err = seconds(c.Timeout, "timeout"); err != nil {
		return n, err
	}
	if n.deadConnSec, err = seconds(c.DeadConnTimeout, "dead-connection timeout"); err != nil {
		return n, err
	}
	n.flags = c.ServerFlags
	if c.ReadOnly {
		n.flags |= flagReadOnly
	}
	n.expectedSectors = c.SizeBytes >> 9
	return n, nil
}

// validBlockSize checks the kernel's rule: a power of two, 512 … PAGE_SIZE
// (nbd_set_size → blk_validate_block_size).
func validBlockSize(bs uint64) error {
	page := uint64(os.Getpagesize())
	if bs < 512 || bs > page || bits.OnesCount64(bs) != 1 {
		return fmt.Errorf("%w: block size %d is not a power of two between 512 and %d",
			ErrInvalidConfig, bs, page)
	}
	return nil
}

func validBackendID(id string, required bool) error {
	if id == "" {
		if required {
			return fmt.Errorf("%w: backend identifier is required", ErrInvalidConfig)
		}
		return nil
	}
	if len(id) > MaxBackendIDLen {
		return fmt.Errorf("%w: backend identifier is %d bytes, the limit is %d",
			ErrInvalidConfig, len(id), MaxBackendIDLen)
	}
	if strings.ContainsAny(id, "\x00\n") {
		return fmt.Errorf("%w: backend identifier %q contains NUL or newline", ErrInvalidConfig, id)
	}
	return nil
}

// SameKernelFlags reports whether two exports' transmission flags agree on
// every bit that changes what the kernel sends (HAS_FLAGS, READ_ONLY,
// SEND_FLUSH, SEND_FUA, ROTATIONAL, SEND_TRIM, SEND_WRITE_ZEROES,
// CAN_MULTI_CONN): a reconnect to an export that differs there must be
// refused.
func SameKernelFlags(a, b uint16) bool { return a&kernelFlags == b&kernelFlags }
