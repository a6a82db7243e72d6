// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// Dial connects to the export u names, negotiates with the given profile and
// returns a connection in the transmission phase.
//
// Negotiation order (fixed newstyle): STARTTLS when TLS is asked for;
// STRUCTURED_REPLY and SET_META_CONTEXT for ProfileUserspace; GO with
// requests for the canonical name, the description and the block sizes. If
// the server does not know GO, LIST is tried (to report an unknown export
// clearly) and then EXPORT_NAME. Any failure after the greeting sends
// NBD_OPT_ABORT before closing when the protocol state allows it.
func Dial(ctx context.Context, u *URI, opts ...Option) (*Conn, error) {
	cfg := newConfig(opts)
	c, err := dial(ctx, u, cfg)
	if err != nil && cfg.kernelTLS && !cfg.kernelTLS13 && refusedTLS12(err) {
		cfg.kernelTLS13 = true
		c, err = dial(ctx, u, cfg)
	}
	return c, err
}

// refusedTLS12 reports whether a TLS handshake offering at most TLS 1.2
// (WithKernelTLS) failed for a reason other than this client's refusal of
// the server's certificate: the server may insist on TLS 1.3. Servers say
// so differently — crypto/tls sends a protocol_version alert, GnuTLS under
// qemu-nbd just closes the connection — so any such failure is retried
// once with TLS 1.3 allowed.
func refusedTLS12(err error) bool {
	var he *tlsHandshakeError
	if !errors.As(err, &he) || he.maxVersion != tls.VersionTLS12 {
		return false
	}
	var cv *tls.CertificateVerificationError
	return !errors.As(err, &cv)
}

func dial(ctx context.Context, u *URI, cfg *config) (*Conn, error) {
	var conn *Conn
	err := withSession(ctx, u, cfg, func(s *session, info *ExportInfo) error {
		if info.Handshake != HandshakeOldstyle {
			if err := enter(s, u, cfg, info); err != nil {
				return err
			}
		}
		fixFlags(s, info)
		conn = &Conn{stream: s.stream, raw: s.raw, info: *info, profile: cfg.profile, rec: s.rec}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if cfg.profile == ProfileUserspace {
		conn.tx = newTransmitter(conn.stream, &conn.info)
	}
	return conn, nil
}

// Probe negotiates with the export u names and returns what the server says
// about it, without entering transmission where the server allows that
// (NBD_OPT_INFO). With ProfileUserspace the report includes structured
// replies and metadata contexts, as a userspace client would see them. Servers without NBD_OPT_INFO are probed with GO or
// EXPORT_NAME followed by an immediate NBD_CMD_DISC.
func Probe(ctx context.Context, u *URI, opts ...Option) (*ExportInfo, error) {
	cfg := newConfig(opts)
	var out *ExportInfo
	err := withSession(ctx, u, cfg, func(s *session, info *ExportInfo) error {
		if info.Handshake == HandshakeFixedNewstyle {
			if err := prepare(s, u, cfg); err != nil {
				return err
			}
			err := s.negotiateInfo(nbdproto.OptInfo, u.Export, info)
			switch {
			case err == nil && info.Size == 0:
				// Some servers (nbd-server 3.24) answer NBD_OPT_INFO with
				// size 0; GO below tells the truth.
			case err == nil:
				fixFlags(s, info)
				out = info
				s.abort()
				return nil
			case !errors.Is(err, ErrUnsupported):
				return explainTLS(err, s)
			}
		}
		if info.Handshake != HandshakeOldstyle {
			if err := enter(s, u, cfg, info); err != nil {
				return err
			}
			disconnect(s.stream)
		}
		fixFlags(s, info)
		out = info
		s.close()
		return nil
	})
	return out, err
}

// List returns the exports the server announces with NBD_OPT_LIST. It needs
// a fixed-newstyle server; the export name in u is ignored.
func List(ctx context.Context, u *URI, opts ...Option) ([]ListEntry, error) {
	cfg := newConfig(opts)
	var out []ListEntry
	err := withSession(ctx, u, cfg, func(s *session, info *ExportInfo) error {
		if s.style != HandshakeFixedNewstyle {
			return fmt.Errorf("%w: server speaks %s, which cannot list exports", ErrUnsupported, s.style)
		}
		l, err := s.list()
		if err != nil {
			return explainTLS(err, s)
		}
		out = l
		s.abort()
		return nil
	})
	return out, err
}

// withSession dials u, reads the greeting, upgrades to TLS when asked to,
// and runs fn. The context bounds everything; on error the session is
// aborted and closed. fn owns the session on success.
func withSession(ctx context.Context, u *URI, cfg *config, fn func(*session, *ExportInfo) error) error {
	if err := ValidateExportName(u.Export); err != nil {
		return err
	}
	tlsCfg, err := cfg.tlsConfig(u)
	if err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok && cfg.handshakeTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.handshakeTimeout)
		defer cancel()
	}
	network, addr := u.Network()
	raw, err := cfg.netDialer.DialContext(ctx, network, addr)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	s := &session{stream: raw, raw: raw, server: u.WithExport("").String(), limits: cfg.limits}
	if cfg.kernelTLS && tlsCfg != nil && cfg.profile == ProfileKernel {
		s.rec = ktls.NewRecorder(raw)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	// Cancellation interrupts blocked reads and writes.
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })

	err = handshake(s, u, tlsCfg, fn)
	canceled := !stop()
	if err == nil && canceled {
		err = ctx.Err()
		s.close()
	}
	if err != nil {
		// The socket deadline equals the context's and may fire first.
		if errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
			if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
				err = fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
			}
		}
		if ctxErr := ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
			err = fmt.Errorf("%w (%w)", ctxErr, err)
		}
		return fmt.Errorf("%s: %w", u, err)
	}
	_ = raw.SetDeadline(time.Time{})
	return nil
}

