// SPDX-License-Identifier: Apache-2.0

package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
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
	// bucketExportHolders indexes the volumes that hold an export, for
	// fencing by export: export key \x00 volume ID → "".
	bucketExportHolders = []byte("exportholders")
	// bucketMeta holds the phase counters (Stats) and the schema version.
	bucketMeta = []byte("meta")
)

// schemaVersion 2: server identities (nbd.URI.ServerKey) instead of URI
// text, phase counters, the export holder index.
const schemaVersion = 2

var keySchema = []byte("schema")

func counterKey(p Phase) []byte { return []byte("count/" + string(p)) }

// addCount adds d to a phase's counter.
func addCount(tx *bolt.Tx, p Phase, d int64) error {
	if p == "" || d == 0 {
		return nil
	}
	m := tx.Bucket(bucketMeta)
	var n int64
	if v := m.Get(counterKey(p)); len(v) == 8 {
		n = int64(binary.BigEndian.Uint64(v))
	}
	n += d
	if n < 0 {
		n = 0
	}
	return m.Put(counterKey(p), binary.BigEndian.AppendUint64(nil, uint64(n)))
}

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
	if old == nil || old.Phase != e.Phase {
		if old != nil {
			if err := addCount(tx, old.Phase, -1); err != nil {
				return err
			}
		}
		if err := addCount(tx, e.Phase, 1); err != nil {
			return err
		}
	}
	return putJSON(tx.Bucket(bucketExports), e.Key(), e)
}

// Bolt is the embedded store: one file, bbolt transactions. A second
// process opening the same file waits for the first (bbolt's file lock), so
// only one controller uses it at a time.
type Bolt struct {
	db   *bolt.DB
	path string
	// tmp is a snapshot copy to delete on Close (OpenBoltSnapshot).
	tmp string
}

var _ Store = (*Bolt)(nil)

// guard runs fn, turning a panic of bbolt (it panics on some damaged
// pages) into a *CorruptError.
func (b *Bolt) guard(fn func() error) (err error) {
	// A page pointer past the end of a truncated file faults inside the
	// mmap: make that a panic we can recover instead of a crash.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = &CorruptError{Path: b.path, Reason: reason(r)}
		}
	}()
	return fn()
}

func (b *Bolt) update(fn func(*bolt.Tx) error) error {
	return b.guard(func() error { return b.db.Update(fn) })
}

func (b *Bolt) view(fn func(*bolt.Tx) error) error {
	return b.guard(func() error { return b.db.View(fn) })
}

func exportHolderKey(export, volumeID string) []byte {
	return []byte(export + "\x00" + volumeID)
}

// Close closes the file (and deletes a snapshot copy).
func (b *Bolt) Close() error {
	err := b.db.Close()
	if b.tmp != "" {
		os.Remove(b.tmp)
	}
	return err
}

