// SPDX-License-Identifier: Apache-2.0

// Package attach joins pkg/nbd and pkg/device into what the node service
// needs: negotiate with an export for the kernel, attach it under the
// volume's identity, keep it connected (reconnect when the server comes
// back), find it again after a restart, resize and detach it. It does not
// log; supervision events become the volume's health.
package attach

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// BackendPrefix marks the devices the CSI driver attached: their backend
// identifier is the prefix followed by the volume ID.
const BackendPrefix = "nbd-csi:"

// CLIBackendPrefix marks devices attached by `nbd-csi attach`, so that the
// node plugin never mistakes them for its own (and never sweeps them as
// orphans).
const CLIBackendPrefix = "nbd-csi-cli:"

// Options configure an Attacher.
type Options struct {
	// Device configures the kernel side (netlink or ioctl, module loading).
	Device device.Options
	// SecretsDir keeps the TLS material of TLS volumes (mode 0700, files
	// 0600) so that a restarted plugin can reconnect them; empty disables
	// that, and TLS volumes then stall after a plugin restart until
	// restaged.
	SecretsDir string
	// PollInterval is how often supervised devices are checked besides
	// LINK_DEAD notifications (0: the device package default).
	PollInterval time.Duration
	// BackendPrefix prefixes the volume ID in backend identifiers; empty
	// means BackendPrefix.
	BackendPrefix string
	// OnEvent, when set, is told of every supervision event (metrics).
	OnEvent func(volumeID string, e device.Event)
}

// Attacher implements driver.VolumeAttacher on the real kernel.
type Attacher struct {
	opts    Options
	dev     device.Attacher
	initErr error
	base    context.Context
	stop    context.CancelFunc

	mu      sync.Mutex
	watched map[string]*watch // by volume ID
}

var _ driver.VolumeAttacher = (*Attacher)(nil)

// watch is one supervised volume.
type watch struct {
	cancel    context.CancelFunc
	done      chan struct{}
	sup       *device.Supervisor
	healthy   bool
	condition string
	relays    []*relay
	// socks are duplicates of the sockets the kernel holds. Shutting them
	// down makes the kernel see its connections die, which is how an
	// online resize gets connections negotiated for the new size.
	socks []*os.File
}

// renew ends the volume's current connections so that supervision replaces
// them; it reports false when this process holds none (it did not make
// them).
func (w *watch) renew() bool {
	if len(w.socks) == 0 && len(w.relays) == 0 {
		return false
	}
	for _, f := range w.socks {
		if rc, err := f.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) { _ = unix.Shutdown(int(fd), unix.SHUT_RDWR) })
		}
		f.Close()
	}
	w.socks = nil
	for _, r := range w.relays {
		r.close()
	}
	w.relays = nil
	return true
}

// release closes what the watch holds.
func (w *watch) release() {
	for _, f := range w.socks {
		f.Close()
	}
	w.socks = nil
	for _, r := range w.relays {
		r.close()
	}
	w.relays = nil
}

// pruneDead closes and drops the sockets whose connection has ended (the
// kernel shut it down, or the peer closed it), keeping the others.
func pruneDead(files []*os.File) []*os.File {
	return slices.DeleteFunc(files, func(f *os.File) bool {
		pfd := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLRDHUP}}
		n, err := unix.Poll(pfd, 0)
		if err != nil || n == 0 || pfd[0].Revents&(unix.POLLHUP|unix.POLLRDHUP|unix.POLLERR|unix.POLLNVAL) == 0 {
			return false
		}
		f.Close()
		return true
	})
}

// keep returns duplicates of files (nil entries for failures).
func keep(files []*os.File) []*os.File {
	var out []*os.File
	for _, f := range files {
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			continue
		}
		unix.CloseOnExec(fd)
		out = append(out, os.NewFile(uintptr(fd), f.Name()))
	}
	return out
}

// New returns an Attacher. When the kernel cannot attach at all (no nbd
// module, no privilege) New still succeeds: Ready and Attach report why, so
// that the plugin can run and say so through Probe.
func New(ctx context.Context, opts Options) *Attacher {
	base, stop := context.WithCancel(context.WithoutCancel(ctx))
	a := &Attacher{opts: opts, base: base, stop: stop, watched: map[string]*watch{}}
	a.dev, a.initErr = device.New(ctx, opts.Device)
	return a
}

