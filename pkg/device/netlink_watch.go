// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/genetlink"
)

// AnyIndex is sent on a WatchLinkDead channel when notifications may have
// been lost (the socket overran, or had to be reopened): every device
// should then be checked as if its link had died. No real device has this
// index.
const AnyIndex uint32 = 0xFFFFFFFF

// WatchLinkDead subscribes to the nbd_mc_group multicast group on a
// connection of its own and delivers the index of every device whose
// connection the kernel marked dead (NBD_CMD_LINK_DEAD: a send or receive
// failed, or a request timed out, while no disconnect was requested). The
// channel is closed when ctx ends.
//
// The kernel multicasts in the initial network namespace only, so the
// watcher must run there (hostNetwork: true).
func (n *Netlink) WatchLinkDead(ctx context.Context) (<-chan uint32, error) {
	if n.group == 0 {
		return nil, fmt.Errorf("%w: the kernel's nbd family has no %q multicast group", ErrNotSupported, genlMcastGroup)
	}
	conn, err := n.dialGroup(n.group)
	if err != nil {
		return nil, fmt.Errorf("join %s: %w", genlMcastGroup, err)
	}
	w := &watcher{conn: conn, dial: func() (*genetlink.Conn, error) { return n.dialGroup(n.group) }, ch: make(chan uint32, 64)}
	stop := context.AfterFunc(ctx, w.close)
	go func() {
		defer stop()
		defer close(w.ch)
		defer w.close()
		w.run(ctx)
	}()
	return w.ch, nil
}

type watcher struct {
	mu     sync.Mutex
	conn   *genetlink.Conn
	closed bool
	dial   func() (*genetlink.Conn, error)
	ch     chan uint32
}

func (w *watcher) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.closed = true
		_ = w.conn.Close() // interrupts a blocked Receive
	}
}

// current returns the connection, or nil once closed.
func (w *watcher) current() *genetlink.Conn {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	return w.conn
}

// replace swaps in a new connection; false (and c closed) once closed.
func (w *watcher) replace(c *genetlink.Conn) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		_ = c.Close()
		return false
	}
	_ = w.conn.Close()
	w.conn = c
	return true
}

func (w *watcher) send(ctx context.Context, index uint32) bool {
	select {
	case w.ch <- index:
		return true
	case <-ctx.Done():
		return false
	}
}

func (w *watcher) run(ctx context.Context) {
	for {
		conn := w.current()
		if conn == nil {
			return
		}
		msgs, _, err := conn.Receive()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			// ENOBUFS: the kernel dropped notifications, the socket is
			// still fine. Anything else: reopen it.
			if !errors.Is(err, syscall.ENOBUFS) && !w.reopen(ctx) {
				return
			}
			if !w.send(ctx, AnyIndex) {
				return
			}
			continue
		}
		for _, m := range msgs {
			if m.Header.Command != cmdLinkDead {
				continue
			}
			index, err := parseIndex([]genetlink.Message{m})
			if err != nil {
				index = AnyIndex
			}
			if !w.send(ctx, index) {
				return
			}
		}
	}
}

// reopen dials a new subscription with backoff until it works or ctx ends.
func (w *watcher) reopen(ctx context.Context) bool {
	delay := 50 * time.Millisecond
	for {
		c, err := w.dial()
		if err == nil {
			return w.replace(c)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
}
