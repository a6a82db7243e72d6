// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"net"

	"github.com/nbd-csi/nbd-csi/pkg/ktls"
)

// Profile selects what the handshake negotiates, which decides who can
// drive the transmission phase afterwards.
type Profile int

const (
	// ProfileKernel negotiates only what the Linux nbd driver understands:
	// no structured replies, no extended headers, no metadata contexts. The
	// handshake consumes every byte the server sends, so the socket can be
	// handed to the kernel (Conn.File) at the first transmission byte.
	ProfileKernel Profile = iota
	// ProfileUserspace negotiates structured replies and the
	// base:allocation metadata context when the server offers them, and
	// drives transmission in this process (Conn.Read, Conn.Write, …).
	ProfileUserspace
)

// String returns "kernel" or "userspace".
func (p Profile) String() string {
	if p == ProfileUserspace {
		return "userspace"
	}
	return "kernel"
}

// Conn is a negotiated NBD connection in the transmission phase.
//
// With ProfileKernel the caller hands the socket to the kernel with File and
// then closes the Conn; with ProfileUserspace the caller issues requests
// with Read, Write, Flush, … which are safe for concurrent use and may be in
// flight together.
type Conn struct {
	// stream is what the protocol is spoken over: the socket, or a
	// *tls.Conn wrapping it.
	stream net.Conn
	// raw is the underlying socket.
	raw net.Conn
	// info is what was negotiated.
	info ExportInfo
	// profile is the negotiation profile used.
	profile Profile
	// tx drives requests and replies for ProfileUserspace; nil otherwise.
	tx *transmitter
	// rec follows the TLS session for KernelTLS (WithKernelTLS only).
	rec *ktls.Recorder
	// kernelTLS is set once the session moved into the kernel (or half
	// did): the *tls.Conn must then never be written to or closed.
	kernelTLS bool
}

// Export returns what was negotiated for the export.
func (c *Conn) Export() ExportInfo { return c.info }

// Profile returns the negotiation profile the connection was made with.
func (c *Conn) Profile() Profile { return c.profile }
