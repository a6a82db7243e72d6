// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// scriptConn is a net.Conn whose reads come from a fixed byte string (what a
// server would send) and whose writes are discarded. Reads past the end
// return io.EOF, so nothing driven by it can hang.
type scriptConn struct {
	r *bytes.Reader
}

func newScriptConn(b []byte) *scriptConn               { return &scriptConn{r: bytes.NewReader(b)} }
func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// serverBytes builds what a server sends, for seeds and tests.
type serverBytes struct{ bytes.Buffer }

func (b *serverBytes) u16(v uint16) *serverBytes { _ = binaryWrite(&b.Buffer, v); return b }
func (b *serverBytes) u32(v uint32) *serverBytes { _ = binaryWrite(&b.Buffer, v); return b }
func (b *serverBytes) u64(v uint64) *serverBytes { _ = binaryWrite(&b.Buffer, v); return b }
func (b *serverBytes) raw(p []byte) *serverBytes { b.Write(p); return b }

func binaryWrite(w io.Writer, v any) error {
	switch x := v.(type) {
	case uint16:
		var a [2]byte
		be.PutUint16(a[:], x)
		_, err := w.Write(a[:])
		return err
	case uint32:
		var a [4]byte
		be.PutUint32(a[:], x)
		_, err := w.Write(a[:])
		return err
	case uint64:
		var a [8]byte
		be.PutUint64(a[:], x)
		_, err := w.Write(a[:])
		return err
	}
	return errors.New("unsupported")
}

// newstyle is a fixed-newstyle greeting with NO_ZEROES.
func (b *serverBytes) newstyle() *serverBytes {
	return b.u64(nbdproto.InitMagic).u64(nbdproto.OptsMagic).u16(nbdproto.FlagFixedNewstyle | nbdproto.FlagNoZeroes)
}

// reply appends an option reply.
func (b *serverBytes) reply(opt, typ uint32, data []byte) *serverBytes {
	return b.u64(nbdproto.RepMagic).u32(opt).u32(typ).u32(uint32(len(data))).raw(data)
}

func infoExport(size uint64, flags uint16) []byte {
	var p serverBytes
	p.u16(nbdproto.InfoExport).u64(size).u16(flags)
	return p.Bytes()
}

func infoBlockSize(minimum, pref, maximum uint32) []byte {
	var p serverBytes
	p.u16(nbdproto.InfoBlockSize).u32(minimum).u32(pref).u32(maximum)
	return p.Bytes()
}

// goodGoSession is a complete, valid server side of a GO handshake.
func goodGoSession() []byte {
	var b serverBytes
	b.newstyle()
	b.reply(nbdproto.OptStructuredReply, nbdproto.RepAck, nil)
	var mc serverBytes
	mc.u32(1).raw([]byte(nbdproto.MetaBaseAllocation))
	b.reply(nbdproto.OptSetMetaContext, nbdproto.RepMetaContext, mc.Bytes())
	b.reply(nbdproto.OptSetMetaContext, nbdproto.RepAck, nil)
	b.reply(nbdproto.OptGo, nbdproto.RepInfo, infoExport(1<<20, nbdproto.FlagHasFlags|nbdproto.FlagSendFlush))
	b.reply(nbdproto.OptGo, nbdproto.RepInfo, infoBlockSize(512, 4096, 1<<25))
	b.reply(nbdproto.OptGo, nbdproto.RepInfo, append([]byte{0, byte(nbdproto.InfoDescription)}, "a disk"...))
	b.reply(nbdproto.OptGo, nbdproto.RepAck, nil)
	return b.Bytes()
}

// runHandshake drives the client's Dial flow over scripted server bytes.
func runHandshake(server []byte, profile Profile) (*ExportInfo, error) {
	c := newScriptConn(server)
	s := &session{stream: c, raw: c}
	u := &URI{Scheme: "nbd+unix", Socket: "/x", Export: "e", TLSVerifyPeer: true}
	cfg := newConfig([]Option{WithProfile(profile)})
	var out *ExportInfo
	err := handshake(s, u, nil, func(s *session, info *ExportInfo) error {
		if info.Handshake != HandshakeOldstyle {
			if err := enter(s, u, cfg, info); err != nil {
				return err
			}
		}
		fixFlags(s, info)
		out = info
		return nil
	})
	return out, err
}

func FuzzHandshake(f *testing.F) {
	f.Add(goodGoSession())
	var old serverBytes
	old.u64(nbdproto.InitMagic).u64(nbdproto.OldstyleMagic).u64(1 << 30).u32(1).raw(make([]byte, 124))
	f.Add(old.Bytes())
	var unsup serverBytes
	unsup.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnsup, nil).
		reply(nbdproto.OptList, nbdproto.RepServer, append([]byte{0, 0, 0, 1}, 'e')).
		reply(nbdproto.OptList, nbdproto.RepAck, nil).u64(4096).u16(1)
	f.Add(unsup.Bytes())
	f.Fuzz(func(t *testing.T, server []byte) {
		for _, p := range []Profile{ProfileKernel, ProfileUserspace} {
			info, err := runHandshake(server, p)
			if err == nil && info == nil {
				t.Fatal("no error and no export info")
			}
			if err == nil && info.Flags != 0 && !info.Flags.Has(FlagHasFlags) {
				t.Fatalf("flags %#x accepted without HAS_FLAGS", uint16(info.Flags))
			}
		}
	})
}

