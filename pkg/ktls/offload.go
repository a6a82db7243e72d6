// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// Errors of Offload. With ErrUnsupported and ErrUnavailable nothing was
// changed: the tls.Conn can go on in userspace. ErrBroken means the
// session is unusable (the socket was partly handed to the kernel, or the
// drain probe consumed data) and must be closed.
var (
	// ErrUnsupported: this session cannot be moved (version, cipher
	// suite, or its state could not be proven).
	ErrUnsupported = errors.New("ktls: session cannot be offloaded")
	// ErrUnavailable: the kernel has no TLS layer for it (no tls module,
	// or the cipher is not built).
	ErrUnavailable = errors.New("ktls: kernel TLS unavailable")
	// ErrBroken: the socket is half offloaded and unusable.
	ErrBroken = errors.New("ktls: socket left half offloaded")
	// ErrUndrained: crypto/tls held received data that the kernel would
	// never see (the peer sent what nobody asked for). It comes wrapped
	// with ErrBroken: the probe that found it consumed a byte.
	ErrUndrained = errors.New("ktls: crypto/tls holds unread data")
)

// Info describes an offloaded session.
type Info struct {
	// Version is tls.VersionTLS12 or tls.VersionTLS13.
	Version uint16
	// CipherSuite is the IANA ID of the negotiated suite.
	CipherSuite uint16
	// TxSeq and RxSeq are the record sequence numbers the kernel starts at.
	TxSeq, RxSeq uint64
}

// state is everything Offload derived for the kernel.
type state struct {
	version uint16
	suite   suite
	tx, rx  trafficKeys
	txSeq   uint64
	rxSeq   uint64
}

func (s *state) wipe() {
	s.tx.wipe()
	s.rx.wipe()
}

// Offload moves the session tc, made over r (tls.Client(r, cfg) with
// cfg.KeyLogWriter = r.KeyLog(), and r.HandshakeDone called after the
// handshake), into the kernel. Call it when the peer has nothing in
// flight (e.g. after the last reply of a request/response exchange). On
// success the socket (r.Conn) carries the session in the kernel: tc must
// then never be used or closed again (closing it would write a
// close_notify through the kernel's record layer); close r.Conn instead
// once the socket has been handed on.
func Offload(tc *tls.Conn, r *Recorder) (*Info, error) {
	if r.released.Load() {
		return nil, fmt.Errorf("%w: recorder released", ErrUnsupported)
	}
	sc, ok := r.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%w: connection of type %T has no socket", ErrUnsupported, r.Conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	st, err := r.prepare(tc)
	if err != nil {
		return nil, err
	}
	defer st.wipe()
	if err := install(raw, st); err != nil {
		return nil, err
	}
	info := &Info{Version: st.version, CipherSuite: tc.ConnectionState().CipherSuite, TxSeq: st.txSeq, RxSeq: st.rxSeq}
	r.Release()
	return info, nil
}

// prepare derives and proves the kernel state of the session.
func (r *Recorder) prepare(tc *tls.Conn) (*state, error) {
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete {
		return nil, fmt.Errorf("%w: handshake not complete", ErrUnsupported)
	}
	su, ok := suites[cs.CipherSuite]
	if !ok {
		return nil, fmt.Errorf("%w: cipher suite %s", ErrUnsupported, tls.CipherSuiteName(cs.CipherSuite))
	}
	if cs.Version != tls.VersionTLS12 && cs.Version != tls.VersionTLS13 {
		return nil, fmt.Errorf("%w: %s", ErrUnsupported, tls.VersionName(cs.Version))
	}
	if err := r.drained(tc); err != nil {
		return nil, err
	}
	r.rmu.Lock()
	defer r.rmu.Unlock()
	r.wmu.Lock()
	defer r.wmu.Unlock()
	switch {
	case !r.marked:
		return nil, fmt.Errorf("%w: handshake end not recorded", ErrUnsupported)
	case r.rd.bad != nil:
		return nil, fmt.Errorf("%w: received stream: %w", ErrUnsupported, r.rd.bad)
	case r.wr.bad != nil:
		return nil, fmt.Errorf("%w: sent stream: %w", ErrUnsupported, r.wr.bad)
	case !r.rd.atBoundary() || !r.wr.atBoundary():
		return nil, fmt.Errorf("%w: a record is partly transferred", ErrUnsupported)
	case !r.wr.helloOK || r.wr.helloTyp != handshakeClientHello:
		return nil, fmt.Errorf("%w: no ClientHello seen", ErrUnsupported)
	}
	st := &state{version: cs.Version, suite: su}
	cr := r.wr.hello[:]
	var err error
	if cs.Version == tls.VersionTLS13 {
		st.txSeq, st.rxSeq = r.wr.records-r.markWritten, r.rd.records-r.markRead
		err = r.derive13(st, cr)
	} else {
		st.txSeq, st.rxSeq = r.wr.sinceCCS, r.rd.sinceCCS
		err = r.derive12(st, cr)
	}
	if err != nil {
		st.wipe()
		return nil, err
	}
	// Prove keys and sequence numbers on the last record of each
	// direction: AEAD authentication fails on any mistake.
	if err := st.open(r.wr.last, st.tx, st.txSeq, true); err != nil {
		st.wipe()
		return nil, fmt.Errorf("%w: derived send state does not open the last record sent: %w", ErrUnsupported, err)
	}
	if err := st.open(r.rd.last, st.rx, st.rxSeq, false); err != nil {
		st.wipe()
		return nil, fmt.Errorf("%w: derived receive state does not open the last record received: %w", ErrUnsupported, err)
	}
	return st, nil
}

