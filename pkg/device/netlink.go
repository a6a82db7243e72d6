// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// Netlink attaches devices through the "nbd" generic netlink family. Its
// devices outlive the process. It owns one generic netlink connection for
// requests; WatchLinkDead opens another per watch. Safe for concurrent use.
type Netlink struct {
	// mu serialises requests: replies and acknowledgements must be read
	// by the request that caused them.
	mu     sync.Mutex
	conn   *genetlink.Conn
	family genetlink.Family
	// group is the nbd_mc_group multicast group ID (0 if the kernel has
	// none).
	group uint32
	// dialGroup opens a connection subscribed to a multicast group.
	dialGroup func(group uint32) (*genetlink.Conn, error)
	sys       sysfs
	opts      Options
	attaching claims
}

var _ Attacher = (*Netlink)(nil)

// newNetlinkConn builds a Netlink on conn (genltest.Dial in tests), resolving
// the family. dialGroup is used by WatchLinkDead. conn is closed on error.
func newNetlinkConn(conn *genetlink.Conn, dialGroup func(uint32) (*genetlink.Conn, error), opts Options) (*Netlink, error) {
	opts = opts.withDefaults()
	fam, err := conn.GetFamily(genlFamilyName)
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: generic netlink family %q not found: the nbd module is not loaded "+
				"or, before Linux 6.4, this process is not in the host's network namespace "+
				"(run the node plugin with hostNetwork: true): %w",
				ErrNetlinkUnavailable, genlFamilyName, err)
		}
		return nil, fmt.Errorf("%w: resolve generic netlink family %q: %w", ErrNetlinkUnavailable, genlFamilyName, err)
	}
	n := &Netlink{conn: conn, family: fam, dialGroup: dialGroup, sys: sysfs{root: opts.SysRoot}, opts: opts}
	for _, g := range fam.Groups {
		if g.Name == genlMcastGroup {
			n.group = g.ID
		}
	}
	return n, nil
}

// Backend returns BackendNetlink.
func (n *Netlink) Backend() Backend { return BackendNetlink }

// Close closes the request connection. Devices stay attached.
func (n *Netlink) Close() error { return n.conn.Close() }

// execute sends one command. ack must be set exactly for the commands
// that produce no reply of their own (DISCONNECT, RECONFIGURE): with
// mdlayher/netlink, Execute returns after the first message, so an ACK
// requested on a command that also replies (CONNECT, STATUS) would be left
// queued and fail the next request's sequence check. The kernel reports
// errors either way.
//
// Requests are not interrupted by ctx once sent (the kernel answers at
// once; abandoning a request would desynchronise the connection).
func (n *Netlink) execute(ctx context.Context, cmd uint8, ack bool, list []attrs) ([]genetlink.Message, error) {
	data, err := encode(list)
	if err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	msg := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: n.family.Version},
		Data:   data,
	}
	flags := netlink.Request
	if ack {
		flags |= netlink.Acknowledge
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return n.conn.Execute(msg, n.family.ID, flags)
}

// Attach connects cfg.Sockets with NBD_CMD_CONNECT and waits until the
// device is usable. On a readiness failure the device is disconnected
// again.
func (n *Netlink) Attach(ctx context.Context, cfg Config) (*Device, error) {
	c, err := cfg.normalize(true)
	if err != nil {
		return nil, err
	}
	release, err := n.attaching.claim(c.BackendID)
	if err != nil {
		return nil, err
	}
	defer release()
	if found, err := n.findBackend(ctx, c.BackendID); err != nil {
		return nil, err
	} else if len(found) > 0 {
		return nil, fmt.Errorf("%w: backend %q is on nbd%d", ErrAlreadyAttached, c.BackendID, found[0])
	}
	fds, err := socketFDs(c.Sockets)
	if err != nil {
		return nil, err
	}
	var clientFlags uint64
	if n.opts.DestroyOnDisconnect {
		clientFlags |= cflagDestroyOnDisconnect
	}
	msgs, err := n.execute(ctx, cmdConnect, false, connectAttrs(c, fds, clientFlags))
	runtime.KeepAlive(c.Sockets)
	if err != nil {
		if c.Index != nil {
			return nil, kernelError(fmt.Sprintf("netlink connect nbd%d", *c.Index), err)
		}
		return nil, kernelError("netlink connect", err)
	}
	index, err := parseIndex(msgs)
	if err != nil {
		return nil, fmt.Errorf("netlink connect: %w", err)
	}
	wctx, cancel := waitCtx(ctx, n.opts.WaitTimeout)
	defer cancel()
	d, err := n.waitReady(wctx, index, c)
	if err != nil {
		// Do not leave a half-usable device tagged with the backend.
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), n.opts.WaitTimeout)
		defer ccancel()
		if derr := n.Detach(cctx, index); derr != nil {
			return nil, fmt.Errorf("%w (and detaching it again: %w)", err, derr)
		}
		return nil, err
	}
	return d, nil
}

