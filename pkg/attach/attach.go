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
	// that, and then a relayed TLS volume stalls after a plugin restart
	// until restaged, and a kernel-TLS one cannot be reconnected by a later
	// process once its connection dies.
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
	hub     *hub
	// diagUnix and diagTCP tell whether sock_diag answers for the
	// family; without it nothing the kernel took can be confirmed (see
	// watch.attempt). Each is probed at its first use: a command that
	// attaches one unix-socket export does not pay for the TCP probe.
	diagUnixOnce, diagTCPOnce sync.Once
	diagUnix, diagTCP         bool

	mu      sync.Mutex
	watched map[string]*watch // by volume ID
}

var _ driver.VolumeAttacher = (*Attacher)(nil)

// keep returns duplicates of files (fewer on failure).
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
	dev, err := device.New(ctx, opts.Device)
	return newAttacher(ctx, opts, dev, err)
}

// newAttacher builds an Attacher on a given kernel side (tests pass a
// fake).
func newAttacher(ctx context.Context, opts Options, dev device.Attacher, initErr error) *Attacher {
	base, stop := context.WithCancel(context.WithoutCancel(ctx))
	a := &Attacher{opts: opts, dev: dev, initErr: initErr, base: base, stop: stop, watched: map[string]*watch{}}
	if dev != nil {
		rc, _ := dev.(device.Reconnector)
		a.hub = newHub(base, rc, dev.Status, opts.PollInterval)
	}
	return a
}

