// SPDX-License-Identifier: Apache-2.0

package store

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bucket names of the embedded store.
var (
	bucketExports = []byte("exports")     // export key → Export
	bucketVolumes = []byte("volumes")     // volume ID → export key
	bucketNames   = []byte("names")       // volume name → volume ID
	bucketHolders = []byte("attachments") // volume ID → []Attachment
	// bucketFree indexes Available exports by server and size, so a claim
	// finds the smallest fitting one without reading the whole pool:
	// server \x00 size (8 bytes, big-endian) name → export key.
	bucketFree = []byte("free")
)

// freeKey is an export's key in bucketFree.
func freeKey(e *Export) []byte {
	k := make([]byte, 0, len(e.Server)+1+8+len(e.Name))
	k = append(k, e.Server...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, e.Size)
	return append(k, e.Name...)
}

// putExport stores e and keeps the free index in step with its phase and
// size; old is the previous record (nil if none).
func putExport(tx *bolt.Tx, old, e *Export) error {
	free := tx.Bucket(bucketFree)
	if old != nil && old.Phase == PhaseAvailable {
		if err := free.Delete(freeKey(old)); err != nil {
			return err
		}
	}
	if e.Phase == PhaseAvailable {
		if err := free.Put(freeKey(e), []byte(e.Key())); err != nil {
			return err
		}
	}
	return putJSON(tx.Bucket(bucketExports), e.Key(), e)
}

// Bolt is the embedded store: one file, bbolt transactions. A second
// process opening the same file waits for the first (bbolt's file lock), so
// only one controller uses it at a time.
type Bolt struct {
	db *bolt.DB
}

var _ Store = (*Bolt)(nil)

// OpenBolt opens (creating) the store file at path.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 10 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		hadIndex := tx.Bucket(bucketFree) != nil
		for _, b := range [][]byte{bucketExports, bucketVolumes, bucketNames, bucketHolders, bucketFree} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		if hadIndex {
			return nil
		}
		// A store written before the free index existed: build it.
		return tx.Bucket(bucketExports).ForEach(func(k, v []byte) error {
			var e Export
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("corrupt record %q: %w", k, err)
			}
			if e.Phase != PhaseAvailable {
				return nil
			}
			return tx.Bucket(bucketFree).Put(freeKey(&e), k)
		})
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialise store: %w", err)
	}
	return &Bolt{db: db}, nil
}

// OpenBoltReadOnly opens the store for reading (e.g. `nbd-csi exports`).
func OpenBoltReadOnly(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 10 * time.Second, ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// Close closes the file.
func (b *Bolt) Close() error { return b.db.Close() }

func getJSON(bk *bolt.Bucket, key string, v any) (bool, error) {
	raw := bk.Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("corrupt record %q: %w", key, err)
	}
	return true, nil
}

func putJSON(bk *bolt.Bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return bk.Put([]byte(key), raw)
}

// SyncExports records what one server lists now.
func (b *Bolt) SyncExports(server string, listed []Export, now time.Time) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketExports)
		seen := map[string]bool{}
		for _, l := range listed {
			l.Server = server
			key := l.Key()
			seen[key] = true
			var e Export
			found, err := getJSON(bk, key, &e)
			if err != nil {
				return err
			}
			var prev *Export
			if found {
				p := e
				prev = &p
			} else {
				e = Export{Server: server, Name: l.Name, Phase: PhaseAvailable}
			}
			e.Description, e.Size, e.Flags, e.ReadOnly, e.SeenAt = l.Description, l.Size, l.Flags, l.ReadOnly, now
			if e.Phase == PhaseMissing {
				e.Phase = PhaseAvailable
				if e.VolumeID != "" {
					e.Phase = PhaseBound
				}
			}
			if err := putExport(tx, prev, &e); err != nil {
				return err
			}
		}
		c := bk.Cursor()
		prefix := []byte(server + "\x00")
		for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
			if seen[string(k)] {
				continue
			}
			var e Export
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("corrupt record %q: %w", k, err)
			}
			if e.Phase != PhaseMissing {
				prev := e
				e.Phase = PhaseMissing
				if err := putExport(tx, &prev, &e); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// capacityError describes why no export fits (the slow path: it reads every
// available export of the server).
func capacityError(tx *bolt.Tx, req ClaimRequest) error {
	ce := &CapacityError{Wanted: req.MinSize}
	prefix := []byte(req.Server + "\x00")
	c := tx.Bucket(bucketFree).Cursor()
	for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
		var e Export
		if _, err := getJSON(tx.Bucket(bucketExports), string(v), &e); err != nil {
			return err
		}
		if req.Fits != nil && !req.Fits(&e) {
			continue
		}
		ce.Free++
		ce.LargestFree = max(ce.LargestFree, e.Size)
	}
	return ce
}

func hasPrefix(b, p []byte) bool { return len(b) >= len(p) && string(b[:len(p)]) == string(p) }

