// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// linux/tls.h (not in x/sys/unix).
const (
	solTLS = unix.SOL_TLS
	tlsTX  = 1
	tlsRX  = 2

	tls12Version = 0x0303
	tls13Version = 0x0304
)

// cryptoInfo encodes the kernel's struct tls12_crypto_info_aes_gcm_128 or
// _256 (linux/tls.h): u16 version, u16 cipher_type, iv[8], key[16|32],
// salt[4], rec_seq[8]; no padding (every member after the header is a
// byte array).
func cryptoInfo(st *state, k trafficKeys, seq uint64) []byte {
	b := make([]byte, 4+8+len(k.key)+4+8)
	v := uint16(tls12Version)
	if st.version == 0x0304 {
		v = tls13Version
	}
	binary.NativeEndian.PutUint16(b[0:], v)
	binary.NativeEndian.PutUint16(b[2:], st.suite.kcipher)
	iv := b[4:12]
	key := b[12 : 12+len(k.key)]
	salt := b[12+len(k.key) : 16+len(k.key)]
	recSeq := b[16+len(k.key):]
	copy(salt, k.iv[:4])
	if st.version == 0x0304 {
		copy(iv, k.iv[4:])
	} else {
		// TLS 1.2 AES-GCM: the explicit nonce, which Go (and the
		// kernel) keep equal to the sequence number.
		binary.BigEndian.PutUint64(iv, seq)
	}
	copy(key, k.key)
	binary.BigEndian.PutUint64(recSeq, seq)
	return b
}

// install attaches the TLS ULP and programs TX then RX.
func install(raw syscall.RawConn, st *state) error {
	tx := cryptoInfo(st, st.tx, st.txSeq)
	rx := cryptoInfo(st, st.rx, st.rxSeq)
	defer clear(tx)
	defer clear(rx)
	var err error
	cerr := raw.Control(func(fd uintptr) {
		s := int(fd)
		if e := unix.SetsockoptString(s, unix.SOL_TCP, unix.TCP_ULP, "tls"); e != nil {
			err = fmt.Errorf("%w: setsockopt TCP_ULP tls: %w", ErrUnavailable, e)
			if errors.Is(e, unix.ENOENT) {
				err = fmt.Errorf("%w (no tls module)", err)
			}
			return
		}
		if e := setsockoptBytes(s, solTLS, tlsTX, tx); e != nil {
			// Without TX the ULP passes data through unchanged.
			err = fmt.Errorf("%w: setsockopt TLS_TX (%s): %w", ErrUnavailable, st.suite.name, e)
			if errors.Is(e, unix.ENOENT) {
				err = fmt.Errorf("%w (the kernel's crypto API has no %s: is the gcm module available?)", err, aeadName(st))
			}
			return
		}
		if e := setsockoptBytes(s, solTLS, tlsRX, rx); e != nil {
			err = fmt.Errorf("%w: setsockopt TLS_RX (TX is already installed): %w", ErrBroken, e)
		}
	})
	if cerr != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, cerr)
	}
	return err
}

// Available reports whether the kernel offers the tls ULP, nil if so, else
// an error wrapping ErrUnavailable: setsockopt TCP_ULP "tls" on a fresh,
// unconnected TCP socket looks the ULP up (and loads the tls module on
// demand where the process may), then fails with ENOTCONN in the module's
// init (or another error, or success, on other kernels); only ENOENT means
// no tls ULP. (/proc/sys/net/ipv4/tcp_available_ulp lists only loaded
// ULPs, so it cannot tell a module that would load on demand.) A yes is
// kept for the process (a module unloaded later makes the offload itself
// fail, as before); a no for a minute (each probe may make the kernel run
// modprobe), so a module installed later is found without a restart. A
// session for a kernel that cannot take it need not prefer TLS 1.2
// (docs/tls.md).
func Available() error {
	ulp.mu.Lock()
	defer ulp.mu.Unlock()
	if ulp.found {
		return nil
	}
	if ulp.err != nil && time.Since(ulp.at) < ulpRetry {
		return ulp.err
	}
	ulp.err, ulp.at = probeULP(), time.Now()
	ulp.found = ulp.err == nil
	return ulp.err
}

// ulpRetry is how long Available keeps a no.
const ulpRetry = time.Minute

var ulp struct {
	mu    sync.Mutex
	found bool
	err   error
	at    time.Time
}

func probeULP() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return fmt.Errorf("%w: probe socket: %w", ErrUnavailable, err)
	}
	defer unix.Close(fd)
	// ENOENT is the one answer of a lookup that found nothing; any other
	// (ENOTCONN, or ENOTSUPP/EINVAL from older modules' init) means the
	// ULP is there and refused this unconnected socket: the offload
	// itself then decides.
	if err := unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls"); errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("%w: the kernel has no tls ULP (no tls module)", ErrUnavailable)
	}
	return nil
}

// setsockoptBytes sets a socket option from b itself: converting the key
// material to a string (unix.SetsockoptString) would copy it into memory
// nobody can clear.
func setsockoptBytes(fd, level, opt int, b []byte) error {
	if len(b) == 0 {
		return unix.EINVAL
	}
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// aeadName is the kernel crypto API name of st's AEAD.
func aeadName(*state) string { return "gcm(aes)" }
