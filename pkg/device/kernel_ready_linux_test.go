// SPDX-License-Identifier: Apache-2.0

package device

import (
	"os"
	"runtime"
	"testing"
	"time"
)

// TestKernelReadyAtConnectReply: when the kernel answers NBD_CMD_CONNECT,
// the device is already started, shows its size, has its node and its
// backend file (nbd_genl_connect starts the device before it replies). So
// Attach's readiness wait ends at its first check, without sleeping, and
// waiting for a uevent or a multicast message instead would gain nothing
// (docs/performance.md, "Node path"). Should a kernel ever reply earlier,
// this fails and the wait deserves an event source.
func TestKernelReadyAtConnectReply(t *testing.T) {
	n := kernelNetlink(t)
	srv := startNbdkit(t, "memory", "size=64M")
	ctx := ctxFor(t, time.Minute)
	for i := range 5 {
		sock, size, flags, err := srv.dial("")
		if err != nil {
			t.Fatal(err)
		}
		c, err := Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags, BackendID: "kt-ready"}.normalize(true)
		if err != nil {
			t.Fatal(err)
		}
		fds, err := socketFDs(c.Sockets)
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := n.execute(ctx, cmdConnect, false, connectAttrs(c, fds, 0))
		runtime.KeepAlive(c.Sockets)
		sock.Close()
		if err != nil {
			t.Fatal(err)
		}
		index, err := parseIndex(msgs)
		if err != nil {
			t.Fatal(err)
		}
		// The checks of waitReady, once, right after the reply.
		pid, perr := n.sys.pid(index)
		sectors, serr := n.sys.sizeSectors(index)
		node := isDevice(devicePath(n.opts.DevRoot, index))
		backend, ok, berr := n.sys.backend(index)
		if err := n.Detach(ctx, index); err != nil {
			t.Fatal(err)
		}
		if perr != nil || serr != nil || berr != nil {
			t.Fatalf("round %d: reading nbd%d: %v %v %v", i, index, perr, serr, berr)
		}
		if pid == 0 || !c.sizeShown(sectors) || !node || !ok || backend != "kt-ready" {
			t.Errorf("round %d: at the CONNECT reply nbd%d has pid %d, %d sectors (want %d), node %v, backend %q %v",
				i, index, pid, sectors, c.expectedSectors, node, backend, ok)
		}
	}
}