// Close stops supervision. Devices stay attached: they outlive the plugin.
func (a *Attacher) Close() error {
	a.stop()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.watched {
		w.cancel()
	}
	if a.dev != nil {
		return a.dev.Close()
	}
	return nil
}

// Ready reports whether devices can be attached.
func (a *Attacher) Ready(context.Context) error {
	if a.initErr != nil {
		return fmt.Errorf("nbd kernel support: %w", a.initErr)
	}
	return nil
}

// BackendID returns the backend identifier of a volume's device made by
// the CSI driver.
func BackendID(volumeID string) string { return backendID(BackendPrefix, volumeID) }

// BackendID returns the backend identifier this attacher gives a volume's
// device.
func (a *Attacher) BackendID(volumeID string) string { return backendID(a.prefix(), volumeID) }

func (a *Attacher) prefix() string {
	if a.opts.BackendPrefix != "" {
		return a.opts.BackendPrefix
	}
	return BackendPrefix
}

// backendID joins prefix and volume ID; IDs too long for the kernel's limit
// are hashed.
func backendID(prefix, volumeID string) string {
	id := prefix + volumeID
	if len(id) <= device.MaxBackendIDLen {
		return id
	}
	h := sha256.Sum256([]byte(volumeID))
	return prefix + "sha256:" + hex.EncodeToString(h[:])
}

// negotiated is the result of dialling an export for the kernel.
type negotiated struct {
	files  []*os.File
	relays []*relay
	info   nbd.ExportInfo
}

func (n *negotiated) closeFiles() {
	for _, f := range n.files {
		f.Close()
	}
	n.files = nil
}

// dial negotiates want connections (one unless the export allows
// multi-conn) with the kernel profile and returns a socket per connection.
func dial(ctx context.Context, spec driver.AttachSpec) (*negotiated, error) {
	var opts []nbd.Option
	if spec.TLS != nil {
		opts = append(opts, nbd.WithTLS(spec.TLS))
	}
	n := &negotiated{}
	ok := false
	defer func() {
		if !ok {
			n.closeFiles()
			for _, r := range n.relays {
				r.close()
			}
		}
	}()
	want := 1
	for i := 0; i < want; i++ {
		c, err := nbd.Dial(ctx, spec.URI, opts...)
		if err != nil {
			return nil, err
		}
		info := c.Export()
		if i == 0 {
			n.info = info
			if spec.Connections > 1 && info.Flags.Has(nbd.FlagCanMultiConn) {
				want = spec.Connections
			}
		} else if info.Size != n.info.Size || info.Flags != n.info.Flags {
			c.Close()
			return nil, fmt.Errorf("connection %d saw size %d flags %v, connection 1 size %d flags %v", i+1, info.Size, info.Flags, n.info.Size, n.info.Flags)
		}
		if info.TLS {
			// The kernel cannot speak TLS: it gets a socket pair, and this
			// process encrypts.
			r, err := newRelay(c.Stream())
			if err != nil {
				c.Stream().Close()
				return nil, err
			}
			n.relays = append(n.relays, r)
			n.files = append(n.files, r.kernel)
			continue
		}
		f, err := c.File()
		c.Close()
		if err != nil {
			return nil, err
		}
		n.files = append(n.files, f)
	}
	ok = true
	return n, nil
}

// blockSize picks the device block size: the override, else the server's
// preferred size within what the kernel accepts (512–4096), never below the
// server's minimum.
func blockSize(spec driver.AttachSpec, info nbd.ExportInfo) (uint64, error) {
	if spec.BlockSize != 0 {
		if info.BlockSizesAdvertised && spec.BlockSize < info.BlockSizes.Minimum {
			return 0, fmt.Errorf("%w: blockSize %d is below the server's minimum %d", nbd.ErrBadArgument, spec.BlockSize, info.BlockSizes.Minimum)
		}
		return uint64(spec.BlockSize), nil
	}
	if !info.BlockSizesAdvertised {
		return device.DefaultBlockSize, nil
	}
	if info.BlockSizes.Minimum > 4096 {
		return 0, fmt.Errorf("%w: the server's minimum block size %d exceeds what the kernel supports (4096)", nbd.ErrNotSupportedByExport, info.BlockSizes.Minimum)
	}
	return min(max(uint64(info.BlockSizes.Preferred), 512), 4096), nil
}

