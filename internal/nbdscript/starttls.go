// SPDX-License-Identifier: Apache-2.0

package nbdscript

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
)

const optStartTLS = 5

// AcceptStartTLS is the server half of a STARTTLS-terminating proxy on c:
// it greets (fixed newstyle, no zeroes), reads the client's flags and an
// NBD_OPT_STARTTLS with no data, acknowledges it and completes the TLS
// handshake with cfg; then it dials backend, a plaintext NBD server's unix
// socket, reads its greeting and sends it the client's flags. The caller
// joins tc and b (the rest of the handshake and transmission pass through)
// and closes both.
func AcceptStartTLS(c net.Conn, cfg *tls.Config, backend string) (tc *tls.Conn, b net.Conn, err error) {
	greet := make([]byte, 18)
	binary.BigEndian.PutUint64(greet, magicInit)
	binary.BigEndian.PutUint64(greet[8:], magicOpt)
	binary.BigEndian.PutUint16(greet[16:], flagFixed|flagNoZeroes)
	if _, err := c.Write(greet); err != nil {
		return nil, nil, err
	}
	flags, opt := make([]byte, 4), make([]byte, 16)
	if _, err := io.ReadFull(c, flags); err != nil {
		return nil, nil, err
	}
	if _, err := io.ReadFull(c, opt); err != nil {
		return nil, nil, err
	}
	if binary.BigEndian.Uint32(opt[8:]) != optStartTLS || binary.BigEndian.Uint32(opt[12:]) != 0 {
		return nil, nil, errors.New("nbdscript: the client's first option is not a bare NBD_OPT_STARTTLS")
	}
	ack := make([]byte, 20)
	binary.BigEndian.PutUint64(ack, magicRep)
	binary.BigEndian.PutUint32(ack[8:], optStartTLS)
	binary.BigEndian.PutUint32(ack[12:], repAck)
	if _, err := c.Write(ack); err != nil {
		return nil, nil, err
	}
	tc = tls.Server(c, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, nil, err
	}
	b, err = net.Dial("unix", backend)
	if err != nil {
		return nil, nil, err
	}
	if _, err := io.ReadFull(b, make([]byte, 18)); err != nil {
		b.Close()
		return nil, nil, err
	}
	if _, err := b.Write(flags); err != nil {
		b.Close()
		return nil, nil, err
	}
	return tc, b, nil
}