// Claim binds the smallest fitting available export to the volume.
func (b *Bolt) Claim(req ClaimRequest) (*Export, error) {
	var out *Export
	err := b.db.Update(func(tx *bolt.Tx) error {
		exports, volumes, names := tx.Bucket(bucketExports), tx.Bucket(bucketVolumes), tx.Bucket(bucketNames)
		if id := names.Get([]byte(req.VolumeName)); id != nil {
			key := volumes.Get(id)
			var e Export
			if found, err := getJSON(exports, string(key), &e); err != nil || !found {
				return fmt.Errorf("volume name %q points at a missing export: %v", req.VolumeName, err)
			}
			if e.Server != req.Server {
				return fmt.Errorf("%w: volume %q already exists on %s", ErrConflict, req.VolumeName, e.Server)
			}
			if e.Size < req.MinSize {
				return fmt.Errorf("%w: volume %q already exists with %d bytes, less than the %d requested", ErrConflict, req.VolumeName, e.Size, req.MinSize)
			}
			out = &e
			return nil
		}
		// Smallest first: walk the free index from the requested size up.
		var best *Export
		prefix := []byte(req.Server + "\x00")
		start := binary.BigEndian.AppendUint64(append([]byte(nil), prefix...), req.MinSize)
		c := tx.Bucket(bucketFree).Cursor()
		for k, v := c.Seek(start); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
			var e Export
			if found, err := getJSON(exports, string(v), &e); err != nil {
				return err
			} else if !found || e.Phase != PhaseAvailable {
				return fmt.Errorf("free index names %q, which is not available", v)
			}
			if req.Fits == nil || req.Fits(&e) {
				best = &e
				break
			}
		}
		if best == nil {
			return capacityError(tx, req)
		}
		prev := *best
		best.Phase, best.VolumeName, best.VolumeID = PhaseBound, req.VolumeName, req.VolumeID
		best.Wipe, best.KeepData, best.WipedTo = req.Wipe, req.KeepData, 0
		if req.VolumeContext != nil {
			best.VolumeContext = req.VolumeContext(best.Name)
		}
		if err := putExport(tx, &prev, best); err != nil {
			return err
		}
		if err := volumes.Put([]byte(req.VolumeID), []byte(best.Key())); err != nil {
			return err
		}
		if err := names.Put([]byte(req.VolumeName), []byte(req.VolumeID)); err != nil {
			return err
		}
		out = best
		return nil
	})
	return out, err
}

// Release unbinds the volume's export.
func (b *Bolt) Release(volumeID string) (*Export, error) {
	var out *Export
	err := b.db.Update(func(tx *bolt.Tx) error {
		exports, volumes, names := tx.Bucket(bucketExports), tx.Bucket(bucketVolumes), tx.Bucket(bucketNames)
		key := volumes.Get([]byte(volumeID))
		if key == nil {
			return nil
		}
		var e Export
		if found, err := getJSON(exports, string(key), &e); err != nil {
			return err
		} else if found {
			released := e
			out = &released
			if err := names.Delete([]byte(e.VolumeName)); err != nil {
				return err
			}
			if e.Phase == PhaseBound {
				e.Phase = PhaseAvailable
			}
			e.VolumeName, e.VolumeID, e.VolumeContext, e.Wipe, e.KeepData, e.WipedTo = "", "", nil, false, false, 0
			if err := putExport(tx, &released, &e); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bucketHolders).Delete([]byte(volumeID)); err != nil {
			return err
		}
		return volumes.Delete([]byte(volumeID))
	})
	return out, err
}

// WipeProgress records how far the wipe of a volume's export has got.
func (b *Bolt) WipeProgress(volumeID string, wipedTo uint64) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		key := tx.Bucket(bucketVolumes).Get([]byte(volumeID))
		if key == nil {
			return fmt.Errorf("volume %s: %w", volumeID, ErrNotFound)
		}
		var e Export
		if found, err := getJSON(tx.Bucket(bucketExports), string(key), &e); err != nil {
			return err
		} else if !found || e.VolumeID != volumeID {
			return fmt.Errorf("volume %s: export record: %w", volumeID, ErrNotFound)
		}
		old := e
		e.WipedTo = wipedTo
		return putExport(tx, &old, &e)
	})
}

// Volume returns the export claimed by a volume ID.
func (b *Bolt) Volume(volumeID string) (*Export, error) {
	var out *Export
	err := b.db.View(func(tx *bolt.Tx) error {
		key := tx.Bucket(bucketVolumes).Get([]byte(volumeID))
		if key == nil {
			return fmt.Errorf("volume %s: %w", volumeID, ErrNotFound)
		}
		var e Export
		found, err := getJSON(tx.Bucket(bucketExports), string(key), &e)
		if err != nil {
			return err
		}
		if !found {
			return fmt.Errorf("volume %s: export record: %w", volumeID, ErrNotFound)
		}
		out = &e
		return nil
	})
	return out, err
}

// Exports lists every export sorted by server and name.
func (b *Bolt) Exports() ([]Export, error) {
	var out []Export
	err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketExports).ForEach(func(k, v []byte) error {
			var e Export
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("corrupt record %q: %w", k, err)
			}
			out = append(out, e)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out, err
}

// Publish records a holder, enforcing single-node writers.
func (b *Bolt) Publish(a Attachment) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketHolders)
		var holders []Attachment
		if _, err := getJSON(bk, a.VolumeID, &holders); err != nil {
			return err
		}
		holders, changed, err := AddHolder(holders, a)
		if err != nil || !changed {
			return err
		}
		return putJSON(bk, a.VolumeID, holders)
	})
}

// Unpublish removes a holder.
func (b *Bolt) Unpublish(volumeID, nodeID string) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketHolders)
		var holders []Attachment
		if _, err := getJSON(bk, volumeID, &holders); err != nil {
			return err
		}
		kept := RemoveHolder(holders, nodeID)
		if len(kept) == 0 {
			return bk.Delete([]byte(volumeID))
		}
		return putJSON(bk, volumeID, kept)
	})
}

// Holders lists a volume's holders.
func (b *Bolt) Holders(volumeID string) ([]Attachment, error) {
	var holders []Attachment
	err := b.db.View(func(tx *bolt.Tx) error {
		_, err := getJSON(tx.Bucket(bucketHolders), volumeID, &holders)
		return err
	})
	return holders, err
}

// Path returns the store file.
func (b *Bolt) Path() string { return b.db.Path() }
