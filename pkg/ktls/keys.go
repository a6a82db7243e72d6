// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"sync"
)

// maxKeyLog bounds what the key log keeps: a TLS 1.3 client logs four
// lines of under 200 bytes, a TLS 1.2 client one.
const maxKeyLog = 4096

// keyLog is a tls.Config.KeyLogWriter that keeps the NSS key log lines of
// one connection in memory. It never prints them. Its buffer is allocated
// once at its full size, so appending never moves the secrets and wipe
// clears the only copy.
type keyLog struct {
	mu  sync.Mutex
	buf []byte
}

// Write keeps p (up to maxKeyLog bytes in all).
func (k *keyLog) Write(p []byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.buf == nil {
		k.buf = make([]byte, 0, maxKeyLog)
	}
	if len(p) > cap(k.buf)-len(k.buf) {
		return 0, errors.New("ktls: key log full")
	}
	k.buf = append(k.buf, p...) // within capacity: never reallocates
	return len(p), nil
}

func (k *keyLog) wipe() {
	k.mu.Lock()
	clear(k.buf[:cap(k.buf)])
	k.buf = nil
	k.mu.Unlock()
}

// secret returns the secret logged under label for clientRandom.
func (k *keyLog) secret(label string, clientRandom []byte) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var found []byte
	for line := range bytes.SplitSeq(k.buf, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) != 3 || string(f[0]) != label {
			continue
		}
		cr := make([]byte, hex.DecodedLen(len(f[1])))
		if _, err := hex.Decode(cr, f[1]); err != nil || !bytes.Equal(cr, clientRandom) {
			continue
		}
		s := make([]byte, hex.DecodedLen(len(f[2])))
		if _, err := hex.Decode(s, f[2]); err != nil {
			return nil, fmt.Errorf("key log line %s: bad hex", label)
		}
		found = s
	}
	if found == nil {
		return nil, fmt.Errorf("key log has no %s for this connection", label)
	}
	return found, nil
}

// suite describes an AEAD cipher suite the kernel can take over.
type suite struct {
	name    string
	keyLen  int
	hash    func() hash.Hash
	kcipher uint16 // TLS_CIPHER_* of linux/tls.h
}

const (
	cipherAESGCM128 = 51
	cipherAESGCM256 = 52
)

// suites are the cipher suites Offload supports, by IANA ID.
var suites = map[uint16]suite{
	tls.TLS_AES_128_GCM_SHA256:                  {"TLS_AES_128_GCM_SHA256", 16, sha256.New, cipherAESGCM128},
	tls.TLS_AES_256_GCM_SHA384:                  {"TLS_AES_256_GCM_SHA384", 32, sha512.New384, cipherAESGCM256},
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256:   {"ECDHE_RSA_AES_128_GCM_SHA256", 16, sha256.New, cipherAESGCM128},
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: {"ECDHE_ECDSA_AES_128_GCM_SHA256", 16, sha256.New, cipherAESGCM128},
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384:   {"ECDHE_RSA_AES_256_GCM_SHA384", 32, sha512.New384, cipherAESGCM256},
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384: {"ECDHE_ECDSA_AES_256_GCM_SHA384", 32, sha512.New384, cipherAESGCM256},
	tls.TLS_RSA_WITH_AES_128_GCM_SHA256:         {"RSA_AES_128_GCM_SHA256", 16, sha256.New, cipherAESGCM128},
	tls.TLS_RSA_WITH_AES_256_GCM_SHA384:         {"RSA_AES_256_GCM_SHA384", 32, sha512.New384, cipherAESGCM256},
}

// OffloadCipherSuites are the TLS 1.2 cipher suites (in preference order)
// whose sessions Offload can move into the kernel; a tls.Config meant for
// offload should offer only these for TLS 1.2.
var OffloadCipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
}

// trafficKeys is one direction's AEAD key and 12-byte nonce base. For
// TLS 1.2 AES-GCM only the first 4 bytes of iv (the implicit salt) are
// secret; the explicit part is the sequence number.
type trafficKeys struct {
	key []byte
	iv  [12]byte
}

func (t *trafficKeys) wipe() {
	clear(t.key)
	clear(t.iv[:])
}

// expandLabel is HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
func expandLabel(h func() hash.Hash, secret []byte, label string, n int) ([]byte, error) {
	full := "tls13 " + label
	info := make([]byte, 0, 4+len(full))
	info = append(info, byte(n>>8), byte(n), byte(len(full)))
	info = append(info, full...)
	info = append(info, 0) // empty context
	return hkdf.Expand(h, secret, string(info), n)
}

// keys13 derives a TLS 1.3 direction's key and IV from its traffic secret
// (RFC 8446 §7.3).
func keys13(s suite, secret []byte) (trafficKeys, error) {
	var t trafficKeys
	key, err := expandLabel(s.hash, secret, "key", s.keyLen)
	if err != nil {
		return t, err
	}
	iv, err := expandLabel(s.hash, secret, "iv", 12)
	if err != nil {
		return t, err
	}
	t.key = key
	copy(t.iv[:], iv)
	clear(iv)
	return t, nil
}

// prf12 is the TLS 1.2 PRF (RFC 5246 §5): P_hash(secret, label + seed).
func prf12(h func() hash.Hash, secret []byte, label string, seed []byte, n int) []byte {
	ls := append([]byte(label), seed...)
	out := make([]byte, 0, n+64)
	mac := hmac.New(h, secret)
	mac.Write(ls)
	a := mac.Sum(nil) // A(1)
	for len(out) < n {
		mac.Reset()
		mac.Write(a)
		mac.Write(ls)
		out = mac.Sum(out)
		mac.Reset()
		mac.Write(a)
		a = mac.Sum(a[:0])
	}
	return out[:n]
}

// keys12 derives both directions' AES-GCM keys and salts from a TLS 1.2
// master secret (RFC 5246 §6.3; AEAD suites have no MAC keys and a 4-byte
// fixed IV, RFC 5288 §3).
func keys12(s suite, master, clientRandom, serverRandom []byte) (client, server trafficKeys) {
	seed := append(append([]byte{}, serverRandom...), clientRandom...)
	kb := prf12(s.hash, master, "key expansion", seed, 2*s.keyLen+2*4)
	client.key = append([]byte{}, kb[:s.keyLen]...)
	server.key = append([]byte{}, kb[s.keyLen:2*s.keyLen]...)
	copy(client.iv[:4], kb[2*s.keyLen:])
	copy(server.iv[:4], kb[2*s.keyLen+4:])
	clear(kb)
	return client, server
}
