// SPDX-License-Identifier: Apache-2.0

// Package store keeps the controller's metadata: the exports of the NBD
// servers it provisions from (the inventory), which volume claims which
// export, and which nodes hold which volume (fencing). One interface, so
// that a Kubernetes-backed store can stand beside the embedded one; the
// shared contract tests in storetest define the semantics both must have.
package store

import (
	"errors"
	"fmt"
	"time"
)

// Phase is an export's state in the inventory.
type Phase string

// Phases.
const (
	// PhaseAvailable: present on its server and not claimed.
	PhaseAvailable Phase = "Available"
	// PhaseBound: claimed by a volume.
	PhaseBound Phase = "Bound"
	// PhaseMissing: no longer listed by its server (the record and any
	// claim are kept, so nothing is lost when it comes back).
	PhaseMissing Phase = "Missing"
)

// Export is one export of one server.
type Export struct {
	// Server is the server URI without export (e.g. nbd://host:10809).
	Server string `json:"server"`
	// Name is the export name.
	Name string `json:"name"`
	// Description is the server's description, if any.
	Description string `json:"description,omitempty"`
	// Size is the export size in bytes.
	Size uint64 `json:"size"`
	// Flags are the NBD transmission flags.
	Flags uint16 `json:"flags"`
	// ReadOnly is true when the server refuses writes.
	ReadOnly bool `json:"readOnly"`
	// Phase is Available, Bound or Missing.
	Phase Phase `json:"phase"`
	// VolumeName and VolumeID identify the claiming volume (Bound).
	VolumeName string `json:"volumeName,omitempty"`
	VolumeID   string `json:"volumeID,omitempty"`
	// VolumeContext is what the node needs, fixed at claim time.
	VolumeContext map[string]string `json:"volumeContext,omitempty"`
	// Wipe asks for the export to be wiped when released (written for
	// controllers that predate KeepData; the controller wipes unless
	// KeepData is set).
	Wipe bool `json:"wipe,omitempty"`
	// KeepData records an explicit opt-out of wiping (wipeOnDelete:
	// "false"): only then is the export released without a wipe.
	KeepData bool `json:"keepData,omitempty"`
	// WipedTo is how far a wipe has got: below this offset the export
	// reads as zeroes, so a retried DeleteVolume continues there.
	WipedTo uint64 `json:"wipedTo,omitempty"`
	// SeenAt is when a scan last listed the export.
	SeenAt time.Time `json:"seenAt"`
}

// Key identifies an export across servers.
func (e *Export) Key() string { return ExportKey(e.Server, e.Name) }

// ExportKey joins server and export name into a key.
func ExportKey(server, name string) string { return server + "\x00" + name }

// Attachment is a node holding a volume (ControllerPublishVolume).
type Attachment struct {
	VolumeID string `json:"volumeID"`
	NodeID   string `json:"nodeID"`
	// ReadOnly holders may share a volume; a writer holds it alone.
	ReadOnly bool `json:"readOnly"`
}

// ClaimRequest asks for an export for a new volume.
type ClaimRequest struct {
	// VolumeName is the CO's name for the volume; claims are idempotent
	// by it.
	VolumeName string
	// VolumeID is the ID to record for a new claim.
	VolumeID string
	// Server limits the claim to one server's exports.
	Server string
	// Fits reports whether an export may serve the volume (name filter,
	// flags); size is checked separately.
	Fits func(*Export) bool
	// MinSize is the required capacity.
	MinSize uint64
	// VolumeContext returns what to record with the claim for the chosen
	// export (the node needs the export's URI); nil records none.
	VolumeContext func(exportName string) map[string]string
	// Wipe and KeepData are recorded with the claim.
	Wipe, KeepData bool
}

// Sentinel errors.
var (
	// ErrNotFound: no such volume or export.
	ErrNotFound = errors.New("not found")
	// ErrNoCapacity: no available export fits (a *CapacityError says more).
	ErrNoCapacity = errors.New("no available export is large enough")
	// ErrHeld: the volume is held by another node.
	ErrHeld = errors.New("volume is held by another node")
	// ErrConflict: a request contradicts what is recorded (e.g. the same
	// volume name with another server).
	ErrConflict = errors.New("conflicts with an existing volume")
)

