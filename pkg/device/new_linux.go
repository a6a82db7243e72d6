// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"

	"github.com/mdlayher/genetlink"
)

// New loads the nbd module if needed (EnsureModule, unless
// opts.Module.Skip) and returns the Attacher opts.Backend asks for. With
// BackendAuto it returns a *Netlink when the "nbd" generic netlink family
// resolves, else an *Ioctl whose FallbackReason says why; check
// Attacher.Backend, because ioctl devices do not survive this process.
func New(ctx context.Context, opts Options) (Attacher, error) {
	if err := EnsureModule(ctx, opts); err != nil {
		return nil, err
	}
	switch opts.Backend {
	case BackendNetlink:
		return NewNetlink(opts)
	case BackendIoctl:
		return NewIoctl(opts)
	case BackendAuto:
	default:
		return nil, fmt.Errorf("%w: unknown backend %v", ErrInvalidConfig, opts.Backend)
	}
	n, err := NewNetlink(opts)
	if err == nil {
		return n, nil
	}
	if !errors.Is(err, ErrNetlinkUnavailable) {
		return nil, err
	}
	x, xerr := NewIoctl(opts)
	if xerr != nil {
		return nil, errors.Join(err, xerr)
	}
	x.why = err
	return x, nil
}

// NewNetlink dials generic netlink and resolves the "nbd" family. An error
// wrapping ErrNetlinkUnavailable means the family is not usable from here
// (see its message). It does not load the module.
func NewNetlink(opts Options) (*Netlink, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("%w: dial generic netlink: %w", ErrNetlinkUnavailable, err)
	}
	return newNetlinkConn(conn, dialGroup, opts)
}

// dialGroup opens a generic netlink connection joined to a multicast group.
func dialGroup(group uint32) (*genetlink.Conn, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, err
	}
	if err := c.JoinGroup(group); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// NewIoctl returns the ioctl attacher. It does not load the module.
func NewIoctl(opts Options) (*Ioctl, error) {
	return newIoctl(realSys{}, opts), nil
}
