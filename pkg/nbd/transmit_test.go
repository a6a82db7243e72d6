// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// chunk appends a structured reply chunk.
func (b *serverBytes) chunk(flags, typ uint16, cookie uint64, payload []byte) *serverBytes {
	return b.u32(nbdproto.StructuredReplyMagic).u16(flags).u16(typ).u64(cookie).u32(uint32(len(payload))).raw(payload)
}

func (b *serverBytes) simple(errno uint32, cookie uint64, data []byte) *serverBytes {
	return b.u32(nbdproto.SimpleReplyMagic).u32(errno).u64(cookie).raw(data)
}

func payload(parts ...any) []byte {
	var b serverBytes
	for _, p := range parts {
		switch x := p.(type) {
		case uint16:
			b.u16(x)
		case uint32:
			b.u32(x)
		case uint64:
			b.u64(x)
		case []byte:
			b.raw(x)
		case string:
			b.raw([]byte(x))
		}
	}
	return b.Bytes()
}

// replies runs the reply reader over server bytes and returns each
// request's result (cookie 0 READ of 4096 at 4096, 1 WRITE, 2 BLOCK_STATUS
// of context 7).
func replies(t *testing.T, server []byte, structured bool) ([]*request, []error) {
	t.Helper()
	tx, reqs := replyHarness(server, structured)
	tx.idle = newCond(tx)
	tx.readLoop()
	errs := make([]error, len(reqs))
	for i, r := range reqs {
		errs[i] = <-r.result
	}
	return reqs, errs
}

func TestRepliesSimple(t *testing.T) {
	data := bytes.Repeat([]byte{0xab}, 4096)
	var b serverBytes
	b.simple(0, 1, nil).simple(0, 0, data).simple(nbdproto.ENOSPC, 2, nil)
	reqs, errs := replies(t, b.Bytes(), false)
	if errs[0] != nil || !bytes.Equal(reqs[0].buf, data) {
		t.Errorf("read: err %v, data ok %v", errs[0], bytes.Equal(reqs[0].buf, data))
	}
	if errs[1] != nil {
		t.Errorf("write: %v", errs[1])
	}
	var ce *CommandError
	if !errors.As(errs[2], &ce) || ce.Errno != nbdproto.ENOSPC {
		t.Errorf("block status: %v, want ENOSPC CommandError", errs[2])
	}
}

func TestRepliesStructured(t *testing.T) {
	var b serverBytes
	// READ answered out of order in three chunks: data, hole, data.
	b.chunk(0, nbdproto.ReplyTypeOffsetData, 0, payload(uint64(4096+3072), bytes.Repeat([]byte{3}, 1024)))
	b.chunk(0, nbdproto.ReplyTypeOffsetHole, 0, payload(uint64(4096+1024), uint32(2048)))
	b.chunk(0, nbdproto.ReplyTypeBlockStatus, 2, payload(uint32(7), uint32(4096), uint32(3), uint32(4096), uint32(0)))
	b.chunk(nbdproto.ReplyFlagDone, nbdproto.ReplyTypeNone, 2, nil)
	b.chunk(nbdproto.ReplyFlagDone, nbdproto.ReplyTypeOffsetData, 0, payload(uint64(4096), bytes.Repeat([]byte{1}, 1024)))
	b.chunk(nbdproto.ReplyFlagDone, nbdproto.ReplyTypeErrorOffset, 1, payload(uint32(nbdproto.EIO), uint16(4), "disk", uint64(100)))
	reqs, errs := replies(t, b.Bytes(), true)

	want := append(append(bytes.Repeat([]byte{1}, 1024), make([]byte, 2048)...), bytes.Repeat([]byte{3}, 1024)...)
	if errs[0] != nil || !bytes.Equal(reqs[0].buf, want) {
		t.Errorf("read: err %v, data ok %v", errs[0], bytes.Equal(reqs[0].buf, want))
	}
	var ce *CommandError
	if !errors.As(errs[1], &ce) || ce.Errno != nbdproto.EIO || !ce.HasOffset || ce.Offset != 100 || ce.Message != "disk" {
		t.Errorf("write: %#v, want EIO at 100 with message", errs[1])
	}
	if errs[2] != nil {
		t.Errorf("block status: %v", errs[2])
	}
	if diff := cmp.Diff([]Extent{{4096, 3}, {4096, 0}}, reqs[2].extents); diff != "" {
		t.Errorf("extents (-want +got):\n%s", diff)
	}
}

