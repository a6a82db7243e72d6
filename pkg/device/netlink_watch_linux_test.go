// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
)

// mcastFake serves multicast receives: each Receive gets the next item,
// a LINK_DEAD message for an index or an error.
type mcastFake struct {
	items chan any // uint32, genetlink.Message or error
	stop  chan struct{}
	dials atomic.Int32
	group atomic.Uint32
}

func newMcastFake(t *testing.T) *mcastFake {
	m := &mcastFake{items: make(chan any, 16), stop: make(chan struct{})}
	t.Cleanup(func() { close(m.stop) })
	return m
}

func (m *mcastFake) dial(group uint32) (*genetlink.Conn, error) {
	m.dials.Add(1)
	m.group.Store(group)
	return genltest.Dial(func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		if nreq.Header.Length != 0 {
			return nil, errors.New("the watch connection must not send requests")
		}
		select {
		case it := <-m.items:
			switch v := it.(type) {
			case uint32:
				return []genetlink.Message{linkDeadMsg(v)}, nil
			case genetlink.Message:
				return []genetlink.Message{v}, nil
			case error:
				return nil, v
			}
		case <-m.stop:
		}
		return nil, errors.New("test over")
	}), nil
}

func linkDeadMsg(index uint32) genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	b, _ := ae.Encode()
	return genetlink.Message{Header: genetlink.Header{Command: cmdLinkDead, Version: 1}, Data: b}
}

func recvIndex(t *testing.T, ch <-chan uint32) uint32 {
	t.Helper()
	select {
	case i, ok := <-ch:
		if !ok {
			t.Fatal("channel closed")
		}
		return i
	case <-time.After(5 * time.Second):
		t.Fatal("no notification")
	}
	return 0
}

func TestWatchLinkDead(t *testing.T) {
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	m := newMcastFake(t)
	n, err := newNetlinkConn(k.dial(), m.dial, tree.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := n.WatchLinkDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g := m.group.Load(); g != 9 {
		t.Errorf("joined group %d, want nbd_mc_group (9)", g)
	}
	m.items <- uint32(3)
	// Other commands on the group are ignored.
	m.items <- genetlink.Message{Header: genetlink.Header{Command: cmdStatus, Version: 1}}
	m.items <- uint32(0)
	// Overrun: notifications were lost, the socket is still good.
	m.items <- error(os.NewSyscallError("recvmsg", syscall.ENOBUFS))
	m.items <- uint32(5)
	// Another failure: the subscription is reopened.
	m.items <- error(os.NewSyscallError("recvmsg", syscall.EBADF))
	m.items <- uint32(6)

	var got []uint32
	for range 6 {
		got = append(got, recvIndex(t, ch))
	}
	want := []uint32{3, 0, AnyIndex, 5, AnyIndex, 6}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("indexes (-want +got):\n%s", diff)
	}
	if d := m.dials.Load(); d != 2 {
		t.Errorf("%d dials, want 2 (initial and after the failure)", d)
	}
	cancel()
	m.items <- uint32(7) // unblock the pending receive
	for range ch {
	}
}

func TestWatchLinkDeadNoGroup(t *testing.T) {
	tree := newFakeTree(t)
	fam := testFamily
	fam.Groups = nil
	conn := genltest.Dial(genltest.ServeFamily(fam, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, nil
	}))
	n, err := newNetlinkConn(conn, nil, tree.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if _, err := n.WatchLinkDead(context.Background()); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("got %v, want ErrNotSupported", err)
	}
}