// Close stops supervision and waits for it. Devices stay attached: they
// outlive the plugin.
func (a *Attacher) Close() error {
	a.stop()
	a.mu.Lock()
	ws := make([]*watch, 0, len(a.watched))
	for _, w := range a.watched {
		ws = append(ws, w)
	}
	a.mu.Unlock()
	for _, w := range ws {
		w.stop()
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
	n, err := dial(ctx, spec, max(1, spec.Connections))
	if err != nil {
		return nil, err
	}
	defer n.closeAll()
	bs, err := blockSize(spec, n.info)
	if err != nil {
		return nil, err
	}
	// Identify the sockets, keep the TLS material and take handles before
	// the kernel has the device: no failure after a successful attach may
	// leave it unsupervised.
	ids := make([]sockID, len(n.files))
	for i, f := range n.files {
		id, err := identify(f)
		if err != nil {
			return nil, err
		}
		ids[i] = id
	}
	if spec.TLS != nil {
		if err := a.saveTLS(spec.VolumeID, spec.TLS); err != nil {
			return nil, err
		}
	}
	var handles []*os.File
	if len(ids) > 0 && !ids[0].tcp() {
		if handles = keep(n.files); len(handles) != len(n.files) {
			closeAll(handles)
			return nil, errors.New("duplicating sockets failed")
		}
	}
	cfg := device.Config{
		Sockets: n.files, SizeBytes: n.info.Size, BlockSize: bs, ServerFlags: uint16(n.info.Flags),
		Timeout: spec.Timeout, DeadConnTimeout: spec.DeadConnTimeout, BackendID: a.BackendID(spec.VolumeID),
		ReadOnly: spec.ReadOnly,
	}
	d, err := a.dev.Attach(ctx, cfg)
	if err != nil {
		closeAll(handles)
		if !errors.Is(err, device.ErrAlreadyAttached) {
			a.removeTLS(spec.VolumeID)
		}
		return nil, err
	}
	// CONNECT takes every socket it is given.
	conns := make([]*kconn, len(ids))
	for i, id := range ids {
		conns[i] = &kconn{id: id, relay: n.takeRelay(i), tls: n.tlsOf(i)}
		if handles != nil {
			conns[i].handle = handles[i]
		}
	}
	// Without sock_diag nothing tells a dead connection from a live one:
	// the connections then count as unknown (LINK_DEAD drives reconnects,
	// online resize is refused).
	w := a.newWatch(spec, d, conns, len(ids) > 0 && a.diag(ids[0]))
	w.size, w.flags, w.flagsKnown = d.SizeBytes, uint16(n.info.Flags), true
	w.tls, w.tlsFallback = summarizeTLS(n.tls)
	a.start(w)
	w.reportRelay(n)
	return a.attachment(spec.VolumeID, *d), nil
}

// diag reports whether sock_diag answers for id's family.
func (a *Attacher) diag(id sockID) bool {
	if id.tcp() {
		a.diagTCPOnce.Do(func() { a.diagTCP = diagProbeTCP() })
		return a.diagTCP
	}
	a.diagUnixOnce.Do(func() { a.diagUnix = diagProbeUnix() })
	return a.diagUnix
}

// newWatch returns the watch of an attached device (not started).
func (a *Attacher) newWatch(spec driver.AttachSpec, d *device.Device, conns []*kconn, complete bool) *watch {
	_, canReconnect := a.dev.(device.Reconnector)
	return &watch{a: a, spec: spec, index: d.Index, backend: a.BackendID(spec.VolumeID), devSize: d.SizeBytes,
		done: make(chan struct{}), healthy: true, conns: conns, complete: complete, size: d.SizeBytes,
		supervised: canReconnect && !d.ProcessBound() && spec.DeadConnTimeout > 0}
}

// start registers w as its volume's watch, replacing (and stopping) an
// earlier one, and starts its goroutine if the device can be supervised.
func (a *Attacher) start(w *watch) {
	a.mu.Lock()
	old := a.watched[w.spec.VolumeID]
	a.watched[w.spec.VolumeID] = w
	a.mu.Unlock()
	if old != nil {
		old.stop()
		old.release()
	}
	if !w.supervised {
		close(w.done)
		w.cancel = func() {}
		return
	}
	ctx, cancel := context.WithCancel(a.base)
	w.cancel = cancel
	w.sub = a.hub.subscribe(w.index)
	go w.run(ctx)
}

// Adopt resumes supervision of a volume attached by an earlier process
// (the node service calls it at start for every state record). It returns
// at once: reconnecting what died meanwhile, and learning the export,
// happen in the background, for as long as the server does not answer;
// until then Resize answers ErrAdopting.
func (a *Attacher) Adopt(ctx context.Context, spec driver.AttachSpec) error {
	if err := a.Ready(ctx); err != nil {
		return err
	}
	d, err := a.dev.FindByBackend(ctx, a.BackendID(spec.VolumeID))
	if errors.Is(err, device.ErrNotFound) {
		return fmt.Errorf("%w: %w", driver.ErrNotAttached, err)
	}
	if err != nil {
		return err
	}
	if spec.TLS == nil {
		spec.TLS = a.loadTLS(spec.VolumeID)
	}
	// The connections of the earlier process are the kernel's; this
	// process knows none of them.
	w := a.newWatch(spec, d, nil, false)
	w.adopting = w.supervised
	a.start(w)
	return nil
}

// Health counts the attached volumes this process supervises: healthy, and
// degraded (connection lost, reconnecting, or given up).
func (a *Attacher) Health() (healthy, degraded int) {
	a.mu.Lock()
	ws := make([]*watch, 0, len(a.watched))
	for _, w := range a.watched {
		ws = append(ws, w)
	}
	a.mu.Unlock()
	for _, w := range ws {
		w.mu.Lock()
		if w.healthy {
			healthy++
		} else {
			degraded++
		}
		w.mu.Unlock()
	}
	return healthy, degraded
}

func (a *Attacher) watchOf(volumeID string) *watch {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.watched[volumeID]
}

func (a *Attacher) attachment(volumeID string, d device.Device) *driver.Attachment {
	att := &driver.Attachment{VolumeID: volumeID, Device: d.Path, Size: d.SizeBytes, ReadOnly: d.ReadOnly, Healthy: true}
	if w := a.watchOf(volumeID); w != nil && w.index == d.Index {
		w.mu.Lock()
		att.Healthy, att.Condition = w.healthy, w.condition
		att.TLS, att.TLSFallback = w.tls, w.tlsFallback
		w.mu.Unlock()
	}
	return att
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

// Detach disconnects the volume's device. Supervision goes on until the
// kernel has confirmed the disconnect (it ends any adoption or reconnect
// in progress first, so that nothing hands the device new sockets); if
// DISCONNECT fails, the volume stays supervised.
func (a *Attacher) Detach(ctx context.Context, volumeID string) error {
	if err := a.Ready(ctx); err != nil {
		return err
	}
	w := a.watchOf(volumeID)
	if w != nil {
		w.mu.Lock()
		w.detaching = true
		w.mu.Unlock()
		w.op.Lock()
	}
	err := a.dev.DetachBackend(ctx, a.BackendID(volumeID))
	if errors.Is(err, device.ErrNotFound) {
		err = nil
	}
	if w != nil {
		if err != nil {
			// DISCONNECT failed: the device is attached and stays
			// supervised. Accepted but not yet released: its
			// connections are gone for good, nothing may reconnect it;
			// supervision ends when STATUS shows it gone.
			w.mu.Lock()
			if errors.Is(err, device.ErrDisconnectPending) {
				w.healthy, w.condition = false, "disconnect requested; the device is still held open"
			} else {
				w.detaching = false
			}
			w.mu.Unlock()
			w.op.Unlock()
			return err
		}
		w.op.Unlock()
		a.mu.Lock()
		if a.watched[volumeID] == w {
			delete(a.watched, volumeID)
		}
		a.mu.Unlock()
		w.stop()
		w.release()
	}
	if err == nil {
		a.removeTLS(volumeID)
	}
	return err
}

// Resize asks the server for the export size and resizes the device.
// Servers fix an export's size when a connection is negotiated, so every
// connection of the device must then be renewed: that is done only when
// this process knows and can end each of the kernel's connections (it made
// them; TCP ones are ended through sock_diag). Otherwise — a volume
// adopted after a plugin restart, a unix-socket connection the kernel took
// from a later process — the answer is nbd.ErrNotSupportedByExport
// (FailedPrecondition) and the device keeps its size.
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
	w := a.watchOf(volumeID)
	if w == nil || !w.supervised || w.index != d.Index {
		return 0, fmt.Errorf("%w: online resize of %s needs a supervised netlink device; unstage and stage the volume to pick up the new size", nbd.ErrNotSupportedByExport, d.Path)
	}
	w.op.Lock()
	defer w.op.Unlock()
	w.mu.Lock()
	adopting, cond := w.adopting, w.condition
	renewable := w.complete && len(w.conns) > 0
	var old []*kconn
	for _, c := range w.conns {
		renewable = renewable && a.diag(c.id) && c.renewable() && !w.connDead(c)
		old = append(old, c)
	}
	w.mu.Unlock()
	if adopting {
		return 0, fmt.Errorf("%w: %s", driver.ErrAdopting, cond)
	}
	if !renewable {
		return 0, fmt.Errorf("%w: online resize of %s must renew every connection of the device, and this plugin instance cannot end all of them (it was restarted since the volume was staged, a connection was replaced without a handle, or the kernel's sock_diag is unavailable); unstage and stage the volume to pick up the new size", nbd.ErrNotSupportedByExport, d.Path)
	}
	// Renew first, resize after: the device never offers space its
	// connections were not negotiated for. A replacement must offer at
	// least the new size.
	w.mu.Lock()
	w.size, w.flags = info.Size, uint16(info.Flags)
	w.mu.Unlock()
	for i, c := range old {
		if err := c.end(); err != nil {
			if i == 0 {
				return 0, fmt.Errorf("%w: cannot end the device's connection %v to renew it for the new size: %w", nbd.ErrNotSupportedByExport, c.id, err)
			}
			return 0, fmt.Errorf("renew connection %v: %w", c.id, err)
		}
	}
	w.op.Unlock()
	w.sub.signal(sigTick, nil)
	err = w.waitRenewed(ctx, old)
	w.op.Lock()
	if err != nil {
		return 0, err
	}
	if err := a.dev.Resize(ctx, d.Index, w.backend, info.Size); err != nil {
		return 0, err
	}
	return info.Size, nil
}

// waitRenewed waits until none of old is among the connections and none
// is dead.
func (w *watch) waitRenewed(ctx context.Context, old []*kconn) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		w.mu.Lock()
		left := slices.ContainsFunc(w.conns, func(c *kconn) bool { return slices.Contains(old, c) })
		cond := w.condition
		w.mu.Unlock()
		if !left && len(w.deadConns()) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("reconnect to renew connections: %w (%s)", ctx.Err(), cond)
		case <-t.C:
		}
	}
}
