// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// CmdFlags are per-request flags (spec, "Command flags").
type CmdFlags uint16

// Request flags. Each is valid only for some commands and only when the
// export's transmission flags allow it.
const (
	// CmdFUA forces the write to stable storage before the reply (WRITE,
	// TRIM, WRITE_ZEROES; needs FlagSendFUA).
	CmdFUA = CmdFlags(nbdproto.CmdFlagFUA)
	// CmdNoHole asks WRITE_ZEROES to allocate rather than punch a hole.
	CmdNoHole = CmdFlags(nbdproto.CmdFlagNoHole)
	// CmdFastZero asks WRITE_ZEROES to fail fast if zeroing would be slow
	// (needs FlagSendFastZero).
	CmdFastZero = CmdFlags(nbdproto.CmdFlagFastZero)
	// CmdReqOne asks BLOCK_STATUS for a single extent.
	CmdReqOne = CmdFlags(nbdproto.CmdFlagReqOne)
)

// Extent is one run of a BLOCK_STATUS reply.
type Extent struct {
	// Length is the extent length in bytes.
	Length uint32
	// Flags are the context's flags; for base:allocation bit 0 is a hole
	// and bit 1 reads as zeroes.
	Flags uint32
}

// Limits on what a server may make this client allocate for one reply.
const (
	maxErrorChunk = 14 + nbdproto.MaxString
	// maxExtents bounds one BLOCK_STATUS chunk (the spec says servers
	// SHOULD send at most 2^20 extents).
	maxExtents = 1 << 20
	// closeWait bounds how long Close waits for requests in flight.
	closeWait = 5 * time.Second
)

// transmitter issues requests on one connection and matches replies to them
// by cookie. Requests may be in flight together; a reader goroutine
// dispatches replies, a mutex serialises the writing of requests.
type transmitter struct {
	conn       net.Conn
	info       *ExportInfo
	structured bool

	wmu sync.Mutex // held while a request is written

	mu       sync.Mutex
	pending  map[uint64]*request
	next     uint64
	fatal    error // set once; every later request fails with it
	shutdown bool  // server said NBD_ESHUTDOWN; refuse new requests
	idle     *sync.Cond
	done     chan struct{} // closed when the reader exits
}

// request is one command awaiting its reply.
type request struct {
	cmd    uint16
	off    uint64
	length uint32
	ctxID  uint32

	// mu guards buf against the caller abandoning the request while the
	// reader fills it.
	mu        sync.Mutex
	buf       []byte
	abandoned bool
	covered   uint64
	extents   []Extent
	err       error
	result    chan error
}

func newTransmitter(c net.Conn, info *ExportInfo) *transmitter {
	t := &transmitter{
		conn:       c,
		info:       info,
		structured: info.StructuredReplies,
		pending:    map[uint64]*request{},
		done:       make(chan struct{}),
	}
	t.idle = newCond(t)
	go t.readLoop()
	return t
}

func newCond(t *transmitter) *sync.Cond { return sync.NewCond(&t.mu) }

// ReadAt reads len(p) bytes at off.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off uint64) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdRead, off: off, length: uint32(len(p)), buf: p}, 0, nil, len(p))
}

// WriteAt writes p at off. flags may hold CmdFUA.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off uint64, flags CmdFlags) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdWrite, off: off, length: uint32(len(p))}, flags, p, len(p))
}

// Flush makes every write that has been replied to durable.
func (c *Conn) Flush(ctx context.Context) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdFlush}, 0, nil, 0)
}

// Trim tells the server the range is no longer needed; its contents become
// undefined. flags may hold CmdFUA.
func (c *Conn) Trim(ctx context.Context, off uint64, length uint32, flags CmdFlags) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdTrim, off: off, length: length}, flags, nil, int(length))
}

// WriteZeroes makes the range read as zeroes. flags may hold CmdFUA,
// CmdNoHole and CmdFastZero.
func (c *Conn) WriteZeroes(ctx context.Context, off uint64, length uint32, flags CmdFlags) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdWriteZeroes, off: off, length: length}, flags, nil, int(length))
}

// Cache asks the server to prefetch the range.
func (c *Conn) Cache(ctx context.Context, off uint64, length uint32) error {
	return c.do(ctx, &request{cmd: nbdproto.CmdCache, off: off, length: length}, 0, nil, int(length))
}

// BlockStatus returns the extents of the metadata context metaContext (e.g.
// "base:allocation") from off, covering at most length bytes. flags may hold
// CmdReqOne.
func (c *Conn) BlockStatus(ctx context.Context, metaContext string, off uint64, length uint32, flags CmdFlags) ([]Extent, error) {
	id, ok := c.info.MetaContexts[metaContext]
	if !ok {
		return nil, fmt.Errorf("%w: metadata context %q was not negotiated", ErrNotSupportedByExport, metaContext)
	}
	r := &request{cmd: nbdproto.CmdBlockStatus, off: off, length: length, ctxID: id}
	if err := c.do(ctx, r, flags, nil, int(length)); err != nil {
		return nil, err
	}
	return r.extents, nil
}