// handshake runs the greeting and TLS upgrade, then fn, aborting the
// session on any error.
func handshake(s *session, u *URI, tlsCfg *tls.Config, fn func(*session, *ExportInfo) error) error {
	oldstyle, err := s.greet()
	if err == nil {
		err = upgrade(s, tlsCfg, oldstyle)
	}
	if err == nil {
		info := oldstyle
		if info == nil {
			info = &ExportInfo{Handshake: s.style, BlockSizes: DefaultBlockSizes}
		}
		info.Name = u.Export
		info.TLS = s.tls
		err = fn(s, info)
	}
	if err != nil {
		s.abort()
	}
	return err
}

// upgrade does STARTTLS when TLS is configured. TLS once asked for is never
// dropped: an oldstyle or non-fixed server, or a refusal, is an error.
func upgrade(s *session, tlsCfg *tls.Config, oldstyle *ExportInfo) error {
	if tlsCfg == nil {
		return nil
	}
	if oldstyle != nil {
		return fmt.Errorf("%w: server speaks oldstyle, which has no TLS", ErrTLSUnavailable)
	}
	return s.startTLS(tlsCfg)
}

// enter ends the handshake for u.Export: GO, else LIST + EXPORT_NAME.
func enter(s *session, u *URI, cfg *config, info *ExportInfo) error {
	if s.style == HandshakeNewstyle {
		return s.exportName(u.Export, info)
	}
	if err := prepare(s, u, cfg); err != nil {
		return err
	}
	err := s.negotiateInfo(nbdproto.OptGo, u.Export, info)
	if err == nil || !errors.Is(err, ErrUnsupported) {
		return explainTLS(err, s)
	}
	// The server predates NBD_OPT_GO. Ask for the list first so that a
	// missing export is reported as such rather than as a closed socket.
	l, lerr := s.list()
	switch {
	case lerr == nil:
		if !slices.ContainsFunc(l, func(e ListEntry) bool { return e.Name == u.Export }) && u.Export != "" {
			return fmt.Errorf("%w: %q is not among the %d exports the server lists", ErrUnknownExport, u.Export, len(l))
		}
	case errors.Is(lerr, ErrShutdown) || errors.Is(lerr, ErrTLSRequired):
		return explainTLS(lerr, s)
	case !isOptionError(lerr):
		return lerr
	}
	return s.exportName(u.Export, info)
}

// prepare negotiates structured replies and metadata contexts for the
// userspace profile; the kernel profile asks for neither.
func prepare(s *session, u *URI, cfg *config) error {
	if cfg.profile != ProfileUserspace || s.structured {
		return nil
	}
	if err := s.structuredReplies(); err != nil {
		return err
	}
	if s.structured && len(cfg.metaContexts) > 0 {
		return s.setMetaContexts(u.Export, cfg.metaContexts)
	}
	return nil
}

func isOptionError(err error) bool {
	var oe *OptionError
	return errors.As(err, &oe)
}

// explainTLS adds the remedy to a TLS-required refusal on a plaintext session.
func explainTLS(err error, s *session) error {
	if err != nil && errors.Is(err, ErrTLSRequired) && !s.tls {
		return fmt.Errorf("%w; use an nbds:// or nbds+unix:// URI and give the CA (and client certificate if the server checks clients)", err)
	}
	return err
}

// fixFlags drops flags the spec says cannot apply: DF without structured
// replies, FAST_ZERO without WRITE_ZEROES, and every flag when HAS_FLAGS is
// missing.
func fixFlags(s *session, info *ExportInfo) {
	if !info.Flags.Has(FlagHasFlags) {
		info.Flags = 0
	}
	if !s.structured {
		info.Flags &^= FlagSendDF
	}
	if !info.Flags.Has(FlagSendWriteZeroes) {
		info.Flags &^= FlagSendFastZero
	}
	info.StructuredReplies = s.structured
	info.MetaContexts = s.metaContexts
}

// disconnect sends NBD_CMD_DISC on a stream in the transmission phase.
func disconnect(w net.Conn) {
	var req [nbdproto.RequestLen]byte
	be.PutUint32(req[0:], nbdproto.RequestMagic)
	be.PutUint16(req[6:], nbdproto.CmdDisc)
	_, _ = w.Write(req[:])
}

