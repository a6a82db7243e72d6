// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"time"
	"unicode/utf8"

	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

var be = binary.BigEndian

// session is the client side of one handshake. It reads the socket without
// buffering so that, when negotiation ends, not a byte of the transmission
// phase has been consumed (the kernel gets the socket next).
type session struct {
	stream      net.Conn // raw, or a *tls.Conn over it
	raw         net.Conn
	style       HandshakeStyle
	serverFlags uint16
	noZeroes    bool
	tls         bool
	// clean is true at a message boundary where another option may be
	// sent; NBD_OPT_ABORT is only sent then.
	clean        bool
	structured   bool
	metaContexts map[string]uint32
	// server names the server in budget errors; limits are the budgets.
	server string
	limits ListLimits
	// rec follows the TLS records for a later kernel TLS offload (only
	// with WithKernelTLS).
	rec *ktls.Recorder
}

// greet reads the server greeting and, for newstyle servers, answers with
// the client flags.
func (s *session) greet() (oldstyle *ExportInfo, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(s.stream, hdr[:]); err != nil {
		return nil, fmt.Errorf("read greeting: %w", eofIsUnexpected(err))
	}
	if m := be.Uint64(hdr[0:]); m != nbdproto.InitMagic {
		return nil, protocolErrorf("bad greeting magic: got %#x, want %#x (is this an NBD server?)", m, nbdproto.InitMagic)
	}
	switch m := be.Uint64(hdr[8:]); m {
	case nbdproto.OldstyleMagic:
		s.style = HandshakeOldstyle
		var rest [8 + 4 + nbdproto.OldstylePadding]byte
		if _, err := io.ReadFull(s.stream, rest[:]); err != nil {
			return nil, fmt.Errorf("read oldstyle greeting: %w", eofIsUnexpected(err))
		}
		info := &ExportInfo{
			Size:       be.Uint64(rest[0:]),
			Flags:      TransmissionFlags(be.Uint32(rest[8:])),
			Handshake:  HandshakeOldstyle,
			BlockSizes: DefaultBlockSizes,
		}
		return info, nil
	case nbdproto.OptsMagic:
	default:
		return nil, protocolErrorf("bad greeting: got %#x, want %#x (newstyle) or %#x (oldstyle)", m, nbdproto.OptsMagic, nbdproto.OldstyleMagic)
	}
	var f [2]byte
	if _, err := io.ReadFull(s.stream, f[:]); err != nil {
		return nil, fmt.Errorf("read handshake flags: %w", eofIsUnexpected(err))
	}
	s.serverFlags = be.Uint16(f[:])
	var cflags uint32
	s.style = HandshakeNewstyle
	if s.serverFlags&nbdproto.FlagFixedNewstyle != 0 {
		s.style = HandshakeFixedNewstyle
		cflags |= nbdproto.FlagCFixedNewstyle
	}
	if s.serverFlags&nbdproto.FlagNoZeroes != 0 {
		s.noZeroes = true
		cflags |= nbdproto.FlagCNoZeroes
	}
	var out [4]byte
	be.PutUint32(out[:], cflags)
	if _, err := s.stream.Write(out[:]); err != nil {
		return nil, fmt.Errorf("send client flags: %w", err)
	}
	s.clean = true
	return nil, nil
}

// sendOption sends one option request.
func (s *session) sendOption(opt uint32, data []byte) error {
	buf := make([]byte, 16+len(data))
	be.PutUint64(buf[0:], nbdproto.OptsMagic)
	be.PutUint32(buf[8:], opt)
	be.PutUint32(buf[12:], uint32(len(data)))
	copy(buf[16:], data)
	s.clean = false
	if _, err := s.stream.Write(buf); err != nil {
		return fmt.Errorf("send %s: %w", OptionName(opt), err)
	}
	return nil
}

// optReply is one option reply with its payload.
type optReply struct {
	typ  uint32
	data []byte
}

