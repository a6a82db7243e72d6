// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

func TestHandshakeScripted(t *testing.T) {
	good := infoExport(1<<20, nbdproto.FlagHasFlags|nbdproto.FlagReadOnly)
	ack := func(b *serverBytes) *serverBytes { return b.reply(nbdproto.OptGo, nbdproto.RepAck, nil) }
	goInfo := func(data []byte) []byte {
		var b serverBytes
		b.newstyle().reply(nbdproto.OptGo, nbdproto.RepInfo, data)
		return ack(&b).Bytes()
	}
	withGood := func(extra []byte) []byte {
		var b serverBytes
		b.newstyle().reply(nbdproto.OptGo, nbdproto.RepInfo, good).reply(nbdproto.OptGo, nbdproto.RepInfo, extra)
		return ack(&b).Bytes()
	}
	longString := strings.Repeat("x", 4097)

	tests := []struct {
		name    string
		server  func() []byte
		profile Profile
		want    *ExportInfo
		wantErr error
		mention string
	}{
		{
			name:    "userspace go with all infos",
			server:  goodGoSession,
			profile: ProfileUserspace,
			want: &ExportInfo{Name: "e", Size: 1 << 20, Flags: FlagHasFlags | FlagSendFlush, Description: "a disk",
				BlockSizes: BlockSizes{512, 4096, 1 << 25}, BlockSizesAdvertised: true, Handshake: HandshakeFixedNewstyle,
				StructuredReplies: true, MetaContexts: map[string]uint32{"base:allocation": 1}},
		},
		{
			name: "oldstyle",
			server: func() []byte {
				var b serverBytes
				return b.u64(nbdproto.InitMagic).u64(nbdproto.OldstyleMagic).u64(4096).u32(3).raw(make([]byte, 124)).Bytes()
			},
			want: &ExportInfo{Name: "e", Size: 4096, Flags: FlagHasFlags | FlagReadOnly, BlockSizes: DefaultBlockSizes, Handshake: HandshakeOldstyle},
		},
		{
			name: "non-fixed newstyle with zero padding",
			server: func() []byte {
				var b serverBytes
				return b.u64(nbdproto.InitMagic).u64(nbdproto.OptsMagic).u16(0).u64(8192).u16(1).raw(make([]byte, 124)).Bytes()
			},
			want: &ExportInfo{Name: "e", Size: 8192, Flags: FlagHasFlags, BlockSizes: DefaultBlockSizes, Handshake: HandshakeNewstyle},
		},
		{
			name: "go unsupported falls back to list and export name",
			server: func() []byte {
				var b serverBytes
				b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnsup, nil).
					reply(nbdproto.OptList, nbdproto.RepServer, append([]byte{0, 0, 0, 1}, 'e')).
					reply(nbdproto.OptList, nbdproto.RepAck, nil).u64(4096).u16(1)
				return b.Bytes()
			},
			want: &ExportInfo{Name: "e", Size: 4096, Flags: FlagHasFlags, BlockSizes: DefaultBlockSizes, Handshake: HandshakeFixedNewstyle},
		},
		{
			name: "go unsupported and export not listed",
			server: func() []byte {
				var b serverBytes
				return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnsup, nil).
					reply(nbdproto.OptList, nbdproto.RepServer, append([]byte{0, 0, 0, 1}, 'z')).
					reply(nbdproto.OptList, nbdproto.RepAck, nil).Bytes()
			},
			wantErr: ErrUnknownExport, mention: "not among the 1 exports",
		},
		{
			name: "unknown export with message",
			server: func() []byte {
				var b serverBytes
				return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnknown, []byte("no such disk")).Bytes()
			},
			wantErr: ErrUnknownExport, mention: "no such disk",
		},
		{
			name: "tls required",
			server: func() []byte {
				var b serverBytes
				return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrTLSReqd, nil).Bytes()
			},
			wantErr: ErrTLSRequired, mention: "use an nbds://",
		},
		{
			name: "shutdown",
			server: func() []byte {
				var b serverBytes
				return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrShutdown, []byte("bye")).Bytes()
			},
			wantErr: ErrShutdown,
		},
		{name: "policy", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrPolicy, nil).Bytes()
		}, wantErr: ErrPolicy},
		{name: "block size required", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrBlockSizeReqd, nil).Bytes()
		}, wantErr: ErrBlockSizeRequired},
		{name: "bad init magic", server: func() []byte {
			var b serverBytes
			return b.u64(0x1234).u64(nbdproto.OptsMagic).u16(1).Bytes()
		}, wantErr: ErrProtocol, mention: "got 0x1234"},
		{name: "bad second magic", server: func() []byte {
			var b serverBytes
			return b.u64(nbdproto.InitMagic).u64(7).u16(1).Bytes()
		}, wantErr: ErrProtocol},
		{name: "bad reply magic", server: func() []byte {
			var b serverBytes
			return b.newstyle().u64(99).u32(nbdproto.OptGo).u32(nbdproto.RepAck).u32(0).Bytes()
		}, wantErr: ErrProtocol, mention: "option reply magic"},
		{name: "wrong option echo", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptList, nbdproto.RepAck, nil).Bytes()
		}, wantErr: ErrProtocol, mention: "reply is for NBD_OPT_LIST"},
		{name: "huge reply length", server: func() []byte {
			var b serverBytes
			return b.newstyle().u64(nbdproto.RepMagic).u32(nbdproto.OptGo).u32(nbdproto.RepInfo).u32(0xffffffff).Bytes()
		}, wantErr: ErrProtocol, mention: "declares 4294967295 bytes"},
		{name: "info export wrong length", server: func() []byte { return goInfo(append(good, 0)) }, wantErr: ErrProtocol, mention: "want 12"},
		{name: "block size wrong length", server: func() []byte { return withGood(infoBlockSize(512, 4096, 1<<20)[:13]) }, wantErr: ErrProtocol, mention: "want 14"},
		{name: "block size not power of two", server: func() []byte { return withGood(infoBlockSize(513, 4096, 1<<20)) }, wantErr: ErrProtocol, mention: "power of two"},
		{name: "block size minimum too big", server: func() []byte { return withGood(infoBlockSize(1<<17, 1<<17, 1<<20)) }, wantErr: ErrProtocol, mention: "64 KiB"},
		{name: "block size preferred below minimum", server: func() []byte { return withGood(infoBlockSize(4096, 512, 1<<20)) }, wantErr: ErrProtocol, mention: "below the minimum"},
		{name: "block size maximum below preferred", server: func() []byte { return withGood(infoBlockSize(512, 4096, 1024)) }, wantErr: ErrProtocol, mention: "below the preferred"},
		{name: "description too long", server: func() []byte { return withGood(append([]byte{0, 2}, longString...)) }, wantErr: ErrProtocol, mention: "limit is 4096"},
		{name: "name with NUL", server: func() []byte { return withGood([]byte{0, 1, 'a', 0}) }, wantErr: ErrProtocol, mention: "NUL"},
		{name: "info sent twice", server: func() []byte { return withGood(good) }, wantErr: ErrProtocol, mention: "twice"},
		{name: "ack without info export", server: func() []byte {
			var b serverBytes
			return ack(b.newstyle()).Bytes()
		}, wantErr: ErrProtocol, mention: "without NBD_INFO_EXPORT"},
		{name: "ack with payload", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepInfo, good).reply(nbdproto.OptGo, nbdproto.RepAck, []byte{1}).Bytes()
		}, wantErr: ErrProtocol, mention: "carries 1 bytes"},
		{name: "error message too long", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnknown, []byte(longString)).Bytes()
		}, wantErr: ErrProtocol},
		{name: "truncated greeting", server: func() []byte {
			var b serverBytes
			return b.u64(nbdproto.InitMagic).Bytes()
		}, wantErr: io.ErrUnexpectedEOF},
		{name: "export name refused by closing", server: func() []byte {
			var b serverBytes
			return b.u64(nbdproto.InitMagic).u64(nbdproto.OptsMagic).u16(0).Bytes()
		}, wantErr: io.ErrUnexpectedEOF, mention: "may not exist"},
		{name: "list entry name longer than reply", server: func() []byte {
			var b serverBytes
			return b.newstyle().reply(nbdproto.OptGo, nbdproto.RepErrUnsup, nil).
				reply(nbdproto.OptList, nbdproto.RepServer, []byte{0, 0, 0, 9, 'e'}).Bytes()
		}, wantErr: ErrProtocol, mention: "exceeds the reply"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := runHandshake(tt.server(), tt.profile)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error = %v, want %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.mention) {
					t.Errorf("error %q does not mention %q", err, tt.mention)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got, cmpopts.IgnoreFields(ExportInfo{}, "CanonicalName")); diff != "" {
				t.Errorf("export info (-want +got):\n%s", diff)
			}
		})
	}
}

