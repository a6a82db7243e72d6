// SPDX-License-Identifier: Apache-2.0

package crypt

import (
	"context"
	"fmt"
)

// SecretPassphraseKey is the node-stage Secret key holding a volume's
// passphrase.
const SecretPassphraseKey = "encryptionPassphrase"

// MaxPassphrase bounds a passphrase in bytes (cryptsetup accepts more from
// a key file, but a passphrase this long is already 32 Kibit).
const MaxPassphrase = 4096

// KeySource returns the passphrase of a volume. The Secret source reads it
// from the node-stage secret; a KMS source would use secrets only for its
// credentials. Implementations return ErrNoKey (wrapped) when they have no
// passphrase, ErrBadKey when it is unusable, and never put the passphrase
// in an error.
type KeySource interface {
	Passphrase(ctx context.Context, volumeID string, secrets map[string]string) ([]byte, error)
}

// SecretKeySource reads the passphrase from the node-stage secret key
// SecretPassphraseKey, byte for byte (a trailing newline is part of it).
type SecretKeySource struct{}

var _ KeySource = SecretKeySource{}

// Passphrase returns a copy of the secret's passphrase.
func (SecretKeySource) Passphrase(_ context.Context, _ string, secrets map[string]string) ([]byte, error) {
	p, ok := secrets[SecretPassphraseKey]
	if !ok {
		return nil, fmt.Errorf("node-stage secret has no key %q: %w", SecretPassphraseKey, ErrNoKey)
	}
	if err := CheckPassphrase([]byte(p)); err != nil {
		return nil, fmt.Errorf("node-stage secret key %q: %w", SecretPassphraseKey, err)
	}
	return []byte(p), nil
}

// CheckPassphrase refuses empty and overlong passphrases.
func CheckPassphrase(p []byte) error {
	switch {
	case len(p) == 0:
		return fmt.Errorf("empty: %w", ErrBadKey)
	case len(p) > MaxPassphrase:
		return fmt.Errorf("%d bytes, more than %d: %w", len(p), MaxPassphrase, ErrBadKey)
	}
	return nil
}

// Wipe overwrites a passphrase buffer once it is no longer needed.
func Wipe(p []byte) {
	for i := range p {
		p[i] = 0
	}
}
