// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// relay carries NBD between the kernel and a TLS session, the fallback
// where the session cannot move into the kernel's TLS layer (see
// negotiated.addTLS): the kernel gets one end of a unix socket pair and
// this process encrypts: kernel ↔ pair ↔ relay ↔ TLS ↔ server.
// The relay lives as long as this process; when it dies the kernel sees a
// dead connection and a reconnect (by the next process) supplies a new pair.
type relay struct {
	kernel *os.File // the end handed to the kernel
	local  net.Conn // our end
	remote net.Conn // the TLS session
	done   chan struct{}
	once   sync.Once
}

// newRelay creates the socket pair and starts copying between it and remote.
func newRelay(remote net.Conn) (*relay, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	kernel := os.NewFile(uintptr(fds[0]), "nbd-relay-kernel")
	mine := os.NewFile(uintptr(fds[1]), "nbd-relay-local")
	local, err := net.FileConn(mine)
	mine.Close() // FileConn duplicated it
	if err != nil {
		kernel.Close()
		return nil, fmt.Errorf("relay socket: %w", err)
	}
	r := &relay{kernel: kernel, local: local, remote: remote, done: make(chan struct{})}
	go r.pump(remote, local)
	go r.pump(local, remote)
	return r, nil
}

// pump copies one direction; the first direction to end closes both.
func (r *relay) pump(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	r.close()
}

// ended reports whether the relay has closed.
func (r *relay) ended() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// close ends the relay; the kernel then sees its connection die.
func (r *relay) close() {
	r.once.Do(func() {
		r.local.Close()
		r.remote.Close()
		close(r.done)
	})
}

// Done is closed when the relay has ended.
func (r *relay) Done() <-chan struct{} { return r.done }