// readReply reads one option reply to opt. Error replies are returned as
// *OptionError, with the session left clean (a final reply was read).
func (s *session) readReply(opt uint32) (optReply, error) {
	s.quickAck()
	var hdr [nbdproto.OptReplyHeaderLen]byte
	if _, err := io.ReadFull(s.stream, hdr[:]); err != nil {
		return optReply{}, fmt.Errorf("read reply to %s: %w", OptionName(opt), eofIsUnexpected(err))
	}
	if m := be.Uint64(hdr[0:]); m != nbdproto.RepMagic {
		return optReply{}, protocolErrorf("bad option reply magic: got %#x, want %#x", m, nbdproto.RepMagic)
	}
	if got := be.Uint32(hdr[8:]); got != opt {
		return optReply{}, protocolErrorf("reply is for %s, want %s", OptionName(got), OptionName(opt))
	}
	r := optReply{typ: be.Uint32(hdr[12:])}
	n := be.Uint32(hdr[16:])
	if n > nbdproto.MaxOptReply {
		return optReply{}, protocolErrorf("reply to %s declares %d bytes, more than the %d allowed", OptionName(opt), n, nbdproto.MaxOptReply)
	}
	r.data = make([]byte, n)
	if _, err := io.ReadFull(s.stream, r.data); err != nil {
		return optReply{}, fmt.Errorf("read reply to %s: %w", OptionName(opt), eofIsUnexpected(err))
	}
	if r.typ&nbdproto.RepFlagError != 0 {
		s.clean = true
		msg, err := checkString("error message", r.data)
		if err != nil {
			return optReply{}, err
		}
		return optReply{}, &OptionError{Option: opt, Reply: r.typ, Message: msg}
	}
	if r.typ == nbdproto.RepAck {
		if n != 0 {
			return optReply{}, protocolErrorf("NBD_REP_ACK to %s carries %d bytes", OptionName(opt), n)
		}
		s.clean = true
	}
	return r, nil
}

// expectAck reads the reply to an option that takes a bare ACK.
func (s *session) expectAck(opt uint32) error {
	r, err := s.readReply(opt)
	if err != nil {
		return err
	}
	if r.typ != nbdproto.RepAck {
		return protocolErrorf("unexpected reply type %#x to %s", r.typ, OptionName(opt))
	}
	return nil
}

// abort sends NBD_OPT_ABORT as a courtesy when the session is at a message
// boundary, waits briefly for the ACK, and closes the connection.
func (s *session) abort() {
	if s.clean && s.style == HandshakeFixedNewstyle {
		_ = s.stream.SetDeadline(time.Now().Add(time.Second))
		if s.sendOption(nbdproto.OptAbort, nil) == nil {
			_, _ = s.readReply(nbdproto.OptAbort)
		}
	}
	s.close()
}

func (s *session) close() {
	_ = s.stream.Close()
	_ = s.raw.Close()
	if s.rec != nil {
		s.rec.Release() // forgets the secrets
	}
}

// startTLS upgrades the session with NBD_OPT_STARTTLS. It never falls back
// to plaintext: any refusal is an error wrapping ErrTLSUnavailable.
func (s *session) startTLS(cfg *tls.Config) error {
	if s.style != HandshakeFixedNewstyle {
		return fmt.Errorf("%w: server speaks %s, and STARTTLS needs fixed newstyle", ErrTLSUnavailable, s.style)
	}
	if err := s.sendOption(nbdproto.OptStartTLS, nil); err != nil {
		return err
	}
	if err := s.expectAck(nbdproto.OptStartTLS); err != nil {
		var oe *OptionError
		if errors.As(err, &oe) {
			if oe.Reply == nbdproto.RepErrShutdown {
				return err
			}
			return fmt.Errorf("%w: %w", ErrTLSUnavailable, err)
		}
		return err
	}
	var tc *tls.Conn
	if s.rec != nil {
		// The recorder keeps record boundaries and the secrets (in
		// memory only) so that the session can move into the kernel.
		cfg = cfg.Clone()
		cfg.KeyLogWriter = s.rec.KeyLog()
		tc = tls.Client(s.rec, cfg)
	} else {
		tc = tls.Client(s.raw, cfg)
	}
	if err := tc.Handshake(); err != nil {
		s.clean = false
		return &tlsHandshakeError{err: err, maxVersion: cfg.MaxVersion}
	}
	if s.rec != nil {
		if err := s.rec.HandshakeDone(); err != nil {
			s.clean = false
			return fmt.Errorf("TLS handshake: %w", err)
		}
	}
	s.stream = tc
	s.tls = true
	return nil
}

