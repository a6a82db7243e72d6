// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func socketPair(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestPruneDead: the duplicates the attacher keeps of the kernel's sockets
// are let go once their connection has ended — the peer closed it, or the
// kernel shut it down (through its own descriptor of the same socket) —
// and live ones stay, so reconnects do not pile up open sockets.
func TestPruneDead(t *testing.T) {
	live, _ := socketPair(t) // its peer stays open until cleanup
	closed, closedPeer := socketPair(t)
	shut, _ := socketPair(t)
	busy, busyPeer := socketPair(t)
	closedPeer.Close()
	// What the kernel does to a connection it gives up on: shutdown of
	// the socket, here through a second descriptor as the kernel has one.
	kernelFD, err := unix.Dup(int(shut.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Shutdown(kernelFD, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	unix.Close(kernelFD)
	// Unread data is not an ended connection.
	if _, err := busyPeer.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	got := pruneDead([]*os.File{live, closed, shut, busy})
	if len(got) != 2 || got[0] != live || got[1] != busy {
		t.Fatalf("kept %v, want the live and the busy socket", got)
	}
	for name, f := range map[string]*os.File{"closed": closed, "shut": shut} {
		if _, err := f.Stat(); err == nil {
			t.Errorf("the %s socket was dropped but not closed", name)
		}
	}
}