// CapacityError says why a claim found no export.
type CapacityError struct {
	// Wanted is the requested size; LargestFree the largest available
	// fitting export (0 if none).
	Wanted, LargestFree uint64
	// Free is the number of available fitting exports.
	Free int
}

// Error implements error.
func (e *CapacityError) Error() string {
	if e.Free == 0 {
		return "no available export fits the request"
	}
	return "no available export is large enough"
}

// Unwrap returns ErrNoCapacity.
func (e *CapacityError) Unwrap() error { return ErrNoCapacity }

// HeldError names the node holding a volume.
type HeldError struct{ VolumeID, NodeID string }

// Error implements error.
func (e *HeldError) Error() string {
	return "volume " + e.VolumeID + " is held read-write by node " + e.NodeID
}

// Unwrap returns ErrHeld.
func (e *HeldError) Unwrap() error { return ErrHeld }

// Store is the controller's metadata store. All methods are safe for
// concurrent use, also from several processes where the implementation
// says so; every mutation is atomic.
type Store interface {
	// SyncExports records the exports one server lists now: new ones are
	// added Available, known ones updated (size, flags, description), and
	// known ones not listed become Missing (keeping their claim).
	SyncExports(server string, listed []Export, now time.Time) error
	// Claim binds the smallest Available export of req.Server that fits
	// and is at least req.MinSize to the volume, or returns the export
	// already claimed by req.VolumeName.
	Claim(req ClaimRequest) (*Export, error)
	// Release unbinds the volume's export (Available again, or Missing if
	// it was); an unknown volume is not an error.
	Release(volumeID string) (*Export, error)
	// WipeProgress records the WipedTo of the export a volume claims
	// (ErrNotFound if it claims none). The export stays Bound.
	WipeProgress(volumeID string, wipedTo uint64) error
	// Volume returns the export claimed by a volume ID.
	Volume(volumeID string) (*Export, error)
	// Exports lists every export, sorted by server and name.
	Exports() ([]Export, error)
	// Publish records that node holds the volume. A writer is exclusive:
	// publishing to a second node fails with a *HeldError; read-only
	// holders may be many. Repeating a publish is fine; the same node with
	// another readOnly is ErrConflict.
	Publish(a Attachment) error
	// Unpublish removes a holder; unknown holders are fine.
	Unpublish(volumeID, nodeID string) error
	// Holders lists the nodes holding a volume.
	Holders(volumeID string) ([]Attachment, error)
	// Close releases the store.
	Close() error
}

// AddHolder applies the fencing rules every store shares: it returns
// holders with a added (changed true), holders unchanged when a is already
// recorded, a *HeldError when a writer would share the volume, or
// ErrConflict when the node holds it with the other readOnly.
func AddHolder(holders []Attachment, a Attachment) ([]Attachment, bool, error) {
	for _, h := range holders {
		if h.NodeID == a.NodeID {
			if h.ReadOnly == a.ReadOnly {
				return holders, false, nil
			}
			return holders, false, fmt.Errorf("%w: volume %s is already published to node %s with readOnly=%v", ErrConflict, a.VolumeID, a.NodeID, h.ReadOnly)
		}
	}
	for _, h := range holders {
		if !h.ReadOnly || !a.ReadOnly {
			return holders, false, &HeldError{VolumeID: a.VolumeID, NodeID: h.NodeID}
		}
	}
	return append(holders[:len(holders):len(holders)], a), true, nil
}

// RemoveHolder returns holders without nodeID (a new slice).
func RemoveHolder(holders []Attachment, nodeID string) []Attachment {
	var kept []Attachment
	for _, h := range holders {
		if h.NodeID != nodeID {
			kept = append(kept, h)
		}
	}
	return kept
}