// tlsHandshakeError is a failed TLS handshake; maxVersion is the highest
// version offered (0: crypto/tls's default).
type tlsHandshakeError struct {
	err        error
	maxVersion uint16
}

func (e *tlsHandshakeError) Error() string { return "TLS handshake: " + e.err.Error() }
func (e *tlsHandshakeError) Unwrap() error { return e.err }

// infoRequest encodes the payload of NBD_OPT_INFO / NBD_OPT_GO.
func infoRequest(name string, infos ...uint16) []byte {
	b := make([]byte, 4+len(name)+2+2*len(infos))
	be.PutUint32(b, uint32(len(name)))
	copy(b[4:], name)
	o := 4 + len(name)
	be.PutUint16(b[o:], uint16(len(infos)))
	for i, t := range infos {
		be.PutUint16(b[o+2+2*i:], t)
	}
	return b
}

// requestedInfos are the information types asked for with INFO and GO.
var requestedInfos = []uint16{nbdproto.InfoName, nbdproto.InfoDescription, nbdproto.InfoBlockSize}

// negotiateInfo sends opt (NBD_OPT_INFO or NBD_OPT_GO) for name and fills
// info from the replies up to the final ACK.
func (s *session) negotiateInfo(opt uint32, name string, info *ExportInfo) error {
	if err := s.sendOption(opt, infoRequest(name, requestedInfos...)); err != nil {
		return err
	}
	haveExport := false
	seen := map[uint16]bool{}
	for n := 0; ; n++ {
		r, err := s.readReply(opt)
		if err != nil {
			return err
		}
		if r.typ == nbdproto.RepInfo && n >= maxInfoReplies {
			return &LimitError{Server: s.server, What: fmt.Sprintf("%s for %q", OptionName(opt), name), Limit: maxInfoReplies, Unit: "NBD_REP_INFO replies"}
		}
		switch r.typ {
		case nbdproto.RepAck:
			if !haveExport {
				return protocolErrorf("%s acknowledged without NBD_INFO_EXPORT", OptionName(opt))
			}
			return nil
		case nbdproto.RepInfo:
			t, err := decodeInfo(r.data, info)
			if err != nil {
				return err
			}
			if t <= nbdproto.InfoBlockSize {
				if seen[t] {
					return protocolErrorf("information type %d sent twice", t)
				}
				seen[t] = true
			}
			if t == nbdproto.InfoExport {
				haveExport = true
			}
		default:
			return protocolErrorf("unexpected reply type %#x to %s", r.typ, OptionName(opt))
		}
	}
}