// Stats implements Store: the counters kept by every write.
func (b *Bolt) Stats() (Stats, error) {
	st := Stats{Phases: map[Phase]int{PhaseAvailable: 0, PhaseBound: 0, PhaseMissing: 0}}
	err := b.view(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m == nil {
			return nil
		}
		for p := range st.Phases {
			if v := m.Get(counterKey(p)); len(v) == 8 {
				st.Phases[p] = int(binary.BigEndian.Uint64(v))
			}
		}
		return nil
	})
	return st, err
}

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
	if err := CheckBudget(server, listed); err != nil {
		return err
	}
	return b.update(func(tx *bolt.Tx) error {
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
	if err := errors.Join(CheckName("volume name", req.VolumeName), CheckName("volume ID", req.VolumeID)); err != nil {
		return nil, err
	}
	var out *Export
	err := b.update(func(tx *bolt.Tx) error {
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
			if req.Fits != nil && !req.Fits(&e) {
				return fmt.Errorf("%w: volume %q already exists on export %q, which this request would not choose", ErrConflict, req.VolumeName, e.Name)
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
			if held, err := exportHeld(tx, e.Key()); err != nil {
				return err
			} else if held {
				continue // a static volume names it and is published
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
	err := b.update(func(tx *bolt.Tx) error {
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
		if err := dropHolders(tx, volumeID); err != nil {
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
	err := b.view(func(tx *bolt.Tx) error {
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
	err := b.view(func(tx *bolt.Tx) error {
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

// dropHolders deletes a volume's holders and its export holder entry.
func dropHolders(tx *bolt.Tx, volumeID string) error {
	bk := tx.Bucket(bucketHolders)
	var holders []Attachment
	if _, err := getJSON(bk, volumeID, &holders); err != nil {
		return err
	}
	for _, h := range holders {
		if h.Export != "" {
			if err := tx.Bucket(bucketExportHolders).Delete(exportHolderKey(h.Export, volumeID)); err != nil {
				return err
			}
		}
	}
	return bk.Delete([]byte(volumeID))
}

// otherHolders returns the holders of the other volumes naming export.
func otherHolders(tx *bolt.Tx, export, volumeID string) ([]Attachment, error) {
	var out []Attachment
	prefix := []byte(export + "\x00")
	c := tx.Bucket(bucketExportHolders).Cursor()
	for k, _ := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, _ = c.Next() {
		other := string(k[len(prefix):])
		if other == volumeID {
			continue
		}
		var hs []Attachment
		if _, err := getJSON(tx.Bucket(bucketHolders), other, &hs); err != nil {
			return nil, err
		}
		out = append(out, hs...)
	}
	return out, nil
}

// exportHeld reports whether any volume holds the export.
func exportHeld(tx *bolt.Tx, export string) (bool, error) {
	prefix := []byte(export + "\x00")
	k, _ := tx.Bucket(bucketExportHolders).Cursor().Seek(prefix)
	return k != nil && hasPrefix(k, prefix), nil
}

// Publish records a holder, enforcing single-node writers per volume and
// per export.
func (b *Bolt) Publish(a Attachment) error {
	if err := errors.Join(CheckName("volume ID", a.VolumeID), CheckName("node ID", a.NodeID)); err != nil {
		return err
	}
	return b.update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketHolders)
		var holders []Attachment
		if _, err := getJSON(bk, a.VolumeID, &holders); err != nil {
			return err
		}
		if len(holders) > 0 && holders[0].Export != "" && a.Export != "" && holders[0].Export != a.Export {
			return fmt.Errorf("%w: volume %s is held by node %s under another export", ErrConflict, a.VolumeID, holders[0].NodeID)
		}
		holders, changed, err := AddHolder(holders, a)
		if err != nil || !changed {
			return err
		}
		if a.Export != "" {
			others, err := otherHolders(tx, a.Export, a.VolumeID)
			if err != nil {
				return err
			}
			if err := ExportConflict(others, a); err != nil {
				return err
			}
			if err := tx.Bucket(bucketExportHolders).Put(exportHolderKey(a.Export, a.VolumeID), nil); err != nil {
				return err
			}
		}
		return putJSON(bk, a.VolumeID, holders)
	})
}

// Unpublish removes a holder.
func (b *Bolt) Unpublish(volumeID, nodeID string) error {
	return b.update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketHolders)
		var holders []Attachment
		if _, err := getJSON(bk, volumeID, &holders); err != nil {
			return err
		}
		kept := RemoveHolder(holders, nodeID)
		if len(kept) == 0 {
			return dropHolders(tx, volumeID)
		}
		return putJSON(bk, volumeID, kept)
	})
}

// Holders lists a volume's holders.
func (b *Bolt) Holders(volumeID string) ([]Attachment, error) {
	var holders []Attachment
	err := b.view(func(tx *bolt.Tx) error {
		_, err := getJSON(tx.Bucket(bucketHolders), volumeID, &holders)
		return err
	})
	return holders, err
}

// Path returns the store file.
func (b *Bolt) Path() string { return b.path }
