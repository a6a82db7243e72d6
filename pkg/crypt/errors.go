// SPDX-License-Identifier: Apache-2.0

package crypt

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrWrongKey means no key slot of the LUKS header opens with the
	// passphrase given (cryptsetup exit status 2).
	ErrWrongKey = errors.New("the passphrase opens no key slot of the LUKS header")
	// ErrNoKey means the key source holds no passphrase for the volume.
	ErrNoKey = errors.New("no encryption passphrase")
	// ErrBadKey means a passphrase is unusable (empty or too long), or a
	// rotation was asked from a passphrase to itself.
	ErrBadKey = errors.New("unusable encryption passphrase")
	// ErrBusy means a mapping is in use (mounted, open) or a mapping of
	// the name exists on another device (exit status 5).
	ErrBusy = errors.New("device mapping busy or in use")
	// ErrNotLUKS means the device holds no LUKS header.
	ErrNotLUKS = errors.New("device holds no LUKS header")
	// ErrReadOnly means a blank device was to be formatted read-only.
	ErrReadOnly = errors.New("a blank device cannot be formatted read-only")
)

// ForeignDataError says that a device holds something other than LUKS, so
// it is never formatted.
type ForeignDataError struct {
	// Device is the device probed.
	Device string
	// Found names what was found: a blkid type ("ext4", "xfs"), a
	// partition table ("PTTYPE=dos"), or non-zero data.
	Found string
}

func (e *ForeignDataError) Error() string {
	return fmt.Sprintf("%s holds %s, not a LUKS header; it is never formatted for encryption", e.Device, e.Found)
}

// CommandError is a cryptsetup or blkid failure not covered by a sentinel.
// Its Stderr is the tool's message, which never contains a passphrase
// (passphrases travel on stdin or a pipe only).
type CommandError struct {
	Op       string
	ExitCode int
	Stderr   string
	// Err is the sentinel for a classified exit status, or nil.
	Err error
}

func (e *CommandError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if len(msg) > 512 {
		msg = msg[:512] + "…"
	}
	if e.Err != nil {
		return fmt.Sprintf("%s: %v (exit status %d: %s)", e.Op, e.Err, e.ExitCode, msg)
	}
	return fmt.Sprintf("%s: exit status %d: %s", e.Op, e.ExitCode, msg)
}

// Unwrap returns the sentinel.
func (e *CommandError) Unwrap() error { return e.Err }