// decodeInfo decodes one NBD_REP_INFO payload into info and returns its type.
// Unknown types are ignored, as the spec requires.
func decodeInfo(b []byte, info *ExportInfo) (uint16, error) {
	if len(b) < 2 {
		return 0, protocolErrorf("NBD_REP_INFO of %d bytes", len(b))
	}
	t := be.Uint16(b)
	p := b[2:]
	switch t {
	case nbdproto.InfoExport:
		if len(p) != 10 {
			return t, protocolErrorf("NBD_INFO_EXPORT is %d bytes, want 12", len(b))
		}
		info.Size = be.Uint64(p)
		info.Flags = TransmissionFlags(be.Uint16(p[8:]))
	case nbdproto.InfoName:
		s, err := checkString("NBD_INFO_NAME", p)
		if err != nil {
			return t, err
		}
		info.CanonicalName = s
	case nbdproto.InfoDescription:
		s, err := checkString("NBD_INFO_DESCRIPTION", p)
		if err != nil {
			return t, err
		}
		info.Description = s
	case nbdproto.InfoBlockSize:
		if len(p) != 12 {
			return t, protocolErrorf("NBD_INFO_BLOCK_SIZE is %d bytes, want 14", len(b))
		}
		bs := BlockSizes{Minimum: be.Uint32(p), Preferred: be.Uint32(p[4:]), Maximum: be.Uint32(p[8:])}
		if err := bs.Validate(); err != nil {
			return t, err
		}
		info.BlockSizes = bs
		info.BlockSizesAdvertised = true
	}
	return t, nil
}

// Validate checks block size constraints against the spec: minimum a power
// of two up to 64 KiB, preferred a power of two not below the minimum,
// maximum not below the preferred size.
func (b BlockSizes) Validate() error {
	switch {
	case b.Minimum == 0 || bits.OnesCount32(b.Minimum) != 1:
		return protocolErrorf("minimum block size %d is not a power of two", b.Minimum)
	case b.Minimum > nbdproto.MaxBlockSizeMin:
		return protocolErrorf("minimum block size %d exceeds 64 KiB", b.Minimum)
	case bits.OnesCount32(b.Preferred) != 1:
		return protocolErrorf("preferred block size %d is not a power of two", b.Preferred)
	case b.Preferred < b.Minimum:
		return protocolErrorf("preferred block size %d is below the minimum %d", b.Preferred, b.Minimum)
	case b.Maximum < b.Preferred:
		return protocolErrorf("maximum payload %d is below the preferred block size %d", b.Maximum, b.Preferred)
	}
	return nil
}

// checkString validates a protocol string: at most 4096 bytes, UTF-8, no NUL.
func checkString(what string, b []byte) (string, error) {
	if len(b) > nbdproto.MaxString {
		return "", protocolErrorf("%s is %d bytes, the limit is %d", what, len(b), nbdproto.MaxString)
	}
	if !utf8.Valid(b) {
		return "", protocolErrorf("%s is not valid UTF-8", what)
	}
	for _, c := range b {
		if c == 0 {
			return "", protocolErrorf("%s contains NUL", what)
		}
	}
	return string(b), nil
}

// exportName sends NBD_OPT_EXPORT_NAME and reads the reply, which ends the
// handshake. The server closes the connection if it refuses.
func (s *session) exportName(name string, info *ExportInfo) error {
	if err := s.sendOption(nbdproto.OptExportName, []byte(name)); err != nil {
		return err
	}
	n := 10
	if !s.noZeroes {
		n += nbdproto.ExportNamePadding
	}
	buf := make([]byte, n)
	s.quickAck()
	if _, err := io.ReadFull(s.stream, buf); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("server closed the connection after NBD_OPT_EXPORT_NAME %q (the export may not exist or may require TLS): %w", name, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("read NBD_OPT_EXPORT_NAME reply: %w", err)
	}
	info.Size = be.Uint64(buf)
	info.Flags = TransmissionFlags(be.Uint16(buf[8:]))
	return nil
}

// list runs NBD_OPT_LIST, within the session's budget.
func (s *session) list() ([]ListEntry, error) {
	if err := s.sendOption(nbdproto.OptList, nil); err != nil {
		return nil, err
	}
	var out []ListEntry
	total := 0
	lim := s.limits
	if lim.Exports <= 0 || lim.Bytes <= 0 {
		lim = DefaultListLimits
	}
	for {
		r, err := s.readReply(nbdproto.OptList)
		if err != nil {
			return nil, err
		}
		switch r.typ {
		case nbdproto.RepAck:
			return out, nil
		case nbdproto.RepServer:
			e, err := decodeServer(r.data)
			if err != nil {
				return nil, err
			}
			if len(out) >= lim.Exports {
				return nil, &LimitError{Server: s.server, What: "NBD_OPT_LIST", Limit: uint64(lim.Exports), Unit: "exports"}
			}
			total += len(e.Name) + len(e.Description)
			if total > lim.Bytes {
				return nil, &LimitError{Server: s.server, What: fmt.Sprintf("NBD_OPT_LIST (names and descriptions, at export %d)", len(out)+1), Limit: uint64(lim.Bytes), Unit: "bytes"}
			}
			out = append(out, e)
		default:
			return nil, protocolErrorf("unexpected reply type %#x to NBD_OPT_LIST", r.typ)
		}
	}
}

