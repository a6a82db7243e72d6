// SPDX-License-Identifier: Apache-2.0

package device

import (
	"golang.org/x/sys/unix"
)

// ioctl request numbers from include/uapi/linux/nbd.h, where each is
// _IO(0xab, n). _IO's direction bits (_IOC_NONE) differ between
// architectures (0 on x86 and arm, 1<<29 on powerpc, mips and sparc), so
// they are taken from another _IO request that x/sys/unix defines per
// architecture: BLKRRPART is _IO(0x12, 95).
const (
	iocNone = unix.BLKRRPART &^ 0xffff
	nbdType = 0xab << 8

	nbdSetSock       = iocNone | nbdType      // NBD_SET_SOCK (n = 0)
	nbdSetBlksize    = iocNone | nbdType | 1  // NBD_SET_BLKSIZE
	nbdSetSize       = iocNone | nbdType | 2  // NBD_SET_SIZE (bytes; unused: SIZE_BLOCKS is overflow-checked)
	nbdDoIt          = iocNone | nbdType | 3  // NBD_DO_IT
	nbdClearSock     = iocNone | nbdType | 4  // NBD_CLEAR_SOCK
	nbdClearQue      = iocNone | nbdType | 5  // NBD_CLEAR_QUE
	nbdPrintDebug    = iocNone | nbdType | 6  // NBD_PRINT_DEBUG (no-op)
	nbdSetSizeBlocks = iocNone | nbdType | 7  // NBD_SET_SIZE_BLOCKS
	nbdDisconnect    = iocNone | nbdType | 8  // NBD_DISCONNECT
	nbdSetTimeout    = iocNone | nbdType | 9  // NBD_SET_TIMEOUT (seconds)
	nbdSetFlags      = iocNone | nbdType | 10 // NBD_SET_FLAGS

	blkROSet = unix.BLKROSET // BLKROSET, include/uapi/linux/fs.h
)

// ioctlName names a request for error messages.
func ioctlName(req uint) string {
	switch req {
	case nbdSetSock:
		return "NBD_SET_SOCK"
	case nbdSetBlksize:
		return "NBD_SET_BLKSIZE"
	case nbdDoIt:
		return "NBD_DO_IT"
	case nbdClearSock:
		return "NBD_CLEAR_SOCK"
	case nbdClearQue:
		return "NBD_CLEAR_QUE"
	case nbdSetSizeBlocks:
		return "NBD_SET_SIZE_BLOCKS"
	case nbdDisconnect:
		return "NBD_DISCONNECT"
	case nbdSetTimeout:
		return "NBD_SET_TIMEOUT"
	case nbdSetFlags:
		return "NBD_SET_FLAGS"
	case blkROSet:
		return "BLKROSET"
	}
	return "ioctl"
}

// ioctlSys is the system-call surface of the ioctl attacher, so that tests
// can check the sequence (and that it stays on one thread) without a
// kernel.
type ioctlSys interface {
	// Open opens a device node read-write.
	Open(path string) (fd int, err error)
	// Close closes fd.
	Close(fd int) error
	// Ioctl issues an ioctl with an integer argument.
	Ioctl(fd int, req uint, arg uintptr) error
	// SetReadOnly issues BLKROSET (its argument is a pointer to an int).
	SetReadOnly(fd int, ro bool) error
	// BlockSignals blocks every blockable signal on the calling thread.
	BlockSignals() error
}

// realSys is ioctlSys on the real kernel.
type realSys struct{}

// Open opens path O_RDWR|O_CLOEXEC.
func (realSys) Open(path string) (int, error) {
	return unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
}

// Close closes fd.
func (realSys) Close(fd int) error { return unix.Close(fd) }

// Ioctl issues the request with an unsigned-long argument. It calls the
// system call directly because unix.IoctlSetInt takes an int, narrower than
// the kernel's unsigned long on 32-bit architectures.
func (realSys) Ioctl(fd int, req uint, arg uintptr) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), arg)
	if errno != 0 {
		return errno
	}
	return nil
}

// SetReadOnly issues BLKROSET through unix.IoctlSetPointerInt.
func (realSys) SetReadOnly(fd int, ro bool) error {
	v := 0
	if ro {
		v = 1
	}
	return unix.IoctlSetPointerInt(fd, blkROSet, v)
}

// BlockSignals blocks every blockable signal on the calling thread
// (SIGKILL and SIGSTOP cannot be blocked).
func (realSys) BlockSignals() error {
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	return unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil)
}
