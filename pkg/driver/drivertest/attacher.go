// SPDX-License-Identifier: Apache-2.0

// Package drivertest has stateful fakes of the node service's dependencies
// (the kernel attacher and the mounter) for unit tests and the in-process
// csi-sanity run. They keep state like the real ones would and log what was
// done; they are never used outside tests.
package drivertest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// Attacher is a fake driver.VolumeAttacher. Devices are regular files in
// Dir, one per attached volume.
type Attacher struct {
	// Dir holds the fake device files.
	Dir string
	// Sizes maps export names to sizes; unknown exports get DefaultSize.
	Sizes map[string]uint64
	// DefaultSize is the size of exports not in Sizes.
	DefaultSize uint64
	// AttachErr, when set, is returned by Attach for that export name.
	AttachErr map[string]error
	// ReadyErr is returned by Ready.
	ReadyErr error
	// Persist keeps data like a server does: a volume's device file is
	// named after its export (Dir/export-NAME) and survives Detach, so a
	// re-attach sees what was written before.
	Persist bool
	// AdoptWait, when set, makes Adopt wait until it is closed (a server
	// that does not answer).
	AdoptWait chan struct{}

	mu      sync.Mutex
	devices map[string]*driver.Attachment
	next    int
	// Log records the operations done, e.g. "attach vol1 /dir/nbd0".
	Log []string
}

var _ driver.VolumeAttacher = (*Attacher)(nil)

// NewAttacher returns a fake attacher whose devices live in dir.
func NewAttacher(dir string) *Attacher {
	return &Attacher{Dir: dir, DefaultSize: 1 << 30, Sizes: map[string]uint64{}, AttachErr: map[string]error{},
		devices: map[string]*driver.Attachment{}}
}

// Attach creates a fake device for the volume.
func (a *Attacher) Attach(_ context.Context, spec driver.AttachSpec) (*driver.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.AttachErr[spec.URI.Export]; err != nil {
		return nil, err
	}
	if d, ok := a.devices[spec.VolumeID]; ok {
		return nil, fmt.Errorf("volume %s is already attached as %s", spec.VolumeID, d.Device)
	}
	size, ok := a.Sizes[spec.URI.Export]
	if !ok {
		size = a.DefaultSize
	}
	dev := filepath.Join(a.Dir, fmt.Sprintf("nbd%d", a.next))
	a.next++
	if a.Persist {
		dev = filepath.Join(a.Dir, "export-"+spec.URI.Export)
		f, err := os.OpenFile(dev, os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, err
		}
		st, err := f.Stat()
		if err == nil && uint64(st.Size()) < size {
			err = f.Truncate(int64(size))
		}
		f.Close()
		if err != nil {
			return nil, err
		}
	} else if err := os.WriteFile(dev, nil, 0o600); err != nil {
		return nil, err
	}
	att := &driver.Attachment{VolumeID: spec.VolumeID, Device: dev, Size: size, ReadOnly: spec.ReadOnly, Healthy: true}
	a.devices[spec.VolumeID] = att
	a.Log = append(a.Log, "attach "+spec.VolumeID+" "+dev)
	c := *att
	return &c, nil
}

// Lookup returns the fake device of a volume.
func (a *Attacher) Lookup(_ context.Context, volumeID string) (*driver.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, ok := a.devices[volumeID]
	if !ok {
		return nil, driver.ErrNotAttached
	}
	c := *d
	return &c, nil
}

// List returns all fake devices sorted by volume ID.
func (a *Attacher) List(context.Context) ([]driver.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []driver.Attachment
	for _, d := range a.devices {
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VolumeID < out[j].VolumeID })
	return out, nil
}

// Detach removes the fake device; unknown volumes are fine.
func (a *Attacher) Detach(_ context.Context, volumeID string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, ok := a.devices[volumeID]
	if !ok {
		return nil
	}
	delete(a.devices, volumeID)
	a.Log = append(a.Log, "detach "+volumeID)
	if a.Persist {
		return nil
	}
	return os.Remove(d.Device)
}

// Resize sets the device size to the export's current size in Sizes.
func (a *Attacher) Resize(_ context.Context, volumeID string, spec driver.AttachSpec) (uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d, ok := a.devices[volumeID]
	if !ok {
		return 0, driver.ErrNotAttached
	}
	if s, ok := a.Sizes[spec.URI.Export]; ok {
		d.Size = s
	}
	a.Log = append(a.Log, fmt.Sprintf("resize %s %d", volumeID, d.Size))
	return d.Size, nil
}

// SetHealthy marks a volume's connection alive or dead.
func (a *Attacher) SetHealthy(volumeID string, healthy bool, condition string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if d, ok := a.devices[volumeID]; ok {
		d.Healthy, d.Condition = healthy, condition
	}
}

// Forget drops a device without detaching, as a node reboot would.
func (a *Attacher) Forget(volumeID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.devices, volumeID)
}

// IsDevice reports whether path is one of the fake devices.
func (a *Attacher) IsDevice(path string) (uint64, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, d := range a.devices {
		if d.Device == path {
			return d.Size, true
		}
	}
	return 0, false
}

// Adopt records the adoption of an attached volume.
func (a *Attacher) Adopt(_ context.Context, spec driver.AttachSpec) error {
	if a.AdoptWait != nil {
		<-a.AdoptWait
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.devices[spec.VolumeID]; !ok {
		return driver.ErrNotAttached
	}
	a.Log = append(a.Log, "adopt "+spec.VolumeID)
	return nil
}

// Logged returns a copy of Log.
func (a *Attacher) Logged() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.Log)
}

// Ready returns ReadyErr.
func (a *Attacher) Ready(context.Context) error { return a.ReadyErr }