// Attach negotiates, attaches and starts supervision.
func (a *Attacher) Attach(ctx context.Context, spec driver.AttachSpec) (*driver.Attachment, error) {
	if err := a.Ready(ctx); err != nil {
		return nil, err
	}
	n, err := dial(ctx, spec)
	if err != nil {
		return nil, err
	}
	defer n.closeFiles()
	bs, err := blockSize(spec, n.info)
	if err != nil {
		for _, r := range n.relays {
			r.close()
		}
		return nil, err
	}
	cfg := device.Config{
		Sockets: n.files, SizeBytes: n.info.Size, BlockSize: bs, ServerFlags: uint16(n.info.Flags),
		Timeout: spec.Timeout, DeadConnTimeout: spec.DeadConnTimeout, BackendID: a.BackendID(spec.VolumeID),
		ReadOnly: spec.ReadOnly,
	}
	d, err := a.dev.Attach(ctx, cfg)
	if err != nil {
		for _, r := range n.relays {
			r.close()
		}
		return nil, err
	}
	if spec.TLS != nil {
		if err := a.saveTLS(spec.VolumeID, spec.TLS); err != nil {
			return nil, err
		}
	}
	a.supervise(spec, d, n.info, n.relays, keep(n.files))
	return a.attachment(spec.VolumeID, *d), nil
}

// Adopt resumes supervision of a volume attached by an earlier process (the
// node service calls it at start for every state record) and replaces any
// connection that died meanwhile.
func (a *Attacher) Adopt(ctx context.Context, spec driver.AttachSpec) error {
	if err := a.Ready(ctx); err != nil {
		return err
	}
	d, err := a.dev.FindByBackend(ctx, a.BackendID(spec.VolumeID))
	if err != nil {
		return err
	}
	if spec.TLS == nil {
		spec.TLS = a.loadTLS(spec.VolumeID)
	}
	// Learn the export's flags; supervision insists a reconnected export
	// matches them. If the server is down right now, the probe is retried
	// in the background before supervision starts.
	info, err := nbd.Probe(ctx, spec.URI, tlsOpts(spec)...)
	if err != nil {
		a.adoptLater(spec, d)
		return fmt.Errorf("adopted nbd%d, but the export is unreachable for now (will retry): %w", d.Index, err)
	}
	a.supervise(spec, d, *info, nil, nil)
	// Link-dead notifications sent while no plugin ran are lost, and the
	// relays of TLS volumes died with the previous process: offer fresh
	// connections now. The kernel only fills dead slots, so for a healthy
	// device this costs one connection to the server and changes nothing.
	return a.reconnectNow(ctx, spec, d, *info)
}

// adoptLater probes the export with backoff until it answers, then starts
// supervision (and replaces dead connections).
func (a *Attacher) adoptLater(spec driver.AttachSpec, d *device.Device) {
	a.mu.Lock()
	a.watched[spec.VolumeID] = &watch{cancel: func() {}, done: closedChan(), healthy: false,
		condition: "adopted after a plugin restart; the NBD server does not answer yet"}
	a.mu.Unlock()
	go func() {
		delay := time.Second
		for {
			select {
			case <-a.base.Done():
				return
			case <-time.After(delay):
			}
			delay = min(2*delay, 30*time.Second)
			ctx, cancel := context.WithTimeout(a.base, 30*time.Second)
			info, err := nbd.Probe(ctx, spec.URI, tlsOpts(spec)...)
			if err == nil {
				a.supervise(spec, d, *info, nil, nil)
				_ = a.reconnectNow(ctx, spec, d, *info)
				cancel()
				return
			}
			cancel()
		}
	}()
}

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

func tlsOpts(spec driver.AttachSpec) []nbd.Option {
	if spec.TLS == nil {
		return nil
	}
	return []nbd.Option{nbd.WithTLS(spec.TLS)}
}

// reconnectNow hands fresh sockets to a device whose connections are known
// to be dead. The kernel only fills dead slots, so this is safe if some are
// alive.
func (a *Attacher) reconnectNow(ctx context.Context, spec driver.AttachSpec, d *device.Device, info nbd.ExportInfo) error {
	n, err := dial(ctx, spec)
	if err != nil {
		return err
	}
	defer n.closeFiles()
	if err := a.dev.Reconfigure(ctx, d.Index, device.Reconfig{BackendID: a.BackendID(spec.VolumeID), Sockets: n.files}); err != nil {
		for _, r := range n.relays {
			r.close()
		}
		return err
	}
	a.mu.Lock()
	if w := a.watched[spec.VolumeID]; w != nil {
		w.relays = append(w.relays, n.relays...)
		w.socks = append(pruneDead(w.socks), keep(n.files)...)
	}
	a.mu.Unlock()
	return nil
}