func TestOptionErrorIs(t *testing.T) {
	for rep, want := range map[uint32]error{
		nbdproto.RepErrUnsup: ErrUnsupported, nbdproto.RepErrPolicy: ErrPolicy, nbdproto.RepErrInvalid: ErrInvalid,
		nbdproto.RepErrPlatform: ErrPlatform, nbdproto.RepErrTLSReqd: ErrTLSRequired, nbdproto.RepErrUnknown: ErrUnknownExport,
		nbdproto.RepErrShutdown: ErrShutdown, nbdproto.RepErrBlockSizeReqd: ErrBlockSizeRequired, nbdproto.RepErrTooBig: ErrTooBig,
	} {
		err := error(&OptionError{Option: nbdproto.OptGo, Reply: rep, Message: "why"})
		if !errors.Is(err, want) {
			t.Errorf("reply %#x: errors.Is(%v) = false", rep, want)
		}
		if !strings.Contains(err.Error(), "NBD_OPT_GO") || !strings.Contains(err.Error(), "why") {
			t.Errorf("reply %#x: message %q lacks option or server text", rep, err)
		}
	}
}

func TestFixFlags(t *testing.T) {
	s := &session{}
	info := &ExportInfo{Flags: FlagHasFlags | FlagSendDF | FlagSendFastZero}
	fixFlags(s, info)
	if info.Flags != FlagHasFlags {
		t.Errorf("flags = %v, want DF and FAST_ZERO dropped", info.Flags)
	}
	info = &ExportInfo{Flags: FlagReadOnly}
	fixFlags(s, info)
	if info.Flags != 0 {
		t.Errorf("flags without HAS_FLAGS = %v, want none", info.Flags)
	}
}
