// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"context"
	"sync"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/device"
)

// signal bits delivered to a supervised volume.
const (
	sigLinkDead = 1 << iota // LINK_DEAD for the volume's device
	sigLost                 // notifications may have been lost (AnyIndex)
	sigTick                 // periodic check
	sigGone                 // STATUS no longer shows the device connected
	sigStatusFailed
)

// hub is the node's one LINK_DEAD listener and one STATUS sweep; it
// dispatches to the supervised volumes by device index, so supervision
// costs one multicast socket and one STATUS call per interval whatever the
// number of volumes.
type hub struct {
	rc       device.Reconnector // nil: STATUS and ticks only
	status   func(context.Context) ([]device.Status, error)
	interval time.Duration

	mu      sync.Mutex
	subs    map[*sub]struct{}
	started bool
	ctx     context.Context
}

// sub is one volume's subscription.
type sub struct {
	h     *hub
	index uint32
	ch    chan struct{} // wake-up, buffered 1
	mu    sync.Mutex
	bits  int
	err   error // last STATUS error
}

func newHub(ctx context.Context, rc device.Reconnector, status func(context.Context) ([]device.Status, error), interval time.Duration) *hub {
	if interval <= 0 {
		interval = 10 * time.Second
	}
	return &hub{rc: rc, status: status, interval: interval, subs: map[*sub]struct{}{}, ctx: ctx}
}

// subscribe registers a volume's device; the hub starts with the first.
func (h *hub) subscribe(index uint32) *sub {
	s := &sub{h: h, index: index, ch: make(chan struct{}, 1)}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	if !h.started {
		h.started = true
		go h.run(h.ctx)
	}
	h.mu.Unlock()
	return s
}

func (s *sub) close() {
	s.h.mu.Lock()
	delete(s.h.subs, s)
	s.h.mu.Unlock()
}

func (s *sub) signal(bits int, err error) {
	s.mu.Lock()
	s.bits |= bits
	if err != nil {
		s.err = err
	}
	s.mu.Unlock()
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// take returns and clears the pending signals.
func (s *sub) take() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.bits, s.err
	s.bits, s.err = 0, nil
	return b, err
}

func (h *hub) each(f func(*sub)) {
	h.mu.Lock()
	subs := make([]*sub, 0, len(h.subs))
	for s := range h.subs {
		subs = append(subs, s)
	}
	h.mu.Unlock()
	for _, s := range subs {
		f(s)
	}
}

func (h *hub) run(ctx context.Context) {
	var events <-chan uint32
	retry := time.NewTimer(0)
	defer retry.Stop()
	tick := time.NewTicker(h.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-retry.C:
			if h.rc == nil {
				continue
			}
			ch, err := h.rc.WatchLinkDead(ctx)
			if err != nil {
				// Without notifications the sweep alone notices deaths.
				retry.Reset(h.interval)
				continue
			}
			events = ch
			// Deaths while no one listened are not lost for good: look.
			h.each(func(s *sub) { s.signal(sigLost, nil) })
		case index, ok := <-events:
			if !ok {
				events = nil
				retry.Reset(time.Second)
				continue
			}
			if index == device.AnyIndex {
				h.each(func(s *sub) { s.signal(sigLost, nil) })
				continue
			}
			h.each(func(s *sub) {
				if s.index == index {
					s.signal(sigLinkDead, nil)
				}
			})
		case <-tick.C:
			h.sweep(ctx)
		}
	}
}

// sweep is the periodic check: one STATUS for every device.
func (h *hub) sweep(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, h.interval)
	defer cancel()
	st, err := h.status(sctx)
	if err != nil {
		h.each(func(s *sub) { s.signal(sigStatusFailed, err) })
		return
	}
	connected := map[uint32]bool{}
	for _, x := range st {
		connected[x.Index] = x.Connected
	}
	h.each(func(s *sub) {
		if connected[s.index] {
			s.signal(sigTick, nil)
		} else {
			s.signal(sigGone, nil)
		}
	})
}