// supervise starts reconnect supervision for a netlink device. ioctl
// devices live only as long as this process and cannot be reconfigured.
func (a *Attacher) supervise(spec driver.AttachSpec, d *device.Device, info nbd.ExportInfo, relays []*relay, socks []*os.File) {
	rc, ok := a.dev.(device.Reconnector)
	a.mu.Lock()
	defer a.mu.Unlock()
	if old := a.watched[spec.VolumeID]; old != nil {
		old.cancel()
		old.release()
	}
	ctx, cancel := context.WithCancel(a.base)
	w := &watch{cancel: cancel, done: make(chan struct{}), healthy: true, relays: relays, socks: socks}
	a.watched[spec.VolumeID] = w
	if !ok || d.ProcessBound() || spec.DeadConnTimeout <= 0 {
		close(w.done)
		return
	}
	flags := uint16(info.Flags)
	sup, err := device.NewSupervisor(rc, device.SupervisorConfig{
		Index: d.Index, BackendID: a.BackendID(spec.VolumeID), SizeBytes: d.SizeBytes, ServerFlags: flags,
		DeadConnTimeout: spec.DeadConnTimeout, PollInterval: a.opts.PollInterval,
		Redial: func(ctx context.Context) ([]*os.File, uint64, uint16, error) {
			n, err := dial(ctx, spec)
			if err != nil {
				return nil, 0, 0, err
			}
			// A relay of a refused redial ends by itself when the
			// Supervisor closes its kernel side.
			a.mu.Lock()
			w.relays = append(w.relays, n.relays...)
			a.mu.Unlock()
			files := n.files
			n.files = nil
			return files, n.info.Size, uint16(n.info.Flags), nil
		},
		// Only what the kernel took is kept (a refused redial's
		// connections must close), and what died is let go: without
		// that every reconnect would leave a socket open.
		Handed: func(socks []*os.File) {
			a.mu.Lock()
			defer a.mu.Unlock()
			w.socks = append(pruneDead(w.socks), keep(socks)...)
			w.relays = slices.DeleteFunc(w.relays, (*relay).ended)
		},
		OnEvent: func(e device.Event) {
			a.event(w, e)
			if a.opts.OnEvent != nil {
				a.opts.OnEvent(spec.VolumeID, e)
			}
		},
	})
	if err != nil {
		w.healthy, w.condition = false, "cannot supervise: "+err.Error()
		close(w.done)
		return
	}
	w.sup = sup
	go func() {
		defer close(w.done)
		_ = sup.Run(ctx)
	}()
}

// Health counts the attached volumes this process supervises: healthy, and
// degraded (connection lost, reconnecting, or given up).
func (a *Attacher) Health() (healthy, degraded int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.watched {
		if w.healthy {
			healthy++
		} else {
			degraded++
		}
	}
	return healthy, degraded
}

// event turns supervision events into the volume's health.
func (a *Attacher) event(w *watch, e device.Event) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch e.Kind {
	case device.EventLinkDead:
		w.healthy, w.condition = false, "NBD connection lost; reconnecting"
	case device.EventRedialFailed, device.EventReconfigureFailed, device.EventExportChanged:
		w.healthy, w.condition = false, fmt.Sprintf("reconnect attempt %d failed: %v", e.Attempt, e.Err)
	case device.EventReconnected:
		w.healthy, w.condition = true, ""
	case device.EventGaveUp:
		w.healthy, w.condition = false, "gave up reconnecting: "+e.Err.Error()
	case device.EventDeviceGone:
		w.healthy, w.condition = false, "device disconnected"
	}
}

func (a *Attacher) attachment(volumeID string, d device.Device) *driver.Attachment {
	att := &driver.Attachment{VolumeID: volumeID, Device: d.Path, Size: d.SizeBytes, ReadOnly: d.ReadOnly, Healthy: true}
	a.mu.Lock()
	defer a.mu.Unlock()
	if w := a.watched[volumeID]; w != nil {
		att.Healthy, att.Condition = w.healthy, w.condition
	}
	return att
}