// File returns a duplicate of the connection's socket for handing to the
// kernel. It is only possible with ProfileKernel and without TLS: the kernel
// speaks plain simple-reply NBD. The caller closes the file; Close on the
// Conn is still needed to release the original descriptor.
func (c *Conn) File() (*os.File, error) {
	if c.profile != ProfileKernel {
		return nil, fmt.Errorf("%w: the socket of a %s-profile connection cannot go to the kernel", ErrBadArgument, c.profile)
	}
	if c.info.TLS {
		return nil, fmt.Errorf("%w: the kernel cannot speak TLS; a TLS export needs a userspace proxy", ErrBadArgument)
	}
	f, ok := c.raw.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("%w: connection of type %T has no file descriptor", ErrBadArgument, c.raw)
	}
	return f.File()
}

// KernelTLS moves the connection's TLS session into the kernel's TLS
// layer (kTLS) and returns a duplicate of the socket for the kernel, as
// File does for a plaintext connection: the kernel then speaks NBD over a
// socket that encrypts and decrypts by itself, and no process relays.
// Only for a ProfileKernel connection dialled WithKernelTLS, in the
// transmission phase before anything was sent.
//
// Everything that can fail in this process (the dup of the socket) is
// done before the session moves, and nothing after. Once the session has
// moved, or partly moved (InKernel), the Conn never touches the TLS
// session again: Stream refuses and Close only closes the socket, so
// crypto/tls can never encrypt under the kernel's keys and sequence
// numbers. On an error with InKernel false the session is unchanged and
// Stream can still carry it (e.g. through a relay); with InKernel true
// the Conn can only be closed. The caller closes the file; Close on the
// Conn is still needed.
func (c *Conn) KernelTLS() (*os.File, *ktls.Info, error) {
	if c.profile != ProfileKernel || !c.info.TLS || c.rec == nil || c.kernelTLS {
		return nil, nil, fmt.Errorf("%w: kernel TLS needs a TLS connection dialled with the kernel profile and WithKernelTLS", ErrBadArgument)
	}
	tc, ok := c.stream.(*tls.Conn)
	if !ok {
		return nil, nil, fmt.Errorf("%w: connection of type %T is not a TLS session", ErrBadArgument, c.stream)
	}
	file, err := socketFile(c.raw)
	if err != nil {
		c.rec.Release() // the session stays in userspace
		return nil, nil, fmt.Errorf("socket for the kernel: %w", err)
	}
	info, err := offloadTLS(tc, c.rec)
	if err != nil {
		file.Close()
		if errors.Is(err, ktls.ErrUnsupported) || errors.Is(err, ktls.ErrUnavailable) {
			c.rec.Release()
		} else {
			// ErrBroken, or anything Offload does not promise left
			// the session unchanged: treat it as the kernel's.
			c.kernelTLS = true
		}
		return nil, nil, err
	}
	c.kernelTLS = true
	return file, info, nil
}

// InKernel reports whether KernelTLS moved the TLS session into the
// kernel, wholly or partly. The session is then never this process's
// again: Stream refuses, and a fallback needs a fresh connection.
func (c *Conn) InKernel() bool { return c.kernelTLS }

// Seams for tests: the offload, and the dup of the socket for the kernel
// (which fails with EMFILE or ENFILE when descriptors run out).
var (
	offloadTLS = ktls.Offload
	socketFile = func(raw net.Conn) (*os.File, error) {
		f, ok := raw.(interface{ File() (*os.File, error) })
		if !ok {
			return nil, fmt.Errorf("%w: connection of type %T has no file descriptor", ErrBadArgument, raw)
		}
		return f.File()
	}
)

// Stream returns the connection the protocol is spoken over: the socket, or
// the TLS session wrapping it. With ProfileKernel and TLS this is what a
// relay carries to the kernel; after taking it the caller owns it and must
// not also Close the Conn. It refuses once the session is in the kernel
// (InKernel): writing or closing it would reuse the kernel's nonces.
func (c *Conn) Stream() (net.Conn, error) {
	if c.kernelTLS {
		return nil, fmt.Errorf("%w: the TLS session is in the kernel; it cannot be used from this process", ErrBadArgument)
	}
	return c.stream, nil
}

// SyscallConn exposes the raw socket, e.g. to set socket options before the
// hand-off.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.raw.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%w: connection of type %T has no file descriptor", ErrBadArgument, c.raw)
	}
	return sc.SyscallConn()
}

// Close ends the connection. With ProfileUserspace it waits for requests in
// flight, sends NBD_CMD_DISC and closes; with ProfileKernel it only closes
// this process's descriptor (a kernel that took the socket keeps its own).
func (c *Conn) Close() error {
	if c.tx != nil {
		return c.tx.close()
	}
	if c.rec != nil {
		c.rec.Release() // forgets the secrets (a no-op after an offload)
	}
	if c.kernelTLS {
		// The session is the kernel's: a close_notify from crypto/tls
		// would go through its record layer as data.
		return c.raw.Close()
	}
	err := c.stream.Close()
	if c.raw != c.stream {
		_ = c.raw.Close()
	}
	return err
}