func FuzzDecodeInfo(f *testing.F) {
	f.Add(infoExport(1<<30, 3))
	f.Add(infoBlockSize(512, 4096, 1<<25))
	f.Add(append([]byte{0, 1}, "name"...))
	f.Add([]byte{0, 3, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		var info ExportInfo
		typ, err := decodeInfo(b, &info)
		if err != nil {
			return
		}
		// Round trip: re-encode what was decoded and decode again.
		var enc []byte
		switch typ {
		case nbdproto.InfoExport:
			enc = infoExport(info.Size, uint16(info.Flags))
		case nbdproto.InfoBlockSize:
			if info.BlockSizes.Validate() != nil {
				t.Fatalf("accepted invalid block sizes %+v", info.BlockSizes)
			}
			enc = infoBlockSize(info.BlockSizes.Minimum, info.BlockSizes.Preferred, info.BlockSizes.Maximum)
		case nbdproto.InfoName:
			enc = append([]byte{0, 1}, info.CanonicalName...)
		case nbdproto.InfoDescription:
			enc = append([]byte{0, 2}, info.Description...)
		default:
			return
		}
		var again ExportInfo
		if _, err := decodeInfo(enc, &again); err != nil {
			t.Fatalf("re-decoding %x: %v", enc, err)
		}
		if !equalInfo(info, again) {
			t.Fatalf("round trip changed %+v to %+v", info, again)
		}
	})
}

func equalInfo(a, b ExportInfo) bool {
	return a.Size == b.Size && a.Flags == b.Flags && a.BlockSizes == b.BlockSizes &&
		a.CanonicalName == b.CanonicalName && a.Description == b.Description
}

// replyHarness is a transmitter over scripted server bytes with three
// requests in flight: a 4 KiB READ (cookie 0), a WRITE (1) and a
// BLOCK_STATUS for context 7 (2).
func replyHarness(server []byte, structured bool) (*transmitter, []*request) {
	c := newScriptConn(server)
	info := &ExportInfo{Size: 1 << 20, StructuredReplies: structured}
	t := &transmitter{conn: c, info: info, structured: structured, pending: map[uint64]*request{}, done: make(chan struct{})}
	reqs := []*request{
		{cmd: nbdproto.CmdRead, off: 4096, length: 4096, buf: bytes.Repeat([]byte{0xff}, 4096)}, // holes must overwrite
		{cmd: nbdproto.CmdWrite, off: 0, length: 512},
		{cmd: nbdproto.CmdBlockStatus, off: 0, length: 8192, ctxID: 7},
	}
	for i, r := range reqs {
		r.result = make(chan error, 1)
		t.pending[uint64(i)] = r
	}
	return t, reqs
}

func FuzzReplies(f *testing.F) {
	var simple serverBytes
	simple.u32(nbdproto.SimpleReplyMagic).u32(0).u64(1)
	simple.u32(nbdproto.SimpleReplyMagic).u32(0).u64(0).raw(make([]byte, 4096))
	f.Add(simple.Bytes(), false)
	var sr serverBytes
	sr.u32(nbdproto.StructuredReplyMagic).u16(0).u16(nbdproto.ReplyTypeOffsetData).u64(0).u32(8 + 1024).u64(4096).raw(make([]byte, 1024))
	sr.u32(nbdproto.StructuredReplyMagic).u16(nbdproto.ReplyFlagDone).u16(nbdproto.ReplyTypeOffsetHole).u64(0).u32(12).u64(5120).u32(3072)
	sr.u32(nbdproto.StructuredReplyMagic).u16(nbdproto.ReplyFlagDone).u16(nbdproto.ReplyTypeBlockStatus).u64(2).u32(12).u32(7).u32(8192).u32(3)
	sr.u32(nbdproto.StructuredReplyMagic).u16(nbdproto.ReplyFlagDone).u16(nbdproto.ReplyTypeErrorOffset).u64(1).u32(6 + 3 + 8).u32(5).u16(3).raw([]byte("bad")).u64(100)
	f.Add(sr.Bytes(), true)
	f.Fuzz(func(t *testing.T, server []byte, structured bool) {
		tx, reqs := replyHarness(server, structured)
		tx.idle = newCond(tx)
		tx.readLoop() // returns at the end of the script at the latest
		for i, r := range reqs {
			select {
			case err := <-r.result:
				var ce *CommandError
				if err != nil && !errors.As(err, &ce) && !errors.Is(err, ErrProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrClosed) {
					t.Fatalf("request %d: unexpected error class %v", i, err)
				}
				if err == nil && r.cmd == nbdproto.CmdBlockStatus && len(r.extents) == 0 {
					t.Fatalf("block status succeeded without extents")
				}
			default:
				t.Fatalf("request %d never completed after the connection ended", i)
			}
		}
	})
}
