// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"io"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// readChunk reads one structured reply chunk (the magic already consumed)
// and applies it to its request. Every length is checked against the
// request before anything is allocated or read.
func (t *transmitter) readChunk() error {
	var h [16]byte
	if _, err := io.ReadFull(t.conn, h[:]); err != nil {
		return err
	}
	flags, typ := be.Uint16(h[0:]), be.Uint16(h[2:])
	cookie, n := be.Uint64(h[4:]), be.Uint32(h[12:])
	r, err := t.lookup(cookie)
	if err != nil {
		return err
	}
	done := flags&nbdproto.ReplyFlagDone != 0

	switch typ {
	case nbdproto.ReplyTypeNone:
		if n != 0 || !done {
			return protocolErrorf("NBD_REPLY_TYPE_NONE with length %d and done=%v", n, done)
		}
	case nbdproto.ReplyTypeOffsetData:
		if r.cmd != nbdproto.CmdRead {
			return protocolErrorf("data chunk in the reply to %s", CommandName(r.cmd))
		}
		if n < 9 {
			return protocolErrorf("data chunk of %d bytes", n)
		}
		var o [8]byte
		if _, err := io.ReadFull(t.conn, o[:]); err != nil {
			return err
		}
		at, err := r.span(be.Uint64(o[:]), uint64(n-8))
		if err != nil {
			return err
		}
		if err := r.fill(t.conn, at, int(n-8)); err != nil {
			return err
		}
	case nbdproto.ReplyTypeOffsetHole:
		if r.cmd != nbdproto.CmdRead {
			return protocolErrorf("hole chunk in the reply to %s", CommandName(r.cmd))
		}
		if n != 12 {
			return protocolErrorf("hole chunk of %d bytes, want 12", n)
		}
		var p [12]byte
		if _, err := io.ReadFull(t.conn, p[:]); err != nil {
			return err
		}
		size := uint64(be.Uint32(p[8:]))
		if size == 0 {
			return protocolErrorf("hole chunk of size 0")
		}
		at, err := r.span(be.Uint64(p[:]), size)
		if err != nil {
			return err
		}
		r.zero(at, size)
	case nbdproto.ReplyTypeBlockStatus:
		if err := t.readExtents(r, n); err != nil {
			return err
		}
	case nbdproto.ReplyTypeError, nbdproto.ReplyTypeErrorOffset:
		if err := t.readError(r, typ, n); err != nil {
			return err
		}
	default:
		if typ&(1<<15) == 0 {
			return protocolErrorf("unknown structured reply chunk type %d", typ)
		}
		// An unknown error type still carries errno and message first.
		if err := t.readError(r, typ, n); err != nil {
			return err
		}
	}
	if done {
		err := r.err
		if err == nil && r.cmd == nbdproto.CmdRead && r.covered != uint64(r.length) {
			return protocolErrorf("read reply covered %d of %d bytes", r.covered, r.length)
		}
		if err == nil && r.cmd == nbdproto.CmdBlockStatus && len(r.extents) == 0 {
			return protocolErrorf("block status reply without extents")
		}
		t.finish(cookie, r, err)
	}
	return nil
}

// span checks that [off, off+n) lies within the request and has not been
// covered already (chunks must not overlap; coverage is counted), and
// returns its position in the buffer.
func (r *request) span(off, n uint64) (uint64, error) {
	if off < r.off || n > uint64(r.length) || off-r.off > uint64(r.length)-n {
		return 0, protocolErrorf("chunk [%d, +%d) outside the request [%d, +%d)", off, n, r.off, r.length)
	}
	r.covered += n
	if r.covered > uint64(r.length) {
		return 0, protocolErrorf("read reply chunks overlap")
	}
	return off - r.off, nil
}

func (t *transmitter) readExtents(r *request, n uint32) error {
	if r.cmd != nbdproto.CmdBlockStatus {
		return protocolErrorf("block status chunk in the reply to %s", CommandName(r.cmd))
	}
	// Each extent covers at least one byte of the request, so there can
	// be no more extents than requested bytes.
	if n < 12 || (n-4)%8 != 0 || (n-4)/8 > min(maxExtents, r.length) {
		return protocolErrorf("block status chunk of %d bytes for a request of %d", n, r.length)
	}
	if len(r.extents) > 0 {
		return protocolErrorf("second block status chunk for the same context")
	}
	var id [4]byte
	if _, err := io.ReadFull(t.conn, id[:]); err != nil {
		return err
	}
	if got := be.Uint32(id[:]); got != r.ctxID {
		return protocolErrorf("block status for context %d, want %d", got, r.ctxID)
	}
	b := make([]byte, n-4)
	if _, err := io.ReadFull(t.conn, b); err != nil {
		return err
	}
	ext := make([]Extent, 0, len(b)/8)
	for i := 0; i < len(b); i += 8 {
		e := Extent{Length: be.Uint32(b[i:]), Flags: be.Uint32(b[i+4:])}
		if e.Length == 0 {
			return protocolErrorf("block status extent of length 0")
		}
		ext = append(ext, e)
	}
	r.extents = ext
	return nil
}

func (t *transmitter) readError(r *request, typ uint16, n uint32) error {
	if n < 6 || n > maxErrorChunk {
		return protocolErrorf("error chunk of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(t.conn, b); err != nil {
		return err
	}
	errno, mlen := be.Uint32(b), uint32(be.Uint16(b[4:]))
	if errno == 0 {
		return protocolErrorf("error chunk with error value 0")
	}
	if mlen > n-6 {
		return protocolErrorf("error message of %d bytes in a chunk of %d", mlen, n)
	}
	msg, err := checkString("error message", b[6:6+mlen])
	if err != nil {
		return err
	}
	ce := &CommandError{Command: r.cmd, Errno: errno, Message: msg}
	rest := b[6+mlen:]
	if typ == nbdproto.ReplyTypeErrorOffset {
		if len(rest) != 8 {
			return protocolErrorf("error-offset chunk has %d bytes after the message, want 8", len(rest))
		}
		ce.Offset, ce.HasOffset = be.Uint64(rest), true
		if ce.Offset < r.off || ce.Offset-r.off >= uint64(r.length) {
			return protocolErrorf("error offset %d outside the request [%d, +%d)", ce.Offset, r.off, r.length)
		}
	} else if typ == nbdproto.ReplyTypeError && len(rest) != 0 {
		return protocolErrorf("error chunk has %d bytes after the message", len(rest))
	}
	if r.err == nil {
		r.err = ce
	}
	return nil
}