// waitReady waits until nbd<index> is started, shows the size and has a
// device node, and checks its backend file.
func (n *Netlink) waitReady(ctx context.Context, index uint32, c normalized) (*Device, error) {
	path := devicePath(n.opts.DevRoot, index)
	err := poll(ctx, fmt.Sprintf("nbd%d to be ready", index), func() (bool, string, error) {
		pid, err := n.sys.pid(index)
		if err != nil {
			return false, "", err
		}
		sectors, err := n.sys.sizeSectors(index)
		if err != nil {
			return false, "", err
		}
		state := fmt.Sprintf("pid %d, %d sectors of %d, node %v", pid, sectors, c.expectedSectors, isDevice(path))
		if pid == 0 || !c.sizeShown(sectors) || !isDevice(path) {
			return false, state, nil
		}
		// Under concurrent attaches and detaches the kernel was seen
		// answering ENODEV for a moment on a freshly started device's
		// backend file (sysfs attribute being replaced); read it again.
		if _, _, err := n.sys.backend(index); errors.Is(err, syscall.ENODEV) {
			return false, state + ", backend file not readable yet", nil
		}
		return true, state, nil
	})
	if err != nil {
		return nil, err
	}
	id, ok, err := n.sys.backend(index)
	switch {
	case err != nil:
		return nil, err
	case !ok:
		// The kernel creates the file before replying to CONNECT.
		return nil, fmt.Errorf("%w: nbd%d has no backend file: the kernel does not record backend "+
			"identifiers (Linux ≥ 5.14 is required)", ErrNotSupported, index)
	case id != c.BackendID:
		return nil, fmt.Errorf("%w: nbd%d carries %q, attached %q", ErrBackendMismatch, index, id, c.BackendID)
	}
	d, err := n.sys.device(n.opts.DevRoot, index)
	if err != nil {
		return nil, err
	}
	d.Connected = true
	return &d, nil
}

// Detach sends NBD_CMD_DISCONNECT and waits until the kernel has torn the
// configuration down (the pid file is gone). A device that is not started
// is left alone and nil is returned. If something still holds the device
// open (a mount), the wait ends with ErrDeviceBusy when the context or
// Options.WaitTimeout expires; the connection is closed by then anyway.
func (n *Netlink) Detach(ctx context.Context, index uint32) error {
	pid, err := n.sys.pid(index)
	if err != nil {
		return err
	}
	if pid == 0 {
		return nil
	}
	if _, err := n.execute(ctx, cmdDisconnect, true, []attrs{withIndex(index)}); err != nil {
		if !n.sys.exists(index) {
			return nil
		}
		return kernelError(fmt.Sprintf("netlink disconnect nbd%d", index), err)
	}
	if err := n.waitReleased(ctx, index); err != nil {
		return fmt.Errorf("%w: %w", ErrDisconnectPending, err)
	}
	return nil
}

func (n *Netlink) waitReleased(ctx context.Context, index uint32) error {
	wctx, cancel := waitCtx(ctx, n.opts.WaitTimeout)
	defer cancel()
	return waitReleased(wctx, n.sys, index)
}

// DetachBackend detaches the device carrying backendID, if any.
func (n *Netlink) DetachBackend(ctx context.Context, backendID string) error {
	return detachBackend(ctx, n, n.sys, backendID)
}

// Reconfigure sends NBD_CMD_RECONFIGURE. The device must be started and
// carry rc.BackendID.
func (n *Netlink) Reconfigure(ctx context.Context, index uint32, rc Reconfig) error {
	if err := validBackendID(rc.BackendID, true); err != nil {
		return err
	}
	if err := n.checkBackend(index, rc.BackendID); err != nil {
		return err
	}
	list := []attrs{withIndex(index), withBackendID(rc.BackendID)}
	if rc.SizeBytes != 0 {
		list = append(list, withSize(rc.SizeBytes))
	}
	if rc.Timeout != nil {
		s, err := seconds(*rc.Timeout, "timeout")
		if err != nil {
			return err
		}
		list = append(list, withTimeout(s))
	}
	if rc.DeadConnTimeout != nil {
		s, err := seconds(*rc.DeadConnTimeout, "dead-connection timeout")
		if err != nil {
			return err
		}
		list = append(list, withDeadConnTimeout(s))
	}
	if len(rc.Sockets) > 0 {
		fds, err := socketFDs(rc.Sockets)
		if err != nil {
			return err
		}
		list = append(list, withSockets(fds))
	}
	_, err := n.execute(ctx, cmdReconfigure, true, list)
	runtime.KeepAlive(rc.Sockets)
	if err != nil {
		return kernelError(fmt.Sprintf("netlink reconfigure nbd%d", index), err)
	}
	return nil
}

