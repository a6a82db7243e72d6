// SPDX-License-Identifier: Apache-2.0

package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

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
