// SPDX-License-Identifier: Apache-2.0

package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/nbd-csi/nbd-csi/pkg/nbd"
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

// ErrCorrupt: the store file is damaged (a *CorruptError says where).
var ErrCorrupt = errors.New("store file is corrupt")

// CorruptError reports a damaged store file.
type CorruptError struct {
	Path   string
	Reason string
}

// reason is the text of a recovered bbolt panic.
func reason(r any) string {
	return strings.TrimPrefix(fmt.Sprint(r), "panic: ")
}

// Error implements error.
func (e *CorruptError) Error() string {
	return fmt.Sprintf("store %s is corrupt (%s); see docs/operations.md, \"A damaged embedded store\"", e.Path, reason(e.Reason))
}

// Unwrap returns ErrCorrupt.
func (e *CorruptError) Unwrap() error { return ErrCorrupt }

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

// openDB opens a bbolt file, turning bbolt's refusals and panics on a
// damaged file into a *CorruptError.
func openDB(path string, opts *bolt.Options) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			db, err = nil, &CorruptError{Path: path, Reason: reason(r)}
		}
	}()
	db, err = bolt.Open(path, 0o600, opts)
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, bolt.ErrInvalid), errors.Is(err, bolt.ErrChecksum), errors.Is(err, bolt.ErrVersionMismatch):
		return nil, &CorruptError{Path: path, Reason: err.Error()}
	case errors.Is(err, bolt.ErrTimeout):
		return nil, fmt.Errorf("open store %s: another process (a running controller?) holds its lock: %w", path, err)
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// bbolt reports most damage as plain errors ("file size too small",
	// "invalid page type").
	return nil, &CorruptError{Path: path, Reason: err.Error()}
}

// check walks every page of the file (bbolt's consistency check). bbolt
// runs its check in a goroutine of its own, where a fault on a page past
// the end of a truncated file cannot be recovered: so first compare the
// file's size with what its metadata claims, and read every record here,
// in the guarded goroutine, before bbolt checks the rest.
func (b *Bolt) check() error {
	return b.view(func(tx *bolt.Tx) error {
		fi, err := os.Stat(b.path)
		if err != nil {
			return fmt.Errorf("open store %s: %w", b.path, err)
		}
		if tx.Size() > fi.Size() {
			return &CorruptError{Path: b.path, Reason: fmt.Sprintf("truncated: the file has %d bytes, its metadata says %d", fi.Size(), tx.Size())}
		}
		if err := tx.ForEach(func(_ []byte, bk *bolt.Bucket) error { return walkBucket(bk) }); err != nil {
			return &CorruptError{Path: b.path, Reason: err.Error()}
		}
		for err := range tx.Check() {
			return &CorruptError{Path: b.path, Reason: err.Error()}
		}
		return nil
	})
}

// walkBucket reads every key and value of bk and its nested buckets.
func walkBucket(bk *bolt.Bucket) error {
	return bk.ForEach(func(k, v []byte) error {
		if v == nil {
			if nested := bk.Bucket(k); nested != nil {
				return walkBucket(nested)
			}
		}
		return nil
	})
}

