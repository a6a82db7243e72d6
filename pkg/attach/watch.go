// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// kconn is one connection the kernel demonstrably holds: handed over by
// CONNECT, or by a RECONFIGURE after which sock_diag confirmed the kernel
// kept it. Nothing here is a guess about what RECONFIGURE took.
type kconn struct {
	id sockID
	// handle is a descriptor of a unix socket kept since CONNECT or a
	// confirmed refill: shutting it down ends the kernel's connection
	// (TCP connections are ended through sock_diag and need none).
	handle *os.File
	// relay carries a TLS connection; closing it ends the kernel's.
	relay *relay
	// tls is how the connection is encrypted.
	tls connTLS
}

// tlsOfConns returns how each of conns is encrypted.
func tlsOfConns(conns []*kconn) []connTLS {
	out := make([]connTLS, len(conns))
	for i, c := range conns {
		out[i] = c.tls
	}
	return out
}

func (c *kconn) release() {
	if c.handle != nil {
		c.handle.Close()
		c.handle = nil
	}
	if c.relay != nil {
		c.relay.close()
	}
}

// renewable reports whether this process can end the connection.
func (c *kconn) renewable() bool { return c.id.tcp() || c.handle != nil || c.relay != nil }

// connDead asks the kernel whether the connection has ended; a question
// it cannot answer (no sock_diag for the family) counts as alive: the
// kernel's LINK_DEAD still reports deaths.
func (w *watch) connDead(c *kconn) bool {
	if c.relay != nil && c.relay.ended() {
		return true
	}
	if !w.a.diag(c.id) {
		return false
	}
	st, err := diagLookup(c.id)
	return err == nil && !st.live
}

// end ends the kernel's connection so that supervision replaces it.
func (c *kconn) end() error {
	switch {
	case c.relay != nil:
		c.relay.close()
		return nil
	case c.handle != nil:
		rc, err := c.handle.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_RDWR) }); err != nil {
			return err
		}
		return serr
	case c.id.tcp():
		st, err := diagLookup(c.id)
		if err != nil {
			return err
		}
		if !st.held {
			return nil // already gone
		}
		return diagDestroy(c.id, st.cookie)
	}
	return fmt.Errorf("%v: no way to end this connection", c.id)
}

// errStop ends a watch's reconnect attempts for good.
var errStop = errors.New("supervision ended")

// watch is one attached volume and the goroutine that adopts and
// supervises it. The goroutine belongs to the watch: cancel ends it, done
// is closed when it has ended. Everything below mu is guarded by it.
type watch struct {
	a       *Attacher
	spec    driver.AttachSpec
	index   uint32
	backend string
	devSize uint64
	sub     *sub
	cancel  context.CancelFunc
	done    chan struct{}

	// op serialises handing sockets to the kernel with Detach and
	// Resize.
	op sync.Mutex

	mu         sync.Mutex
	supervised bool // a goroutine reconnects this device
	adopting   bool
	healthy    bool
	condition  string
	detaching  bool
	complete   bool // conns are all the kernel's connections
	conns      []*kconn
	size       uint64 // the export size a reconnect must offer at least
	flags      uint16
	flagsKnown bool
	// tls and tlsFallback are how the volume's known connections are
	// encrypted (summarizeTLS), and why some or all not by the kernel.
	tls, tlsFallback string
}

func (w *watch) setHealth(healthy bool, condition string) {
	w.mu.Lock()
	w.healthy, w.condition = healthy, condition
	w.mu.Unlock()
}

func (w *watch) emit(e device.Event) {
	e.Index, e.Time = w.index, time.Now()
	if w.a.opts.OnEvent != nil {
		w.a.opts.OnEvent(w.spec.VolumeID, e)
	}
}

// release closes what the watch holds; the kernel's connections are not
// affected except relays, which end with it.
func (w *watch) release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.conns {
		c.release()
	}
	w.conns = nil
}

// stop ends the goroutine and waits for it.
func (w *watch) stop() {
	w.cancel()
	<-w.done
}

