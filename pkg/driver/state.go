// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// VolumeRecord is what the node remembers about a staged volume.
// NodeUnstageVolume and NodePublishVolume receive no volume context, and a
// restarted plugin must know what it staged, so this is written atomically
// to disk at stage time and removed at unstage.
type VolumeRecord struct {
	// VolumeID is the CSI volume ID.
	VolumeID string `json:"volumeID"`
	// StagingPath is where the volume is staged.
	StagingPath string `json:"stagingPath"`
	// Device is the block device at stage time (the kernel may renumber
	// after a reboot; the attacher finds it by volume ID).
	Device string `json:"device"`
	// VolumeContext is the volume context the volume was staged with.
	VolumeContext map[string]string `json:"volumeContext"`
	// Block is true for raw block volumes, false for filesystems.
	Block bool `json:"block"`
	// FSType and MountFlags describe the staging mount.
	FSType     string   `json:"fsType,omitempty"`
	MountFlags []string `json:"mountFlags,omitempty"`
	// ReadOnly is true for reader-only access modes.
	ReadOnly bool `json:"readOnly"`
	// AccessMode is the CSI access mode name.
	AccessMode string `json:"accessMode"`
	// TLS tells whether the stage used TLS material (never stored here).
	TLS bool `json:"tls"`
	// StagedAt is when the volume was staged.
	StagedAt time.Time `json:"stagedAt"`
	// Targets are the paths the volume is published at.
	Targets []string `json:"targets,omitempty"`
}

// stateStore keeps one JSON file per volume in a directory.
type stateStore struct{ dir string }

func newStateStore(dir string) (*stateStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	return &stateStore{dir: dir}, nil
}

// path names the record file by a hash of the volume ID: volume IDs may hold
// any character and be long.
func (s *stateStore) path(volumeID string) string {
	h := sha256.Sum256([]byte(volumeID))
	return filepath.Join(s.dir, hex.EncodeToString(h[:16])+".json")
}

// errNoRecord means no record exists for the volume.
var errNoRecord = errors.New("no state record")

// Get reads the record of a volume.
func (s *stateStore) Get(volumeID string) (*VolumeRecord, error) {
	b, err := os.ReadFile(s.path(volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNoRecord
	}
	if err != nil {
		return nil, fmt.Errorf("read state record: %w", err)
	}
	var r VolumeRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("state record %s is corrupt: %w", s.path(volumeID), err)
	}
	if r.VolumeID != volumeID {
		return nil, fmt.Errorf("state record %s belongs to volume %q", s.path(volumeID), r.VolumeID)
	}
	return &r, nil
}

// Put writes a record atomically: temporary file, fsync, rename, fsync of
// the directory.
func (s *stateStore) Put(r *VolumeRecord) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	final := s.path(r.VolumeID)
	tmp, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("write state record: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write state record: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync state record: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("rename state record: %w", err)
	}
	if d, err := os.Open(s.dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// Delete removes a record; a missing one is fine.
func (s *stateStore) Delete(volumeID string) error {
	if err := os.Remove(s.path(volumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove state record: %w", err)
	}
	return nil
}

// List reads every record. Corrupt files are returned as errors alongside
// the good records, so one bad file does not hide the others.
func (s *stateStore) List() ([]*VolumeRecord, []error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, []error{err}
	}
	var out []*VolumeRecord
	var errs []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.dir, e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var r VolumeRecord
		if err := json.Unmarshal(b, &r); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.Name(), err))
			continue
		}
		out = append(out, &r)
	}
	return out, errs
}