// OpenBolt opens (creating) the store file at path. The whole file is
// checked first: a damaged store is a *CorruptError (ErrCorrupt), never a
// panic later. Records of older versions are migrated in place.
func OpenBolt(path string) (*Bolt, error) {
	db, err := openDB(path, &bolt.Options{Timeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	b := &Bolt{db: db, path: path}
	if err := b.check(); err != nil {
		db.Close()
		return nil, err
	}
	err = b.update(func(tx *bolt.Tx) error {
		for _, bk := range [][]byte{bucketExports, bucketVolumes, bucketNames, bucketHolders, bucketFree, bucketExportHolders, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(bk); err != nil {
				return err
			}
		}
		if v := tx.Bucket(bucketMeta).Get(keySchema); len(v) == 1 && int(v[0]) >= schemaVersion {
			return nil
		}
		if err := migrate(tx); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keySchema, []byte{schemaVersion})
	})
	if err != nil {
		db.Close()
		if errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		return nil, fmt.Errorf("initialise store %s: %w", path, err)
	}
	return b, nil
}

// ServerIdentity returns the identity under which a recorded server is
// kept: records of older versions hold the URI text of whatever spelling
// named the server; they map to its nbd.URI.ServerKey. Identities pass
// unchanged.
func ServerIdentity(server string) string {
	if strings.HasPrefix(server, "tcp:") || strings.HasPrefix(server, "unix:") || strings.HasPrefix(server, "id:") {
		return server
	}
	u, err := nbd.ParseURI(server)
	if err != nil {
		return server
	}
	return u.ServerKey()
}

// migrate brings a store of an older version to schemaVersion: records
// keyed by a server's URI text move to its identity (when two spellings
// of one server recorded one export, the claimed record wins; two claimed
// records both stay, the second under its old spelling, so no volume loses
// its record), then the free index, the counters and the export holder
// index are rebuilt.
func migrate(tx *bolt.Tx) error {
	exports, volumes := tx.Bucket(bucketExports), tx.Bucket(bucketVolumes)
	var all []Export
	if err := exports.ForEach(func(k, v []byte) error {
		var e Export
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		all = append(all, e)
		return nil
	}); err != nil {
		return err
	}
	// Claimed records first, so they win a collision.
	sort.SliceStable(all, func(i, j int) bool { return all[i].VolumeID != "" && all[j].VolumeID == "" })
	for _, e := range all {
		id := ServerIdentity(e.Server)
		if id == e.Server {
			continue
		}
		oldKey := e.Key()
		moved := e
		moved.Server = id
		var there Export
		found, err := getJSON(exports, moved.Key(), &there)
		if err != nil {
			return err
		}
		if found && there.VolumeID != "" {
			if e.VolumeID == "" {
				if err := exports.Delete([]byte(oldKey)); err != nil {
					return err
				}
			}
			continue // both claimed: keep both
		}
		if err := exports.Delete([]byte(oldKey)); err != nil {
			return err
		}
		if err := putJSON(exports, moved.Key(), &moved); err != nil {
			return err
		}
		if e.VolumeID != "" {
			if err := volumes.Put([]byte(e.VolumeID), []byte(moved.Key())); err != nil {
				return err
			}
		}
	}
	// Rebuild the free index and the counters from the records.
	for _, name := range [][]byte{bucketFree, bucketMeta, bucketExportHolders} {
		if err := tx.DeleteBucket(name); err != nil {
			return err
		}
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
	}
	if err := exports.ForEach(func(k, v []byte) error {
		var e Export
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		if e.Phase == PhaseAvailable {
			if err := tx.Bucket(bucketFree).Put(freeKey(&e), k); err != nil {
				return err
			}
		}
		return addCount(tx, e.Phase, 1)
	}); err != nil {
		return err
	}
	// Holders of claimed volumes get their export's identity; holders of
	// static volumes recorded before cannot be placed (the store never
	// knew their URI) and are fenced by export from their next publish.
	holders := tx.Bucket(bucketHolders)
	type fix struct {
		id string
		hs []Attachment
	}
	var fixes []fix
	if err := holders.ForEach(func(k, v []byte) error {
		var hs []Attachment
		if err := json.Unmarshal(v, &hs); err != nil {
			return fmt.Errorf("corrupt record %q: %w", k, err)
		}
		key := volumes.Get(k)
		if key == nil || len(hs) == 0 {
			return nil
		}
		for i := range hs {
			hs[i].Export = string(key)
		}
		fixes = append(fixes, fix{string(k), hs})
		return nil
	}); err != nil {
		return err
	}
	for _, f := range fixes {
		if err := putJSON(holders, f.id, f.hs); err != nil {
			return err
		}
		if err := tx.Bucket(bucketExportHolders).Put(exportHolderKey(f.hs[0].Export, f.id), nil); err != nil {
			return err
		}
	}
	return nil
}

func exportHolderKey(export, volumeID string) []byte {
	return []byte(export + "\x00" + volumeID)
}

// OpenBoltReadOnly opens the store for reading without waiting for a
// running controller: it reads a consistent snapshot (OpenBoltSnapshot)
// when the file is locked.
func OpenBoltReadOnly(path string) (*Bolt, error) {
	db, err := openDB(path, &bolt.Options{Timeout: 100 * time.Millisecond, ReadOnly: true})
	if err == nil {
		b := &Bolt{db: db, path: path}
		if err := b.check(); err != nil {
			db.Close()
			return nil, err
		}
		return b, nil
	}
	if !errors.Is(err, bolt.ErrTimeout) {
		return nil, err
	}
	// Next to the store first: in the controller's container that is the
	// one writable directory (the root file system is read-only).
	b, err := OpenBoltSnapshot(path, filepath.Dir(path))
	var pe *os.PathError
	if errors.As(err, &pe) {
		return OpenBoltSnapshot(path, os.TempDir())
	}
	return b, err
}

// snapshotAttempts bounds the copies OpenBoltSnapshot makes of a file that
// is being written.
const snapshotAttempts = 8

// OpenBoltSnapshot copies the store file (without its lock, so a running
// controller keeps it) into dir and opens the copy read-only. A copy taken
// while the controller commits may be torn; it is checked page by page and
// taken again until it is consistent. Close deletes the copy.
func OpenBoltSnapshot(path, dir string) (*Bolt, error) {
	var last error
	for range snapshotAttempts {
		tmp, err := copyToTemp(path, dir)
		if err != nil {
			return nil, err
		}
		db, err := openDB(tmp, &bolt.Options{Timeout: time.Second, ReadOnly: true})
		if err == nil {
			b := &Bolt{db: db, path: path, tmp: tmp}
			if err = b.check(); err == nil {
				return b, nil
			}
			db.Close()
		}
		os.Remove(tmp)
		if !errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	return nil, last
}

func copyToTemp(path, dir string) (string, error) {
	src, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("open store %s: %w", path, err)
	}
	defer src.Close()
	dst, err := os.CreateTemp(dir, "nbd-csi-store-*.db")
	if err != nil {
		return "", fmt.Errorf("snapshot of store %s: %w", path, err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		os.Remove(dst.Name())
		return "", fmt.Errorf("snapshot of store %s: %w", path, err)
	}
	if err := dst.Close(); err != nil {
		os.Remove(dst.Name())
		return "", fmt.Errorf("snapshot of store %s: %w", path, err)
	}
	return dst.Name(), nil
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
