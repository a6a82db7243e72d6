// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// NodeMounter is the real Mounter: mount-utils for mounting, formatting
// (mkfs only when blkid finds no filesystem) and resizing, plus syscalls
// (mount(2) for ext4 and xfs with plain options, reading a device to prove
// it blank).
type NodeMounter struct {
	mount.SafeFormatAndMount
}

var _ Mounter = (*NodeMounter)(nil)

// NewNodeMounter returns a Mounter that runs the host's mount (where
// mount(2) will not do), blkid, mkfs, fsck, resize2fs and xfs_growfs.
func NewNodeMounter() *NodeMounter {
	return &NodeMounter{SafeFormatAndMount: mount.SafeFormatAndMount{
		Interface: syscallMounter{mount.New("")},
		Exec:      utilexec.New(),
	}}
}

// FormatAndMount formats source if it holds no filesystem, then mounts it.
// A device that IsBlank proves blank is formatted without asking blkid
// first (one process less per fresh volume); everything else, including a
// device IsBlank could not read, goes through mount-utils as before: blkid,
// then mkfs only if it found nothing, fsck otherwise.
func (m *NodeMounter) FormatAndMount(source, target, fsType string, options, formatOptions []string) error {
	if !slices.Contains(options, "ro") {
		if blank, err := IsBlank(source); err == nil && blank {
			return m.formatBlankAndMount(source, target, fsType, options, formatOptions)
		}
	}
	return m.SafeFormatAndMount.FormatAndMountSensitiveWithFormatOptions(source, target, fsType, options, nil, formatOptions)
}

// formatBlankAndMount is what mount-utils does once blkid found nothing:
// mkfs with its arguments, then mount with "defaults" added.
func (m *NodeMounter) formatBlankAndMount(source, target, fsType string, options, formatOptions []string) error {
	if fsType == "" {
		fsType = FSExt4
	}
	var args []string
	switch fsType {
	case FSExt4, "ext3":
		args = []string{"-F", "-m0", source}
	case FSXFS:
		args = []string{"-f", source}
	default:
		args = []string{source}
	}
	args = append(slices.Clone(formatOptions), args...)
	if out, err := m.Exec.Command("mkfs."+fsType, args...).CombinedOutput(); err != nil {
		return mount.NewMountError(mount.FormatFailed, "format of disk %q failed: type:(%q) target:(%q) errcode:(%v) output:(%v)",
			source, fsType, target, err, string(out))
	}
	if err := m.MountSensitive(source, target, fsType, append(slices.Clone(options), "defaults"), nil); err != nil {
		return mount.NewMountError(mount.UnknownMountError, "%s", err.Error())
	}
	return nil
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

// syscallMounter mounts ext4 and xfs filesystems with mount(2) instead of
// running mount(8) (one process less per NodeStage) when every option is
// one whose meaning it knows exactly; anything else, and anything mount(2)
// refuses, goes to mount(8) as before (it may know better, e.g. mount a
// write-protected device read-only, and it says why it failed). mount(2)
// either mounts or changes nothing, so falling back is safe.
type syscallMounter struct {
	mount.Interface
}

// Mount implements mount.Interface.
func (m syscallMounter) Mount(source, target, fstype string, options []string) error {
	return m.MountSensitive(source, target, fstype, options, nil)
}

// MountSensitive implements mount.Interface.
func (m syscallMounter) MountSensitive(source, target, fstype string, options, sensitiveOptions []string) error {
	if len(sensitiveOptions) == 0 {
		if flags, data, ok := kernelMountArgs(fstype, options); ok {
			if err := unix.Mount(source, target, fstype, flags, data); err == nil {
				return nil
			}
		}
	}
	return m.Interface.MountSensitive(source, target, fstype, options, sensitiveOptions)
}

// mountFlagOptions are the mount(8) options that are mount(2) flags: the
// flags each sets and clears (later options win, as with mount(8)).
var mountFlagOptions = map[string]struct{ set, clear uintptr }{
	"defaults":    {0, 0},
	"async":       {0, unix.MS_SYNCHRONOUS},
	"sync":        {unix.MS_SYNCHRONOUS, 0},
	"dirsync":     {unix.MS_DIRSYNC, 0},
	"ro":          {unix.MS_RDONLY, 0},
	"rw":          {0, unix.MS_RDONLY},
	"noatime":     {unix.MS_NOATIME, 0},
	"nodiratime":  {unix.MS_NODIRATIME, 0},
	"relatime":    {unix.MS_RELATIME, 0},
	"strictatime": {unix.MS_STRICTATIME, 0},
	"lazytime":    {unix.MS_LAZYTIME, 0},
	"nosuid":      {unix.MS_NOSUID, 0},
	"suid":        {0, unix.MS_NOSUID},
	"nodev":       {unix.MS_NODEV, 0},
	"dev":         {0, unix.MS_NODEV},
	"noexec":      {unix.MS_NOEXEC, 0},
	"exec":        {0, unix.MS_NOEXEC},
}

// mountDataOptions are the filesystem options mount(8) passes to the
// kernel as they are, per filesystem.
var mountDataOptions = map[string][]string{
	FSExt4: {"discard", "nodiscard"},
	FSXFS:  {"discard", "nodiscard", "nouuid"},
}

// kernelMountArgs translates options for mount(2); ok is false when one of
// them is not known exactly (then mount(8) must interpret them).
func kernelMountArgs(fstype string, options []string) (flags uintptr, data string, ok bool) {
	known, fsOK := mountDataOptions[fstype]
	if !fsOK {
		return 0, "", false
	}
	var datas []string
	for _, o := range options {
		if f, isFlag := mountFlagOptions[o]; isFlag {
			flags = flags&^f.clear | f.set
			continue
		}
		if !slices.Contains(known, o) {
			return 0, "", false
		}
		datas = append(datas, o)
	}
	return flags, strings.Join(datas, ","), true
}
