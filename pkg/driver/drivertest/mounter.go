// SPDX-License-Identifier: Apache-2.0

package drivertest

import (
	"errors"
	"io/fs"
	"os"
	"sync"

	mount "k8s.io/mount-utils"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// Mounter is a fake driver.Mounter on top of mount-utils' FakeMounter: it
// keeps the mount table in memory, remembers which devices were formatted
// with what, and creates directories and files for real (tests run in
// t.TempDir()).
type Mounter struct {
	*mount.FakeMounter
	// Devices answers IsBlockDevice and BlockSize for fake devices.
	Devices interface{ IsDevice(string) (uint64, bool) }

	mu sync.Mutex
	// Formats maps device paths to the filesystem made on them.
	Formats map[string]string
	// FormatOptions records the mkfs options used per device.
	FormatOptions map[string][]string
	// Resized lists the devices whose filesystem was grown.
	Resized []string
}

var _ driver.Mounter = (*Mounter)(nil)

// NewMounter returns an empty fake mounter.
func NewMounter(devices interface{ IsDevice(string) (uint64, bool) }) *Mounter {
	return &Mounter{FakeMounter: mount.NewFakeMounter(nil), Devices: devices,
		Formats: map[string]string{}, FormatOptions: map[string][]string{}}
}

// FormatAndMount formats source with fsType unless already formatted, then
// mounts it.
func (m *Mounter) FormatAndMount(source, target, fsType string, options, formatOptions []string) error {
	m.mu.Lock()
	if _, ok := m.Formats[source]; !ok {
		m.Formats[source] = fsType
		m.FormatOptions[source] = formatOptions
	}
	existing := m.Formats[source]
	m.mu.Unlock()
	if existing != fsType {
		return errors.New("device " + source + " already holds " + existing + ", not " + fsType)
	}
	return m.Mount(source, target, fsType, options)
}

// GetDiskFormat returns what FormatAndMount made on device.
func (m *Mounter) GetDiskFormat(device string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.Formats[device], nil
}

// ResizeFS records the resize.
func (m *Mounter) ResizeFS(device, _ string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.Resized = append(m.Resized, device)
	return nil
}

// IsBlockDevice is true for fake devices and for targets they are bound to.
func (m *Mounter) IsBlockDevice(path string) (bool, error) {
	_, ok := m.deviceAt(path)
	return ok, nil
}

func (m *Mounter) deviceAt(path string) (uint64, bool) {
	if size, ok := m.Devices.IsDevice(path); ok {
		return size, true
	}
	// A device bound onto a file is a device node there; a filesystem
	// bound onto a directory is not.
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return 0, false
	}
	mps, _ := m.List()
	for _, mp := range mps {
		if mp.Path == path {
			return m.Devices.IsDevice(mp.Device)
		}
	}
	return 0, false
}

// MakeDir creates a directory.
func (m *Mounter) MakeDir(path string) error { return os.MkdirAll(path, 0o750) }

// MakeFile creates an empty file.
func (m *Mounter) MakeFile(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

// Remove removes path; missing is fine.
func (m *Mounter) Remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Stats returns fixed plausible usage for a 1 GiB filesystem.
func (m *Mounter) Stats(string) (*driver.FSStats, error) {
	return &driver.FSStats{TotalBytes: 1 << 30, AvailableBytes: 3 << 28, UsedBytes: 1 << 28,
		TotalInodes: 65536, FreeInodes: 65000, UsedInodes: 536}, nil
}

// BlockSize returns the fake device's size.
func (m *Mounter) BlockSize(path string) (uint64, error) {
	if size, ok := m.deviceAt(path); ok {
		return size, nil
	}
	return 0, errors.New(path + " is not a block device")
}