// run adopts (if needed) and then supervises until ctx ends or the device
// is gone.
func (w *watch) run(ctx context.Context) {
	defer close(w.done)
	defer w.sub.close()
	w.mu.Lock()
	adopting := w.adopting
	w.mu.Unlock()
	if adopting {
		if !w.adopt(ctx) {
			return
		}
		// Adoption just looked at everything a pending signal asks for.
		if bits, _ := w.sub.take(); bits&sigGone != 0 {
			w.gone()
			return
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.sub.ch:
		}
		bits, err := w.sub.take()
		if bits&sigGone != 0 {
			w.gone()
			return
		}
		if bits&sigStatusFailed != 0 {
			w.emit(device.Event{Kind: device.EventStatusFailed, Err: err})
		}
		if bits&(sigLinkDead|sigLost|sigTick) != 0 && !w.check(ctx, bits) {
			return
		}
	}
}

// stopping reports whether reconnect attempts must stop: the device is
// gone (STATUS said so meanwhile: supervision ends), or it is being
// detached (attempts pause; supervision goes on until the detach has
// succeeded).
func (w *watch) stopping() (gone, paused bool) {
	if bits, _ := w.sub.take(); bits&sigGone != 0 {
		w.gone()
		return true, false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return false, w.detaching
}

func (w *watch) gone() {
	w.mu.Lock()
	detaching := w.detaching
	w.mu.Unlock()
	if detaching {
		return
	}
	err := fmt.Errorf("nbd%d: %w", w.index, device.ErrDeviceGone)
	w.setHealth(false, "device disconnected")
	w.emit(device.Event{Kind: device.EventDeviceGone, Err: err})
}

// deadConns returns the connections the kernel reports ended.
func (w *watch) deadConns() []*kconn {
	w.mu.Lock()
	conns := slices.Clone(w.conns)
	w.mu.Unlock()
	var dead []*kconn
	for _, c := range conns {
		if w.connDead(c) {
			dead = append(dead, c)
		}
	}
	return dead
}

// check looks at the kernel's connections after a signal and replaces
// those that died. A device whose connections are not all known (adopted
// after a restart) is offered one connection when notifications may have
// been lost; the kernel takes it only into a dead slot, and an untaken one
// is closed at once.
func (w *watch) check(ctx context.Context, bits int) bool {
	w.mu.Lock()
	detaching := w.detaching
	w.mu.Unlock()
	if detaching {
		return true
	}
	dead := w.deadConns()
	w.mu.Lock()
	complete := w.complete
	w.mu.Unlock()
	probe := len(dead) == 0 && (!complete && bits&(sigLinkDead|sigLost) != 0)
	if len(dead) == 0 && !probe {
		if bits&sigLinkDead != 0 {
			// The kernel announces a death before it has shut the
			// socket down: look again shortly.
			time.AfterFunc(200*time.Millisecond, func() { w.sub.signal(sigTick, nil) })
		}
		return true
	}
	if len(dead) > 0 || bits&sigLinkDead != 0 {
		w.emit(device.Event{Kind: device.EventLinkDead})
		w.setHealth(false, "NBD connection lost; reconnecting")
	}
	return w.reconnect(ctx, dead, probe)
}

// reconnect retries until the dead connections are replaced, the device
// is gone (it then returns false: supervision ends), or ctx ends. After the
// dead-connection timeout the kernel fails waiting I/O (reported as
// gave-up), but the device still works once reconnected, so attempts go
// on, more slowly.
func (w *watch) reconnect(ctx context.Context, dead []*kconn, probe bool) bool {
	start := time.Now()
	delay, maxDelay := 100*time.Millisecond, 2*time.Second
	gaveUp := false
	for attempt := 1; ; attempt++ {
		taken, err := w.attempt(ctx, attempt, dead, probe)
		if err == nil && (taken > 0 || probe) {
			if taken > 0 || len(dead) > 0 {
				w.emit(device.Event{Kind: device.EventReconnected, Attempt: attempt})
			}
			if len(w.deadConns()) == 0 {
				w.setHealth(true, "")
				return true
			}
		}
		if ctx.Err() != nil {
			return false
		}
		if errors.Is(err, errStop) {
			gone, _ := w.stopping()
			return !gone
		}
		if err != nil {
			w.setHealth(false, fmt.Sprintf("reconnect attempt %d failed: %v", attempt, err))
		}
		if !gaveUp && time.Since(start) > w.spec.DeadConnTimeout {
			gaveUp = true
			e := fmt.Errorf("nbd%d: %w after %d attempts in %v: %w", w.index, device.ErrReconnectTimeout, attempt, w.spec.DeadConnTimeout, err)
			w.emit(device.Event{Kind: device.EventGaveUp, Err: e})
			w.setHealth(false, "gave up reconnecting within the dead-connection timeout (I/O failed meanwhile); still trying: "+fmt.Sprint(err))
			maxDelay = 30 * time.Second
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		if gone, paused := w.stopping(); gone || paused {
			return !gone
		}
		delay = min(2*delay, maxDelay)
		dead = w.deadConns()
		if len(dead) == 0 && !probe {
			w.setHealth(true, "")
			return true
		}
	}
}

// attempt dials as many connections as there are dead ones (one for a
// probe), hands them to the kernel and keeps what the kernel demonstrably
// took; every other socket is closed before it returns.
func (w *watch) attempt(ctx context.Context, attempt int, dead []*kconn, probe bool) (int, error) {
	want := max(len(dead), 1)
	n, err := dial(ctx, w.spec, want)
	if err != nil {
		err = fmt.Errorf("redial: %w", err)
		w.emit(device.Event{Kind: device.EventRedialFailed, Attempt: attempt, Err: err})
		return 0, err
	}
	defer n.closeAll()
	w.mu.Lock()
	size, flags, known := w.size, w.flags, w.flagsKnown
	w.mu.Unlock()
	if n.info.Size>>9 < size>>9 || (known && !device.SameKernelFlags(uint16(n.info.Flags), flags)) {
		err := fmt.Errorf("%w: size %d flags %#x, the device has size %d flags %#x",
			device.ErrExportChanged, n.info.Size, uint16(n.info.Flags), size, flags)
		w.emit(device.Event{Kind: device.EventExportChanged, Attempt: attempt, Err: err})
		return 0, err
	}
	ids := make([]sockID, len(n.files))
	for i, f := range n.files {
		if ids[i], err = identify(f); err != nil {
			return 0, err
		}
	}
	// Unix sockets refilling known dead slots keep a descriptor (their only
	// handle for a later renewal); which of them the kernel took is learnt
	// from which dead sockets it let go.
	byRelease := !probe && len(ids) > 0 && !ids[0].tcp()
	var handles []*os.File
	if byRelease {
		handles = keep(n.files)
		if len(handles) != len(n.files) {
			closeAll(handles)
			return 0, errors.New("duplicating sockets failed")
		}
	}
	w.op.Lock()
	defer w.op.Unlock()
	w.mu.Lock()
	detaching := w.detaching
	w.mu.Unlock()
	if detaching {
		closeAll(handles)
		return 0, errStop
	}
	err = w.a.dev.Reconfigure(ctx, w.index, device.Reconfig{BackendID: w.backend, Sockets: n.files})
	if err != nil {
		closeAll(handles)
		w.emit(device.Event{Kind: device.EventReconfigureFailed, Attempt: attempt, Err: err})
		if errors.Is(err, device.ErrBackendMismatch) || errors.Is(err, device.ErrNotFound) {
			w.setHealth(false, "device gone or taken over: "+err.Error())
			return 0, fmt.Errorf("%w: %w", errStop, err)
		}
		return 0, err
	}
	// Our descriptors go now: what the kernel did not take is freed.
	for _, f := range n.files {
		f.Close()
	}
	n.files = nil
	if !w.a.diag(ids[0]) {
		return w.blind(ids, n, handles, probe), nil
	}
	var taken []*kconn
	var drop []*kconn
	if byRelease {
		released := 0
		for _, c := range dead {
			if c.handle != nil {
				c.handle.Close()
				c.handle = nil
			}
			if st, err := diagLookup(c.id); err == nil && !st.held {
				released++
				drop = append(drop, c)
			}
		}
		for i, h := range handles {
			if i < released {
				taken = append(taken, &kconn{id: ids[i], handle: h, relay: n.takeRelay(i), tls: n.tlsOf(i)})
			} else {
				h.Close()
			}
		}
	} else {
		for i, id := range ids {
			st, err := diagLookup(id)
			if err != nil {
				return 0, fmt.Errorf("asking the kernel which sockets it took: %w", err)
			}
			if st.held {
				taken = append(taken, &kconn{id: id, relay: n.takeRelay(i), tls: n.tlsOf(i)})
			}
		}
		drop = dead[:min(len(taken), len(dead))]
	}
	w.mu.Lock()
	w.conns = slices.DeleteFunc(w.conns, func(c *kconn) bool {
		if slices.Contains(drop, c) {
			c.release()
			return true
		}
		return false
	})
	w.conns = append(w.conns, taken...)
	if !w.flagsKnown && len(taken) > 0 {
		w.flags, w.flagsKnown = uint16(n.info.Flags), true
	}
	if len(taken) > 0 {
		w.tls, w.tlsFallback = summarizeTLS(tlsOfConns(w.conns))
	}
	w.mu.Unlock()
	if len(taken) > 0 {
		w.reportRelay(n)
	}
	if len(taken) == 0 && !probe {
		return 0, fmt.Errorf("the kernel took none of %d sockets (its connections were not yet marked dead)", len(ids))
	}
	return len(taken), nil
}

// reportRelay records the volume's TLS mode after n's connections (which
// the kernel took) were handed over, and tells OnEvent when any of them
// goes through the relay although the volume allows kernel TLS (tls=auto
// fell back).
func (w *watch) reportRelay(n *negotiated) {
	w.mu.Lock()
	mode, reason := w.tls, w.tlsFallback
	w.mu.Unlock()
	w.a.recordTLSMode(w.spec.VolumeID, mode, reason)
	if m, why := summarizeTLS(n.tls); m != driver.TLSKernel && why != "" {
		w.emit(device.Event{Kind: device.EventTLSRelay, Err: errors.New(why)})
	}
}

// blind ends an attempt when sock_diag cannot say what the kernel took:
// nothing is recorded (the device's connections become unknown, so online
// resize is refused) and every descriptor is closed. A relay the kernel
// did not take ends by itself (its socket pair is freed), one it took
// keeps serving. It reports one socket taken for a replacement of a dead
// connection (the kernel had a dead slot), none for a probe.
func (w *watch) blind(ids []sockID, n *negotiated, handles []*os.File, probe bool) int {
	closeAll(handles)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.complete = false
	w.conns = slices.DeleteFunc(w.conns, func(c *kconn) bool {
		if c.relay != nil && !c.relay.ended() {
			return false
		}
		c.release()
		return true
	})
	// What is known: the relays still serving, and this attempt's.
	known := append(tlsOfConns(w.conns), n.tls...)
	for i, id := range ids {
		if r := n.takeRelay(i); r != nil {
			w.conns = append(w.conns, &kconn{id: id, relay: r, tls: n.tlsOf(i)})
		}
	}
	if !w.flagsKnown {
		w.flags, w.flagsKnown = uint16(n.info.Flags), true
	}
	w.tls, w.tlsFallback = summarizeTLS(known)
	if probe {
		return 0
	}
	return 1
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// adopt resumes a device attached by an earlier process: it offers the
// kernel connections (one at a time, each kept only if the kernel took it
// into a dead slot) until the kernel takes no more. The first successful
// dial also learns the export's flags. While the server does not answer it
// keeps trying; it returns false when supervision must end.
func (w *watch) adopt(ctx context.Context) bool {
	delay := 500 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := w.fill(ctx, attempt)
		if err == nil {
			w.mu.Lock()
			w.adopting, w.healthy, w.condition = false, true, ""
			w.mu.Unlock()
			return true
		}
		if ctx.Err() != nil || errors.Is(err, errStop) {
			return false
		}
		w.setHealth(false, "adopted after a plugin restart; reconnecting to the NBD server: "+err.Error())
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		delay = min(2*delay, 5*time.Second)
		if bits, _ := w.sub.take(); bits&sigGone != 0 {
			w.gone()
			return false
		}
	}
}

// fill offers connections until the kernel takes none (or as many as the
// volume may have).
func (w *watch) fill(ctx context.Context, attempt int) error {
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for i := 0; i < max(1, w.spec.Connections); i++ {
		taken, err := w.attempt(dctx, attempt, nil, true)
		if err != nil {
			return err
		}
		if taken > 0 {
			w.emit(device.Event{Kind: device.EventReconnected, Attempt: attempt})
		}
		if taken == 0 {
			break
		}
	}
	return nil
}
