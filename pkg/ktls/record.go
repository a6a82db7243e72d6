// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// TLS record layer constants (RFC 8446 §5.1, RFC 5246 §6.2).
const (
	recordHeaderLen = 5
	// maxRecordBody is the largest record body either version allows
	// (TLSCiphertext, RFC 5246 §6.2.3: 2^14 + 2048).
	maxRecordBody = 1<<14 + 2048

	typeChangeCipherSpec = 20
	typeAlert            = 21
	typeHandshake        = 22
	typeApplicationData  = 23

	handshakeClientHello = 1
	handshakeServerHello = 2
)

// errProbe is what the Recorder's reader returns while Offload checks that
// crypto/tls holds no data: a temporary timeout, which crypto/tls does not
// keep as the connection's error.
var errProbe net.Error = probeError{}

type probeError struct{}

func (probeError) Error() string   { return "ktls: drain probe" }
func (probeError) Timeout() bool   { return true }
func (probeError) Temporary() bool { return true }

// stream follows one direction of a TLS connection record by record.
type stream struct {
	hdr  [recordHeaderLen]byte
	hdrN int
	rem  int  // body bytes left in the current record
	typ  byte // type of the current record
	// records counts complete records other than ChangeCipherSpec;
	// sinceCCS counts those after the last ChangeCipherSpec record.
	// A CCS record is never protected and never has a sequence number:
	// in TLS 1.2 it starts the protected records (sinceCCS), in TLS 1.3
	// it is a compatibility no-op that may arrive at any time (RFC 8446
	// Appendix D.4), which crypto/tls skips, so it must not count.
	records, sinceCCS uint64
	// cur is the record being assembled, last the last complete one
	// other than CCS (header and body).
	cur, last []byte
	// hello is the random of the first ClientHello or ServerHello seen.
	hello    [32]byte
	helloOK  bool
	helloTyp byte
	// bad is set when the stream cannot be followed (malformed framing).
	bad error
}

// want is how many bytes may be read next without crossing a record
// boundary.
func (s *stream) want() int {
	if s.hdrN < recordHeaderLen {
		return recordHeaderLen - s.hdrN
	}
	return s.rem
}

// atBoundary reports whether the stream is between records.
func (s *stream) atBoundary() bool { return s.hdrN == 0 && s.rem == 0 }

// feed follows the bytes p. It never fails: a malformed stream is marked
// bad and no longer followed.
func (s *stream) feed(p []byte) {
	for len(p) > 0 && s.bad == nil {
		if s.hdrN < recordHeaderLen {
			k := copy(s.hdr[s.hdrN:], p)
			s.hdrN += k
			p = p[k:]
			if s.hdrN < recordHeaderLen {
				return
			}
			n := int(binary.BigEndian.Uint16(s.hdr[3:]))
			if n > maxRecordBody {
				s.bad = fmt.Errorf("record of %d bytes exceeds the maximum %d", n, maxRecordBody)
				return
			}
			if s.hdr[1] != 3 {
				s.bad = fmt.Errorf("record version %#x%02x is not TLS", s.hdr[1], s.hdr[2])
				return
			}
			s.typ, s.rem = s.hdr[0], n
			s.cur = append(s.cur[:0], s.hdr[:]...)
			if n == 0 {
				s.complete()
			}
			continue
		}
		k := min(len(p), s.rem)
		s.cur = append(s.cur, p[:k]...)
		s.rem -= k
		p = p[k:]
		if s.rem == 0 {
			s.complete()
		}
	}
}

func (s *stream) complete() {
	s.hdrN = 0
	if s.typ == typeChangeCipherSpec {
		s.sinceCCS = 0
		s.cur = s.cur[:0]
		return
	}
	s.records++
	s.sinceCCS++
	if !s.helloOK && s.typ == typeHandshake {
		// Hello: type(1) length(3) version(2) random(32); in the first
		// handshake record, which is plaintext in every version.
		body := s.cur[recordHeaderLen:]
		if len(body) >= 38 && (body[0] == handshakeClientHello || body[0] == handshakeServerHello) {
			copy(s.hello[:], body[6:38])
			s.helloOK, s.helloTyp = true, body[0]
		}
	}
	s.last, s.cur = s.cur, s.last
}

// release drops the buffers.
func (s *stream) release() {
	clear(s.cur)
	clear(s.last)
	s.cur, s.last = nil, nil
}

// Recorder is the net.Conn to give tls.Client when the session may later
// move into the kernel. Until Release it feeds crypto/tls at most one
// record at a time and follows both directions; after Release it passes
// bytes through unchanged (for a session that stays in userspace).
type Recorder struct {
	net.Conn

	rmu   sync.Mutex
	rd    stream
	probe bool

	wmu sync.Mutex
	wr  stream

	// mark is the record count of each direction when the handshake
	// completed (TLS 1.3 sequence numbers count from there).
	marked                bool
	markRead, markWritten uint64

	released atomic.Bool

	keys keyLog
}

// NewRecorder wraps c, the connection tls.Client will use.
func NewRecorder(c net.Conn) *Recorder { return &Recorder{Conn: c} }

// KeyLog returns the writer to set as tls.Config.KeyLogWriter for this
// connection only. The secrets it receives stay in memory.
func (r *Recorder) KeyLog() io.Writer { return &r.keys }

// Read reads at most to the end of the current record.
func (r *Recorder) Read(p []byte) (int, error) {
	if r.released.Load() {
		return r.Conn.Read(p)
	}
	r.rmu.Lock()
	defer r.rmu.Unlock()
	if r.probe {
		return 0, errProbe
	}
	if r.rd.bad != nil {
		return r.Conn.Read(p)
	}
	if w := r.rd.want(); len(p) > w {
		p = p[:w]
	}
	n, err := r.Conn.Read(p)
	r.rd.feed(p[:n])
	return n, err
}

// Write writes p and follows the records in it.
func (r *Recorder) Write(p []byte) (int, error) {
	if r.released.Load() {
		return r.Conn.Write(p)
	}
	r.wmu.Lock()
	defer r.wmu.Unlock()
	n, err := r.Conn.Write(p)
	r.wr.feed(p[:n])
	return n, err
}

// HandshakeDone records the record counts at the end of the handshake;
// call it right after tls.Conn.Handshake returned successfully.
func (r *Recorder) HandshakeDone() error {
	r.rmu.Lock()
	defer r.rmu.Unlock()
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if !r.rd.atBoundary() || !r.wr.atBoundary() {
		return errors.New("handshake ended inside a record")
	}
	r.marked, r.markRead, r.markWritten = true, r.rd.records, r.wr.records
	return nil
}

// Release stops following the connection (the session stays in
// userspace) and forgets the secrets.
func (r *Recorder) Release() {
	r.released.Store(true)
	r.rmu.Lock()
	r.rd.release()
	r.rmu.Unlock()
	r.wmu.Lock()
	r.wr.release()
	r.wmu.Unlock()
	r.keys.wipe()
}

var _ net.Conn = (*Recorder)(nil)