// checkBackend verifies that nbd<index> is started and carries id.
func (n *Netlink) checkBackend(index uint32, id string) error {
	pid, err := n.sys.pid(index)
	if err != nil {
		return err
	}
	if pid == 0 {
		return fmt.Errorf("%w: nbd%d is not started", ErrNotFound, index)
	}
	got, ok, err := n.sys.backend(index)
	if err != nil {
		return err
	}
	if ok && got != id {
		return fmt.Errorf("%w: nbd%d carries %q, not %q", ErrBackendMismatch, index, got, id)
	}
	return nil
}

// Resize reconfigures the size (the block size is kept) and waits until
// sysfs shows it. Servers that fix an export's size per connection (nbdkit,
// qemu-nbd) still refuse I/O beyond the size negotiated on the existing
// connections; the new space is usable once those are replaced.
func (n *Netlink) Resize(ctx context.Context, index uint32, backendID string, sizeBytes uint64) error {
	if sizeBytes == 0 || sizeBytes > 1<<63-1 {
		return fmt.Errorf("%w: size %d", ErrInvalidConfig, sizeBytes)
	}
	if err := n.Reconfigure(ctx, index, Reconfig{BackendID: backendID, SizeBytes: sizeBytes}); err != nil {
		return err
	}
	return waitSize(ctx, n.sys, index, sizeBytes, n.opts.WaitTimeout)
}

func waitSize(ctx context.Context, s sysfs, index uint32, sizeBytes uint64, d time.Duration) error {
	wctx, cancel := waitCtx(ctx, d)
	defer cancel()
	return poll(wctx, fmt.Sprintf("nbd%d size %d", index, sizeBytes), func() (bool, string, error) {
		sectors, err := s.sizeSectors(index)
		return sectors == sizeBytes>>9, fmt.Sprintf("%d sectors", sectors), err
	})
}

// Status sends NBD_CMD_STATUS for all devices (no INDEX attribute).
func (n *Netlink) Status(ctx context.Context) ([]Status, error) {
	msgs, err := n.execute(ctx, cmdStatus, false, nil)
	if err != nil {
		return nil, kernelError("netlink status", err)
	}
	return parseStatus(msgs)
}

// List reads every nbd device: sysfs for the fields, STATUS for Connected.
func (n *Netlink) List(ctx context.Context) ([]Device, error) {
	return inventory(ctx, n.sys, n.opts.DevRoot, n.Status)
}

// FindByBackend returns the started device whose backend file is
// backendID. Several such devices (attached outside this package) give an
// ErrAlreadyAttached error naming them.
func (n *Netlink) FindByBackend(ctx context.Context, backendID string) (*Device, error) {
	return findByBackend(ctx, n.sys, n.opts.DevRoot, backendID, n.Status, true)
}

// findBackend is findBackend among the devices STATUS reports connected:
// one netlink round trip instead of reading the backend file of every
// device (nbds_max of them, 16 to 128 reads per attach). A device that
// is not connected has no configuration, hence no backend file and no
// pid, so it cannot match. If STATUS fails, every device is read.
func (n *Netlink) findBackend(ctx context.Context, id string) ([]uint32, error) {
	st, err := n.Status(ctx)
	if err != nil {
		return findBackend(n.sys, id)
	}
	return findBackendIn(n.sys, id, connectedIndexes(st))
}

// connectedIndexes returns the indexes STATUS reports connected.
func connectedIndexes(st []Status) []uint32 {
	var out []uint32
	for _, x := range st {
		if x.Connected {
			out = append(out, x.Index)
		}
	}
	return out
}

// findByBackend finds the one device carrying id. With onlyConnected
// (status is the kernel's STATUS) it reads the backend files of connected
// devices only.
func findByBackend(ctx context.Context, s sysfs, devRoot, id string, status func(context.Context) ([]Status, error), onlyConnected bool) (*Device, error) {
	var st []Status
	var found []uint32
	var err error
	if onlyConnected {
		if st, err = status(ctx); err != nil {
			return nil, err
		}
		found, err = findBackendIn(s, id, connectedIndexes(st))
	} else {
		found, err = findBackend(s, id)
	}
	if err != nil {
		return nil, err
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: no device carries backend %q", ErrNotFound, id)
	case 1:
	default:
		return nil, fmt.Errorf("%w: backend %q is on several devices %v", ErrAlreadyAttached, id, found)
	}
	d, err := s.device(devRoot, found[0])
	if err != nil {
		return nil, err
	}
	if st == nil {
		if st, err = status(ctx); err != nil {
			return nil, err
		}
	}
	for _, x := range st {
		if x.Index == d.Index {
			d.Connected = x.Connected
		}
	}
	return &d, nil
}
