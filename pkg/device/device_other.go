// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package device

import (
	"context"
	"fmt"
	"runtime"
)

// errPlatform says that nbd devices need Linux.
var errPlatform = fmt.Errorf("nbd devices: %w on %s/%s", ErrNotSupported, runtime.GOOS, runtime.GOARCH)

// Ioctl is the ioctl attacher; it exists on Linux only.
type Ioctl struct{}

// New returns an error: nbd devices need Linux.
func New(context.Context, Options) (Attacher, error) { return nil, errPlatform }

// NewNetlink returns an error: nbd devices need Linux.
func NewNetlink(Options) (*Netlink, error) { return nil, errPlatform }

// NewIoctl returns an error: nbd devices need Linux.
func NewIoctl(Options) (*Ioctl, error) { return nil, errPlatform }
