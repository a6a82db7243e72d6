// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// NodeMounter is the real Mounter: mount-utils for mounting, formatting
// (mkfs only when blkid finds no filesystem) and resizing, plus syscalls.
type NodeMounter struct {
	mount.SafeFormatAndMount
}

var _ Mounter = (*NodeMounter)(nil)

// NewNodeMounter returns a Mounter that runs the host's mount, blkid, mkfs,
// resize2fs and xfs_growfs.
func NewNodeMounter() *NodeMounter {
	return &NodeMounter{SafeFormatAndMount: mount.SafeFormatAndMount{
		Interface: mount.New(""),
		Exec:      utilexec.New(),
	}}
}

// FormatAndMount formats source if it holds no filesystem, then mounts it.
func (m *NodeMounter) FormatAndMount(source, target, fsType string, options, formatOptions []string) error {
	return m.SafeFormatAndMount.FormatAndMountSensitiveWithFormatOptions(source, target, fsType, options, nil, formatOptions)
}

// ResizeFS grows the filesystem on device mounted at path.
func (m *NodeMounter) ResizeFS(device, path string) error {
	_, err := mount.NewResizeFs(m.Exec).Resize(device, path)
	return err
}

// IsBlockDevice reports whether path is a block device node.
func (m *NodeMounter) IsBlockDevice(path string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return false, err
	}
	return st.Mode&unix.S_IFMT == unix.S_IFBLK, nil
}

// MakeDir creates a directory and its parents.
func (m *NodeMounter) MakeDir(path string) error { return os.MkdirAll(path, 0o750) }

// MakeFile creates an empty file if none exists.
func (m *NodeMounter) MakeFile(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

// Remove removes path; a missing one is fine.
func (m *NodeMounter) Remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Stats returns usage of the filesystem holding path.
func (m *NodeMounter) Stats(path string) (*FSStats, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(path, &s); err != nil {
		return nil, err
	}
	bs := int64(s.Bsize)
	st := &FSStats{
		TotalBytes:     int64(s.Blocks) * bs,
		AvailableBytes: int64(s.Bavail) * bs,
		UsedBytes:      int64(s.Blocks-s.Bfree) * bs,
		TotalInodes:    int64(s.Files),
		FreeInodes:     int64(s.Ffree),
	}
	st.UsedInodes = st.TotalInodes - st.FreeInodes
	return st, nil
}

// BlockSize returns the size in bytes of the block device at path.
func (m *NodeMounter) BlockSize(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// The size of a block device is where seeking to its end lands.
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", path, err)
	}
	return uint64(n), nil
}
