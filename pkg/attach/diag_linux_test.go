// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDiagHeld: sock_diag tells a socket some other holder keeps (here a
// second descriptor, standing in for the kernel's reference) from one
// whose last descriptor was closed — for unix and TCP sockets.
func TestDiagHeld(t *testing.T) {
	t.Run("unix", func(t *testing.T) {
		a, _ := socketPair(t)
		id, err := identify(a)
		if err != nil {
			t.Fatal(err)
		}
		holder, err := unix.Dup(int(a.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		a.Close()
		if st, err := diagLookup(id); err != nil || !st.held || !st.live {
			t.Fatalf("held socket: %+v, %v", st, err)
		}
		// What the nbd driver does to a connection it declares dead.
		if err := unix.Shutdown(holder, unix.SHUT_RDWR); err != nil {
			t.Fatal(err)
		}
		if st, err := diagLookup(id); err != nil || !st.held || st.live {
			t.Fatalf("shut down socket: %+v, %v", st, err)
		}
		unix.Close(holder)
		if st, err := diagLookup(id); err != nil || st.held {
			t.Fatalf("closed socket: %+v, %v", st, err)
		}
	})
	t.Run("tcp", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			c, err := l.Accept()
			if err == nil {
				defer c.Close()
				b := make([]byte, 1)
				c.Read(b)
			}
		}()
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		f, err := c.(*net.TCPConn).File()
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, err := identify(f)
		if err != nil {
			t.Fatal(err)
		}
		holder, err := unix.Dup(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		st, err := diagLookup(id)
		if err != nil || !st.held || !st.live {
			t.Fatalf("held socket: %+v, %v", st, err)
		}
		hf := os.NewFile(uintptr(holder), "holder")
		hf.Close()
		if st, err := diagLookup(id); err != nil || st.held {
			t.Fatalf("closed socket: %+v, %v", st, err)
		}
	})
}
