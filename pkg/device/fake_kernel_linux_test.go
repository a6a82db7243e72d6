// SPDX-License-Identifier: Apache-2.0

package device

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
)

var testFamily = genetlink.Family{
	ID:      0x1c,
	Version: 1,
	Name:    "nbd",
	Groups:  []genetlink.MulticastGroup{{ID: 9, Name: "nbd_mc_group"}},
}

// nlReq is a decoded nbd generic netlink request, compared with cmp.Diff.
// It is decoded independently of the package's encoders.
type nlReq struct {
	Cmd         uint8
	Ack         bool
	Index       *uint32
	Size        *uint64
	BlockSize   *uint64
	Timeout     *uint64
	DeadConn    *uint64
	ServerFlags *uint64
	ClientFlags *uint64
	Sockets     []uint32
	Backend     *string
}

func ptr[T any](v T) *T { return &v }

func decodeReq(greq genetlink.Message, nreq netlink.Message) (nlReq, error) {
	r := nlReq{Cmd: greq.Header.Command, Ack: nreq.Header.Flags&netlink.Acknowledge != 0}
	if greq.Header.Version != 1 {
		return r, fmt.Errorf("genl version %d, want 1", greq.Header.Version)
	}
	if nreq.Header.Flags&netlink.Request == 0 {
		return r, errors.New("request flag missing")
	}
	ad, err := netlink.NewAttributeDecoder(greq.Data)
	if err != nil {
		return r, err
	}
	for ad.Next() {
		switch ad.Type() {
		case 1:
			r.Index = ptr(ad.Uint32())
		case 2:
			r.Size = ptr(ad.Uint64())
		case 3:
			r.BlockSize = ptr(ad.Uint64())
		case 4:
			r.Timeout = ptr(ad.Uint64())
		case 5:
			r.ServerFlags = ptr(ad.Uint64())
		case 6:
			r.ClientFlags = ptr(ad.Uint64())
		case 7:
			if ad.TypeFlags()&netlink.Nested == 0 {
				return r, errors.New("SOCKETS not flagged nested")
			}
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					if nad.Type() != 1 {
						return fmt.Errorf("socket list item type %d", nad.Type())
					}
					nad.Nested(func(iad *netlink.AttributeDecoder) error {
						for iad.Next() {
							if iad.Type() != 1 {
								return fmt.Errorf("socket item attribute %d", iad.Type())
							}
							r.Sockets = append(r.Sockets, iad.Uint32())
						}
						return nil
					})
				}
				return nil
			})
		case 8:
			r.DeadConn = ptr(ad.Uint64())
		case 10:
			r.Backend = ptr(ad.String())
		default:
			return r, fmt.Errorf("unexpected attribute %d", ad.Type())
		}
	}
	return r, ad.Err()
}

// fakeKernel is a stateful fake of the nbd generic netlink family over a
// fakeTree. It enforces the kernel's reply rules: CONNECT and STATUS reply
// and must not ask for an ACK (the ACK trap), DISCONNECT and RECONFIGURE
// reply nothing and must ask for one.
type fakeKernel struct {
	t    *testing.T
	tree *fakeTree

	mu   sync.Mutex
	reqs []nlReq
	// errno to fail the next command of a kind with.
	fail map[uint8]int
	// noBackendFile simulates a kernel older than 5.14.
	noBackendFile bool
	// holdOpen keeps the pid file after DISCONNECT (a mount holds it).
	holdOpen bool
	pid      int
}

func newFakeKernel(t *testing.T, tree *fakeTree) *fakeKernel {
	return &fakeKernel{t: t, tree: tree, fail: map[uint8]int{}, pid: 4242}
}

// dial returns a genetlink connection served by the fake.
func (k *fakeKernel) dial() *genetlink.Conn {
	return genltest.Dial(genltest.ServeFamily(testFamily,
		genltest.CheckRequest(testFamily.ID, 0, 0, k.serve)))
}

func (k *fakeKernel) netlink(opts Options) *Netlink {
	k.t.Helper()
	n, err := newNetlinkConn(k.dial(), func(uint32) (*genetlink.Conn, error) {
		return nil, errors.New("no multicast in this fake")
	}, opts)
	if err != nil {
		k.t.Fatal(err)
	}
	k.t.Cleanup(func() { _ = n.Close() })
	return n
}

func (k *fakeKernel) requests() []nlReq {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]nlReq(nil), k.reqs...)
}

func (k *fakeKernel) serve(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	r, err := decodeReq(greq, nreq)
	if err != nil {
		k.t.Errorf("bad request: %v", err)
		return nil, genltest.Error(int(syscall.EINVAL))
	}
	k.reqs = append(k.reqs, r)
	wantAck := r.Cmd == cmdDisconnect || r.Cmd == cmdReconfigure
	if r.Ack != wantAck {
		k.t.Errorf("command %d: Acknowledge=%v, want %v", r.Cmd, r.Ack, wantAck)
	}
	if e := k.fail[r.Cmd]; e != 0 {
		delete(k.fail, r.Cmd)
		return nil, genltest.Error(e)
	}
	switch r.Cmd {
	case cmdConnect:
		return k.connect(r)
	case cmdDisconnect:
		if r.Index == nil {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if !k.tree.exists(*r.Index) {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if !k.holdOpen {
			k.tree.stop(*r.Index)
		}
		return nil, genltest.Error(0) // the ACK
	case cmdReconfigure:
		if r.Index == nil || !k.tree.started(*r.Index) {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if b, ok, _ := (sysfs{root: k.tree.sys}).backend(*r.Index); ok && (r.Backend == nil || *r.Backend != b) {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if r.Size != nil {
			k.tree.setSize(*r.Index, *r.Size)
		}
		return nil, genltest.Error(0)
	case cmdStatus:
		return k.status()
	}
	return nil, genltest.Error(int(syscall.EOPNOTSUPP))
}

func (k *fakeKernel) connect(r nlReq) ([]genetlink.Message, error) {
	if r.Size == nil || len(r.Sockets) == 0 {
		return nil, genltest.Error(int(syscall.EINVAL))
	}
	var index uint32
	if r.Index != nil {
		index = *r.Index
		if k.tree.started(index) {
			return nil, genltest.Error(int(syscall.EBUSY))
		}
	} else {
		for k.tree.started(index) {
			index++
		}
	}
	bs := uint64(1024)
	if r.BlockSize != nil {
		bs = *r.BlockSize
	}
	backend := ""
	if r.Backend != nil && !k.noBackendFile {
		backend = *r.Backend
	}
	ro := r.ServerFlags != nil && *r.ServerFlags&uint64(flagReadOnly) != 0
	k.tree.start(index, k.pid, *r.Size, bs, backend, ro)
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(1, index)
	b, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	return []genetlink.Message{{Header: genetlink.Header{Command: cmdConnect, Version: 1}, Data: b}}, nil
}

func (k *fakeKernel) status() ([]genetlink.Message, error) {
	idx, err := (sysfs{root: k.tree.sys}).indexes()
	if err != nil {
		return nil, err
	}
	ae := netlink.NewAttributeEncoder()
	ae.Nested(9, func(lae *netlink.AttributeEncoder) error {
		for _, i := range idx {
			lae.Nested(1, func(iae *netlink.AttributeEncoder) error {
				iae.Uint32(1, i)
				c := uint8(0)
				if k.tree.started(i) {
					c = 1
				}
				iae.Uint8(2, c)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	return []genetlink.Message{{Header: genetlink.Header{Command: cmdStatus, Version: 1}, Data: b}}, nil
}

func (f *fakeTree) exists(i uint32) bool { return sysfs{root: f.sys}.exists(i) }
