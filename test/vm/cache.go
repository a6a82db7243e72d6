// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// lockFile takes an exclusive flock(2) on path (created if needed) so
// that concurrent test processes build a cache entry only once. It
// polls so that ctx can abort the wait. The returned function releases
// the lock.
func lockFile(ctx context.Context, path string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// copyFile copies src to dst (created with perm) through a temporary
// file in dst's directory, so readers never see a partial dst.
func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeFileAtomic(dst, perm, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}

// writeFileAtomic creates path with the content produced by fill,
// renaming a temporary file into place only when fill succeeded.
func writeFileAtomic(path string, perm os.FileMode, fill func(io.Writer) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if err := fill(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// hasher accumulates a cache key.
type hasher struct{ h hash.Hash }

func newHasher() *hasher { return &hasher{h: sha256.New()} }

// add mixes one labelled value into the key.
func (k *hasher) add(label string, v any) {
	fmt.Fprintf(k.h, "%s=%v\n", label, v)
}

// addStat mixes the identity (size, mtime, mode) of a host file into
// the key; a missing file is recorded as such.
func (k *hasher) addStat(path string) {
	fi, err := os.Stat(path)
	if err != nil {
		k.add("missing", path)
		return
	}
	fmt.Fprintf(k.h, "file=%s %d %d %v\n", path, fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
}

// sum returns the first 16 hex digits of the key.
func (k *hasher) sum() string {
	return hex.EncodeToString(k.h.Sum(nil))[:16]
}

// fileExists reports whether p exists.
func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