// maxInfoReplies bounds the NBD_REP_INFO replies to one NBD_OPT_INFO or
// NBD_OPT_GO. The client asks for three types and the server adds
// NBD_INFO_EXPORT; unknown types are allowed (and ignored) up to this count.
const maxInfoReplies = 32

func decodeServer(b []byte) (ListEntry, error) {
	if len(b) < 4 {
		return ListEntry{}, protocolErrorf("NBD_REP_SERVER of %d bytes", len(b))
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return ListEntry{}, protocolErrorf("NBD_REP_SERVER name length %d exceeds the reply (%d bytes)", n, len(b)-4)
	}
	name, err := checkString("export name", b[4:4+n])
	if err != nil {
		return ListEntry{}, err
	}
	desc, err := checkString("export description", b[4+n:])
	if err != nil {
		return ListEntry{}, err
	}
	return ListEntry{Name: name, Description: desc}, nil
}

// structuredReplies asks for structured replies; ERR_UNSUP means the server
// has none and is not an error.
func (s *session) structuredReplies() error {
	if err := s.sendOption(nbdproto.OptStructuredReply, nil); err != nil {
		return err
	}
	err := s.expectAck(nbdproto.OptStructuredReply)
	if err == nil {
		s.structured = true
		return nil
	}
	return ignoreRefusal(err)
}

// setMetaContexts selects metadata contexts for name. A refusal leaves none
// selected and is not an error.
func (s *session) setMetaContexts(name string, queries []string) error {
	size := 4 + len(name) + 4
	for _, q := range queries {
		size += 4 + len(q)
	}
	b := make([]byte, size)
	be.PutUint32(b, uint32(len(name)))
	o := 4 + copy(b[4:], name)
	be.PutUint32(b[o:], uint32(len(queries)))
	o += 4
	for _, q := range queries {
		be.PutUint32(b[o:], uint32(len(q)))
		o += 4 + copy(b[o+4:], q)
	}
	if err := s.sendOption(nbdproto.OptSetMetaContext, b); err != nil {
		return err
	}
	got := map[string]uint32{}
	for {
		r, err := s.readReply(nbdproto.OptSetMetaContext)
		if err != nil {
			return ignoreRefusal(err)
		}
		switch r.typ {
		case nbdproto.RepAck:
			if len(got) > 0 {
				s.metaContexts = got
			}
			return nil
		case nbdproto.RepMetaContext:
			if len(r.data) < 4 {
				return protocolErrorf("NBD_REP_META_CONTEXT of %d bytes", len(r.data))
			}
			cname, err := checkString("metadata context name", r.data[4:])
			if err != nil {
				return err
			}
			if len(got) >= len(queries) {
				return protocolErrorf("server selected more metadata contexts than requested")
			}
			got[cname] = be.Uint32(r.data)
		default:
			return protocolErrorf("unexpected reply type %#x to NBD_OPT_SET_META_CONTEXT", r.typ)
		}
	}
}

// ignoreRefusal turns a server's refusal of an optional feature into nil,
// except for shutdown, which must end the session.
func ignoreRefusal(err error) error {
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply != nbdproto.RepErrShutdown {
		return nil
	}
	return err
}

func eofIsUnexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("server closed the connection: %w", io.ErrUnexpectedEOF)
	}
	return err
}
