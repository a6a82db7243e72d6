// SPDX-License-Identifier: Apache-2.0

package device

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors returned by this package wrap one of these (with
// %w) where one applies, and wrap the kernel's errno as well, so both
// errors.Is(err, ErrDeviceBusy) and errors.Is(err, syscall.EBUSY) work.
var (
	// ErrNoKernelSupport means the kernel has no nbd driver: the module
	// could not be loaded and /sys/module/nbd is absent.
	ErrNoKernelSupport = errors.New("kernel has no nbd support")
	// ErrNetlinkUnavailable means the "nbd" generic netlink family cannot
	// be used from here (old kernel, or a network namespace other than
	// the host's before Linux 6.4).
	ErrNetlinkUnavailable = errors.New("nbd netlink interface unavailable")
	// ErrDeviceBusy means the device is in use: another attach owns it,
	// no free device was found, or it is still held open after a
	// disconnect.
	ErrDeviceBusy = errors.New("nbd device busy")
	// ErrNotFound means no such device, or no device carries the backend
	// identifier.
	ErrNotFound = errors.New("nbd device not found")
	// ErrBackendMismatch means the device carries a different backend
	// identifier than the caller quoted.
	ErrBackendMismatch = errors.New("nbd device backend identifier mismatch")
	// ErrAlreadyAttached means a device already carries the backend
	// identifier given to Attach.
	ErrAlreadyAttached = errors.New("backend already attached")
	// ErrInvalidConfig means a Config or Reconfig field is out of range.
	ErrInvalidConfig = errors.New("invalid nbd device configuration")
	// ErrPermission means the kernel refused for lack of privilege
	// (CAP_SYS_ADMIN is needed to attach, reconfigure and detach).
	ErrPermission = errors.New("not permitted (CAP_SYS_ADMIN required)")
	// ErrNotSupported means the operation is not available with this
	// interface, kernel or operating system.
	ErrNotSupported = errors.New("not supported")
	// ErrNotProcessBound is returned by Device.Wait for a device that does
	// not depend on this process.
	ErrNotProcessBound = errors.New("device is not bound to this process")
	// ErrExportChanged means a redialled export no longer matches the
	// device (size or kernel-relevant flags differ), so the Supervisor
	// refused to hand it to the kernel.
	ErrExportChanged = errors.New("export changed since attach")
	// ErrReconnectTimeout means the Supervisor could not reconnect a dead
	// device within its window.
	ErrReconnectTimeout = errors.New("reconnect window expired")
	// ErrDeviceGone means a supervised device is no longer connected.
	ErrDeviceGone = errors.New("device no longer connected")
	// ErrDisconnectPending means the kernel accepted a disconnect but the
	// device was not released in time (something still holds it open):
	// its connections are ended and it must not be reconnected.
	ErrDisconnectPending = errors.New("disconnect requested, device not yet released")
)

// kernelError wraps a kernel errno with the operation and, where one
// applies, a sentinel.
func kernelError(op string, err error) error {
	switch {
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("%s: %w: %w", op, ErrDeviceBusy, err)
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return fmt.Errorf("%s: %w: %w", op, ErrPermission, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}
