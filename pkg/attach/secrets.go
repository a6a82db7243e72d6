// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// storedTLS is the TLS material kept for a TLS volume. It holds secrets: the
// directory is 0700 and each file 0600, and nothing here is ever logged.
type storedTLS struct {
	CA   []byte `json:"ca,omitempty"`
	Cert []byte `json:"cert,omitempty"`
	Key  []byte `json:"key,omitempty"`
	// ServerName and Insecure keep the verification settings.
	ServerName string `json:"serverName,omitempty"`
	Insecure   bool   `json:"insecure,omitempty"`
}

func (a *Attacher) tlsPath(volumeID string) string {
	h := sha256.Sum256([]byte(volumeID))
	return filepath.Join(a.opts.SecretsDir, hex.EncodeToString(h[:16])+".tls.json")
}

// saveTLS keeps a volume's TLS material for reconnects by a later process.
// Material given as file paths is read now, so a later process does not
// depend on those paths.
func (a *Attacher) saveTLS(volumeID string, o *nbd.TLSOptions) error {
	if a.opts.SecretsDir == "" {
		return nil
	}
	st := storedTLS{CA: o.CAPEM, Cert: o.CertPEM, Key: o.KeyPEM, ServerName: o.ServerName, Insecure: o.InsecureSkipVerify}
	for _, f := range []struct {
		path string
		dst  *[]byte
	}{{o.CAFile, &st.CA}, {o.CertFile, &st.Cert}, {o.KeyFile, &st.Key}} {
		if f.path == "" {
			continue
		}
		b, err := os.ReadFile(f.path)
		if err != nil {
			return fmt.Errorf("keep TLS material: %w", err)
		}
		*f.dst = b
	}
	if err := os.MkdirAll(a.opts.SecretsDir, 0o700); err != nil {
		return fmt.Errorf("keep TLS material: %w", err)
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(a.opts.SecretsDir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("keep TLS material: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("keep TLS material: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("keep TLS material: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), a.tlsPath(volumeID))
}

// loadTLS returns the kept TLS material of a volume, or nil.
func (a *Attacher) loadTLS(volumeID string) *nbd.TLSOptions {
	if a.opts.SecretsDir == "" {
		return nil
	}
	b, err := os.ReadFile(a.tlsPath(volumeID))
	if err != nil {
		return nil
	}
	var st storedTLS
	if json.Unmarshal(b, &st) != nil {
		return nil
	}
	return &nbd.TLSOptions{CAPEM: st.CA, CertPEM: st.Cert, KeyPEM: st.Key, ServerName: st.ServerName, InsecureSkipVerify: st.Insecure}
}

// removeTLS forgets a volume's TLS material (and its recorded mode).
func (a *Attacher) removeTLS(volumeID string) {
	if a.opts.SecretsDir == "" {
		return
	}
	_ = os.Remove(a.tlsPath(volumeID)) // a missing file is fine; nothing depends on it
	_ = os.Remove(tlsModePath(a.opts.SecretsDir, volumeID))

}

// tlsModePath is where the TLS mode of a volume's connections is recorded
// (no secret: "kernel", or "relay" and the reason on a second line).
func tlsModePath(dir, volumeID string) string {
	h := sha256.Sum256([]byte(volumeID))
	return filepath.Join(dir, hex.EncodeToString(h[:16])+".mode")
}

// recordTLSMode records how a volume's last connections handed to the
// kernel are encrypted, for `nbd-csi devices` (best effort: the plugin's
// metrics and Events are the authoritative view).
func (a *Attacher) recordTLSMode(volumeID, mode, reason string) {
	if a.opts.SecretsDir == "" || mode == "" {
		return
	}
	if os.MkdirAll(a.opts.SecretsDir, 0o700) != nil {
		return
	}
	tmp, err := os.CreateTemp(a.opts.SecretsDir, ".tmp-mode-*")
	if err != nil {
		return
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.WriteString(mode + "\n" + reason + "\n")
	if cerr := tmp.Close(); werr != nil || cerr != nil {
		return
	}
	_ = os.Rename(tmp.Name(), tlsModePath(a.opts.SecretsDir, volumeID))
}

// maxModeFile bounds what ReadTLSMode reads.
const maxModeFile = 4096

// ReadTLSMode returns the TLS mode recorded for a volume under secretsDir
// (the node plugin's --state-dir/tls): driver.TLSKernel or
// driver.TLSRelay, and for the relay why the kernel could not take the
// session. Empty when nothing is recorded (a plaintext volume).
func ReadTLSMode(secretsDir, volumeID string) (mode, reason string, err error) {
	f, err := os.Open(tlsModePath(secretsDir, volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxModeFile))
	if err != nil {
		return "", "", err
	}
	mode, reason, _ = strings.Cut(string(b), "\n")
	return mode, strings.TrimSuffix(reason, "\n"), nil
}