// waitHealthy waits until supervision reports the volume reconnected.
func (a *Attacher) waitHealthy(ctx context.Context, volumeID string) error {
	// Give the kernel a moment to notice the dead link first.
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	sawDead := false
	for deadline := time.Now().Add(5 * time.Second); ; {
		a.mu.Lock()
		w := a.watched[volumeID]
		healthy, cond := w != nil && w.healthy, ""
		if w != nil {
			cond = w.condition
		}
		a.mu.Unlock()
		if !healthy {
			sawDead = true
		}
		if healthy && (sawDead || time.Now().After(deadline)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (%s)", ctx.Err(), cond)
		case <-t.C:
		}
	}
}

// Lookup finds the volume's device by its backend identifier.
func (a *Attacher) Lookup(ctx context.Context, volumeID string) (*driver.Attachment, error) {
	if err := a.Ready(ctx); err != nil {
		return nil, err
	}
	d, err := a.dev.FindByBackend(ctx, a.BackendID(volumeID))
	if errors.Is(err, device.ErrNotFound) {
		return nil, fmt.Errorf("%w: %w", driver.ErrNotAttached, err)
	}
	if err != nil {
		return nil, err
	}
	return a.attachment(volumeID, *d), nil
}

// List returns the devices this driver attached (by backend prefix).
func (a *Attacher) List(ctx context.Context) ([]driver.Attachment, error) {
	if err := a.Ready(ctx); err != nil {
		return nil, err
	}
	devs, err := a.dev.List(ctx)
	if err != nil {
		return nil, err
	}
	var out []driver.Attachment
	for _, d := range devs {
		if id, ok := strings.CutPrefix(d.BackendID, a.prefix()); ok {
			out = append(out, *a.attachment(id, d))
		}
	}
	return out, nil
}

// Detach stops supervision and disconnects the volume's device.
func (a *Attacher) Detach(ctx context.Context, volumeID string) error {
	if err := a.Ready(ctx); err != nil {
		return err
	}
	a.mu.Lock()
	w := a.watched[volumeID]
	delete(a.watched, volumeID)
	a.mu.Unlock()
	if w != nil {
		w.cancel()
		<-w.done
	}
	err := a.dev.DetachBackend(ctx, a.BackendID(volumeID))
	if w != nil {
		w.release()
	}
	if errors.Is(err, device.ErrNotFound) {
		err = nil
	}
	if err == nil {
		a.removeTLS(volumeID)
	}
	return err
}

// Resize asks the server for the export size and resizes the device.
func (a *Attacher) Resize(ctx context.Context, volumeID string, spec driver.AttachSpec) (uint64, error) {
	if err := a.Ready(ctx); err != nil {
		return 0, err
	}
	d, err := a.dev.FindByBackend(ctx, a.BackendID(volumeID))
	if errors.Is(err, device.ErrNotFound) {
		return 0, fmt.Errorf("%w: %w", driver.ErrNotAttached, err)
	}
	if err != nil {
		return 0, err
	}
	if spec.TLS == nil {
		spec.TLS = a.loadTLS(volumeID)
	}
	info, err := nbd.Probe(ctx, spec.URI, tlsOpts(spec)...)
	if err != nil {
		return 0, err
	}
	if info.Size == d.SizeBytes {
		return info.Size, nil
	}
	if info.Size < d.SizeBytes {
		return 0, fmt.Errorf("%w: the export shrank from %d to %d bytes; refusing to shrink the device", nbd.ErrNotSupportedByExport, d.SizeBytes, info.Size)
	}
	// Servers fix an export's size when a connection is negotiated, so the
	// device's connections must be renewed for the new space to be
	// usable. Only connections this process made can be ended.
	a.mu.Lock()
	w := a.watched[volumeID]
	canRenew := w != nil && w.sup != nil && (len(w.socks) > 0 || len(w.relays) > 0)
	a.mu.Unlock()
	if !canRenew {
		return 0, fmt.Errorf("%w: online resize of %s needs connections made by this plugin instance; unstage and stage the volume to pick up the new size", nbd.ErrNotSupportedByExport, d.Path)
	}
	if err := a.dev.Resize(ctx, d.Index, a.BackendID(volumeID), info.Size); err != nil {
		return 0, err
	}
	a.mu.Lock()
	w.sup.SetExport(info.Size, uint16(info.Flags))
	w.renew()
	a.mu.Unlock()
	if err := a.waitHealthy(ctx, volumeID); err != nil {
		return 0, fmt.Errorf("reconnect after resize: %w", err)
	}
	return info.Size, nil
}