// do validates a request, sends it and waits for its reply.
func (c *Conn) do(ctx context.Context, r *request, flags CmdFlags, payload []byte, n int) error {
	if c.tx == nil {
		return fmt.Errorf("%w: requests need a userspace-profile connection", ErrBadArgument)
	}
	if err := c.check(r, flags, n); err != nil {
		return err
	}
	return c.tx.roundTrip(ctx, r, flags, payload)
}

// check enforces the spec's client-side rules before anything is sent.
func (c *Conn) check(r *request, flags CmdFlags, n int) error {
	info := &c.info
	name := CommandName(r.cmd)
	need := map[uint16]TransmissionFlags{
		nbdproto.CmdFlush:       FlagSendFlush,
		nbdproto.CmdTrim:        FlagSendTrim,
		nbdproto.CmdWriteZeroes: FlagSendWriteZeroes,
	}
	if f, ok := need[r.cmd]; ok && !info.Flags.Has(f) {
		return fmt.Errorf("%w: %s needs the %s flag", ErrNotSupportedByExport, name, f)
	}
	switch r.cmd {
	case nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes:
		if info.ReadOnly() {
			return fmt.Errorf("%w: %s on a read-only export", ErrNotSupportedByExport, name)
		}
	case nbdproto.CmdBlockStatus:
		if !info.StructuredReplies {
			return fmt.Errorf("%w: %s needs structured replies", ErrNotSupportedByExport, name)
		}
	}
	allowed := map[uint16]CmdFlags{
		nbdproto.CmdWrite:       CmdFUA,
		nbdproto.CmdTrim:        CmdFUA,
		nbdproto.CmdWriteZeroes: CmdFUA | CmdNoHole | CmdFastZero,
		nbdproto.CmdBlockStatus: CmdReqOne,
	}[r.cmd]
	if flags&^allowed != 0 {
		return fmt.Errorf("%w: flags %#x not valid for %s", ErrBadArgument, uint16(flags&^allowed), name)
	}
	if flags&CmdFUA != 0 && !info.Flags.Has(FlagSendFUA) {
		return fmt.Errorf("%w: FUA needs the fua flag", ErrNotSupportedByExport)
	}
	if flags&CmdFastZero != 0 && !info.Flags.Has(FlagSendFastZero) {
		return fmt.Errorf("%w: FAST_ZERO needs the fast-zero flag", ErrNotSupportedByExport)
	}
	if r.cmd == nbdproto.CmdFlush {
		return nil
	}
	if n <= 0 || uint64(n) > 0xffffffff {
		return fmt.Errorf("%w: %s length %d out of range", ErrBadArgument, name, n)
	}
	if r.off > info.Size || uint64(n) > info.Size-r.off {
		return fmt.Errorf("%w: %s of %d bytes at %d exceeds the export size %d", ErrBadArgument, name, n, r.off, info.Size)
	}
	if (r.cmd == nbdproto.CmdRead || r.cmd == nbdproto.CmdWrite) && uint64(n) > uint64(maxPayload(info)) {
		return fmt.Errorf("%w: %s of %d bytes exceeds the server's maximum payload %d", ErrBadArgument, name, n, maxPayload(info))
	}
	if m := uint64(info.BlockSizes.Minimum); info.BlockSizesAdvertised && m > 1 && (r.off%m != 0 || uint64(n)%m != 0) {
		return fmt.Errorf("%w: %s offset %d and length %d must be multiples of the server's minimum block size %d", ErrBadArgument, name, r.off, n, m)
	}
	return nil
}

// maxPayload is the largest READ/WRITE the client sends.
func maxPayload(info *ExportInfo) uint32 {
	if info.BlockSizesAdvertised && info.BlockSizes.Maximum < nbdproto.MaxPayloadDefault {
		return info.BlockSizes.Maximum
	}
	return nbdproto.MaxPayloadDefault
}

func (t *transmitter) roundTrip(ctx context.Context, r *request, flags CmdFlags, payload []byte) error {
	r.result = make(chan error, 1)
	t.mu.Lock()
	switch {
	case t.fatal != nil:
		t.mu.Unlock()
		return t.fatal
	case t.shutdown:
		t.mu.Unlock()
		return fmt.Errorf("%w: not sending %s", ErrShutdown, CommandName(r.cmd))
	}
	cookie := t.next
	t.next++
	t.pending[cookie] = r
	t.mu.Unlock()

	var hdr [nbdproto.RequestLen]byte
	be.PutUint32(hdr[0:], nbdproto.RequestMagic)
	be.PutUint16(hdr[4:], uint16(flags))
	be.PutUint16(hdr[6:], r.cmd)
	be.PutUint64(hdr[8:], cookie)
	be.PutUint64(hdr[16:], r.off)
	be.PutUint32(hdr[24:], r.length)
	t.wmu.Lock()
	bufs := net.Buffers{hdr[:], payload}
	_, err := bufs.WriteTo(t.conn)
	t.wmu.Unlock()
	if err != nil {
		t.fail(fmt.Errorf("send %s: %w", CommandName(r.cmd), err))
	}

	select {
	case err := <-r.result:
		return err
	case <-ctx.Done():
		// The reply may still arrive; make sure it never lands in the
		// caller's buffer after we return.
		r.mu.Lock()
		r.abandoned = true
		r.mu.Unlock()
		return ctx.Err()
	}
}

