// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"net"

	"golang.org/x/sys/unix"
)

// quickAck asks the kernel to acknowledge the next TCP segment at once.
// Without it, a server that writes a reply in two pieces (header, payload)
// waits for our delayed ACK under Nagle: 40 ms per option reply with
// qemu-nbd and nbd-server. Linux clears the flag again, so it is set before
// every read.
func (s *session) quickAck() {
	tc, ok := s.raw.(*net.TCPConn)
	if !ok {
		return
	}
	if rc, err := tc.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_QUICKACK, 1)
		})
	}
}
