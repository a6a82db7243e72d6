// SPDX-License-Identifier: Apache-2.0

package crypt

import "context"

// Volumes is Crypt keyed by CSI volume ID: each volume's mapping is named
// MapperName(volumeID).
type Volumes struct{ C *Crypt }

// Open opens (formatting a blank device first) the volume's mapping on
// device and returns the mapping's device node.
func (v Volumes) Open(ctx context.Context, volumeID, device string, key []byte, readOnly bool) (string, bool, error) {
	name := MapperName(volumeID)
	formatted, err := v.C.EnsureOpen(ctx, device, name, key, readOnly)
	if err != nil {
		return "", formatted, err
	}
	return v.C.MapperPath(name), formatted, nil
}

// Close closes the volume's mapping; an inactive one is fine.
func (v Volumes) Close(ctx context.Context, volumeID string) error {
	return v.C.Close(ctx, MapperName(volumeID))
}

// Resize grows the volume's mapping to its device.
func (v Volumes) Resize(ctx context.Context, volumeID string) error {
	return v.C.Resize(ctx, MapperName(volumeID))
}

// Path is the device node of the volume's mapping.
func (v Volumes) Path(volumeID string) string { return v.C.MapperPath(MapperName(volumeID)) }

// Active reports whether the volume's mapping is open, and on which device.
func (v Volumes) Active(ctx context.Context, volumeID string) (Mapping, error) {
	return v.C.Status(ctx, MapperName(volumeID))
}