// finish completes a request and forgets its cookie.
func (t *transmitter) finish(cookie uint64, r *request, err error) {
	t.mu.Lock()
	delete(t.pending, cookie)
	if len(t.pending) == 0 {
		t.idle.Broadcast()
	}
	if errors.Is(err, ErrShutdown) {
		t.shutdown = true
	}
	t.mu.Unlock()
	r.result <- err
}

// fail makes the connection unusable and fails every request in flight.
func (t *transmitter) fail(err error) {
	t.mu.Lock()
	if t.fatal == nil {
		t.fatal = err
	}
	pending := t.pending
	t.pending = map[uint64]*request{}
	t.idle.Broadcast()
	t.mu.Unlock()
	_ = t.conn.Close()
	for _, r := range pending {
		r.result <- err
	}
}

func (t *transmitter) lookup(cookie uint64) (*request, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.pending[cookie]
	if !ok {
		return nil, protocolErrorf("reply for unknown cookie %#x", cookie)
	}
	return r, nil
}

// close waits (briefly) for requests in flight, sends NBD_CMD_DISC and
// closes the socket.
func (t *transmitter) close() error {
	t.mu.Lock()
	deadline := time.AfterFunc(closeWait, func() { t.mu.Lock(); t.idle.Broadcast(); t.mu.Unlock() })
	start := time.Now()
	for len(t.pending) > 0 && t.fatal == nil && time.Since(start) < closeWait {
		t.idle.Wait()
	}
	deadline.Stop()
	alreadyFailed := t.fatal != nil
	if !alreadyFailed {
		t.fatal = ErrClosed
	}
	t.mu.Unlock()
	if !alreadyFailed {
		t.wmu.Lock()
		disconnect(t.conn)
		t.wmu.Unlock()
	}
	err := t.conn.Close()
	<-t.done
	t.fail(ErrClosed)
	if alreadyFailed {
		return nil
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// readLoop reads replies until the connection fails.
func (t *transmitter) readLoop() {
	defer close(t.done)
	for {
		if err := t.readReply(); err != nil {
			t.mu.Lock()
			closed := t.fatal != nil
			t.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				t.fail(ErrClosed)
			} else {
				t.fail(fmt.Errorf("nbd connection lost: %w", eofIsUnexpected(err)))
			}
			return
		}
	}
}

func (t *transmitter) readReply() error {
	var m [4]byte
	if _, err := io.ReadFull(t.conn, m[:]); err != nil {
		return err
	}
	switch magic := be.Uint32(m[:]); magic {
	case nbdproto.SimpleReplyMagic:
		return t.readSimple()
	case nbdproto.StructuredReplyMagic:
		if !t.structured {
			return protocolErrorf("structured reply chunk but structured replies were not negotiated")
		}
		return t.readChunk()
	default:
		return protocolErrorf("bad reply magic: got %#x, want %#x", magic, nbdproto.SimpleReplyMagic)
	}
}

func (t *transmitter) readSimple() error {
	var h [12]byte
	if _, err := io.ReadFull(t.conn, h[:]); err != nil {
		return err
	}
	errno, cookie := be.Uint32(h[0:]), be.Uint64(h[4:])
	r, err := t.lookup(cookie)
	if err != nil {
		return err
	}
	if errno != 0 {
		t.finish(cookie, r, &CommandError{Command: r.cmd, Errno: errno})
		return nil
	}
	if r.cmd == nbdproto.CmdRead {
		if t.structured {
			return protocolErrorf("simple reply with data to NBD_CMD_READ after structured replies were negotiated")
		}
		if err := r.fill(t.conn, 0, int(r.length)); err != nil {
			return err
		}
	}
	if r.cmd == nbdproto.CmdBlockStatus {
		return protocolErrorf("simple reply to NBD_CMD_BLOCK_STATUS")
	}
	t.finish(cookie, r, nil)
	return nil
}

// fill reads n bytes from rd into the request buffer at at, or discards them
// when the caller has gone.
func (r *request) fill(rd io.Reader, at uint64, n int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.abandoned {
		_, err := io.CopyN(io.Discard, rd, int64(n))
		return err
	}
	_, err := io.ReadFull(rd, r.buf[at:at+uint64(n)])
	return err
}

// zero clears n bytes of the request buffer at at.
func (r *request) zero(at uint64, n uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.abandoned {
		clear(r.buf[at : at+n])
	}
}