func (r *Recorder) derive13(st *state, cr []byte) error {
	cts, err := r.keys.secret("CLIENT_TRAFFIC_SECRET_0", cr)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	defer clear(cts)
	sts, err := r.keys.secret("SERVER_TRAFFIC_SECRET_0", cr)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	defer clear(sts)
	if st.tx, err = keys13(st.suite, cts); err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	if st.rx, err = keys13(st.suite, sts); err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return nil
}

func (r *Recorder) derive12(st *state, cr []byte) error {
	if !r.rd.helloOK || r.rd.helloTyp != handshakeServerHello {
		return fmt.Errorf("%w: no ServerHello seen", ErrUnsupported)
	}
	ms, err := r.keys.secret("CLIENT_RANDOM", cr)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	defer clear(ms)
	st.tx, st.rx = keys12(st.suite, ms, cr, r.rd.hello[:])
	return nil
}

// drained proves that crypto/tls holds no received plaintext: a read
// while the Recorder refuses to read must reach the Recorder. (The
// Recorder never hands crypto/tls bytes past a record boundary, so no
// undecrypted bytes can be buffered either.)
func (r *Recorder) drained(tc *tls.Conn) error {
	r.rmu.Lock()
	r.probe = true
	r.rmu.Unlock()
	var b [1]byte
	n, err := tc.Read(b[:])
	r.rmu.Lock()
	r.probe = false
	r.rmu.Unlock()
	if n > 0 {
		return fmt.Errorf("%w: %w: the peer sent data nobody asked for", ErrBroken, ErrUndrained)
	}
	if !errors.Is(err, errProbe) {
		return fmt.Errorf("%w: probe read: %w", ErrUnsupported, err)
	}
	return nil
}

// aead returns the AES-GCM AEAD for k.
func aead(k trafficKeys) (cipher.AEAD, error) {
	b, err := aes.NewCipher(k.key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// open authenticates and decrypts the record rec (header and body), the
// one before sequence number next, with k. Sent records also prove that
// TLS 1.2's explicit nonce is the sequence number, as the kernel will
// continue it.
func (s *state) open(rec []byte, k trafficKeys, next uint64, sent bool) error {
	if next == 0 {
		return errors.New("no record under these keys yet")
	}
	if len(rec) < recordHeaderLen {
		return errors.New("no record kept")
	}
	seq := next - 1
	a, err := aead(k)
	if err != nil {
		return err
	}
	hdr, body := rec[:recordHeaderLen], rec[recordHeaderLen:]
	var nonce [12]byte
	var plain []byte
	if s.version == tls.VersionTLS13 {
		nonce = k.iv
		for i := 0; i < 8; i++ {
			nonce[4+i] ^= byte(seq >> (56 - 8*i))
		}
		plain, err = a.Open(nil, nonce[:], body, hdr)
	} else {
		if len(body) < 8+a.Overhead() {
			return errors.New("record too short")
		}
		explicit := binary.BigEndian.Uint64(body[:8])
		if sent && explicit != seq {
			return fmt.Errorf("explicit nonce %d is not the sequence number %d", explicit, seq)
		}
		copy(nonce[:4], k.iv[:4])
		copy(nonce[4:], body[:8])
		var ad [13]byte
		binary.BigEndian.PutUint64(ad[:8], seq)
		ad[8], ad[9], ad[10] = hdr[0], hdr[1], hdr[2]
		binary.BigEndian.PutUint16(ad[11:], uint16(len(body)-8-a.Overhead()))
		plain, err = a.Open(nil, nonce[:], body[8:], ad[:])
	}
	clear(plain)
	return err
}