func TestRepliesMalformed(t *testing.T) {
	tests := []struct {
		name       string
		structured bool
		build      func(b *serverBytes)
		mention    string
	}{
		{"bad magic", true, func(b *serverBytes) { b.u32(0xdeadbeef) }, "bad reply magic"},
		{"extended header magic", true, func(b *serverBytes) { b.u32(nbdproto.ExtendedReplyMagic) }, "bad reply magic"},
		{"unknown cookie", false, func(b *serverBytes) { b.simple(0, 99, nil) }, "unknown cookie"},
		{"structured not negotiated", false, func(b *serverBytes) { b.chunk(1, 0, 1, nil) }, "not negotiated"},
		{"simple data reply to read with structured", true, func(b *serverBytes) { b.simple(0, 0, nil) }, "simple reply with data"},
		{"unknown chunk type", true, func(b *serverBytes) { b.chunk(1, 42, 1, nil) }, "unknown structured reply chunk type 42"},
		{"data outside request", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeOffsetData, 0, payload(uint64(0), []byte{1}))
		}, "outside the request"},
		{"data past end", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeOffsetData, 0, payload(uint64(8191), []byte{1, 2}))
		}, "outside the request"},
		{"overlapping chunks", true, func(b *serverBytes) {
			b.chunk(0, nbdproto.ReplyTypeOffsetHole, 0, payload(uint64(4096), uint32(4096)))
			b.chunk(1, nbdproto.ReplyTypeOffsetHole, 0, payload(uint64(4096), uint32(1)))
		}, "overlap"},
		{"read not fully covered", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeOffsetHole, 0, payload(uint64(4096), uint32(100)))
		}, "covered 100 of 4096"},
		{"hole wrong length", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeOffsetHole, 0, payload(uint64(4096)))
		}, "want 12"},
		{"none without done", true, func(b *serverBytes) { b.chunk(0, nbdproto.ReplyTypeNone, 1, nil) }, "TYPE_NONE"},
		{"data for a write", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeOffsetData, 1, payload(uint64(0), []byte{1}))
		}, "data chunk in the reply to NBD_CMD_WRITE"},
		{"block status wrong context", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeBlockStatus, 2, payload(uint32(8), uint32(1), uint32(0)))
		}, "context 8, want 7"},
		{"block status too many extents", true, func(b *serverBytes) {
			b.u32(nbdproto.StructuredReplyMagic).u16(1).u16(nbdproto.ReplyTypeBlockStatus).u64(2).u32(4 + 8*9000)
		}, "block status chunk of"},
		{"block status zero length extent", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeBlockStatus, 2, payload(uint32(7), uint32(0), uint32(0)))
		}, "length 0"},
		{"block status no extents", true, func(b *serverBytes) { b.chunk(1, nbdproto.ReplyTypeNone, 2, nil) }, "without extents"},
		{"error chunk message too long", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeError, 1, payload(uint32(5), uint16(50), "x"))
		}, "error message of 50 bytes"},
		{"error chunk errno zero", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeError, 1, payload(uint32(0), uint16(0)))
		}, "error value 0"},
		{"error chunk huge", true, func(b *serverBytes) {
			b.u32(nbdproto.StructuredReplyMagic).u16(1).u16(nbdproto.ReplyTypeError).u64(1).u32(1 << 30)
		}, "error chunk of"},
		{"error offset outside request", true, func(b *serverBytes) {
			b.chunk(1, nbdproto.ReplyTypeErrorOffset, 0, payload(uint32(5), uint16(0), uint64(0)))
		}, "outside the request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b serverBytes
			tt.build(&b)
			_, errs := replies(t, b.Bytes(), tt.structured)
			found := false
			for _, err := range errs {
				if err != nil && errors.Is(err, ErrProtocol) && strings.Contains(err.Error(), tt.mention) {
					found = true
				}
			}
			if !found {
				t.Errorf("errors %v: none is a protocol error mentioning %q", errs, tt.mention)
			}
		})
	}
}

func TestRepliesUnknownErrorChunkType(t *testing.T) {
	var b serverBytes
	b.chunk(nbdproto.ReplyFlagDone, 1<<15|9, 1, payload(uint32(nbdproto.EPERM), uint16(2), "no"))
	_, errs := replies(t, b.Bytes(), true)
	var ce *CommandError
	if !errors.As(errs[1], &ce) || ce.Errno != nbdproto.EPERM || ce.Message != "no" {
		t.Errorf("write: %v, want EPERM with message", errs[1])
	}
}
