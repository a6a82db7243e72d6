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
	// Server is the server's identity: nbd.URI.ServerKey of the URI that
	// named it (e.g. tcp:127.0.0.1:10809, unix:/run/nbd.sock), or
	// "id:NAME" when an administrator declared it (serverID). Every
	// spelling of one server shares one identity, so one export has one
	// record whatever StorageClass names it.
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
	// Export is the identity of the export the volume names
	// (ExportKey(server identity, export name)); fencing is by export, so
	// that two volumes naming one export (a dynamic one and a static PV,
	// or two static PVs) never have two writers. Empty only in records
	// written before export fencing existed.
	Export string `json:"export,omitempty"`
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
	// ErrInvalid: an argument the store cannot record (too long a name).
	ErrInvalid = errors.New("invalid argument")
	// ErrBudget: a server's inventory exceeds the store's budget (a
	// *BudgetError names the server and the limit).
	ErrBudget = errors.New("inventory over budget")
)

// Limits every store enforces.
const (
	// MaxNameBytes bounds volume names, volume IDs and node IDs (the
	// embedded store's keys; bbolt refuses keys over 32 KiB).
	MaxNameBytes = 4096
	// MaxServerExports bounds the exports recorded for one server.
	MaxServerExports = 16384
	// MaxServerInventoryBytes bounds the names and descriptions recorded
	// for one server, summed.
	MaxServerInventoryBytes = 16 << 20
)

// BudgetError says which budget a server's listing exceeds.
type BudgetError struct {
	Server string
	// What is "exports" or "bytes of names and descriptions"; Got and
	// Limit are counts of it.
	What       string
	Got, Limit int
}

// Error implements error.
func (e *BudgetError) Error() string {
	return fmt.Sprintf("server %s lists %d %s, over the limit of %d", e.Server, e.Got, e.What, e.Limit)
}

// Unwrap returns ErrBudget.
func (e *BudgetError) Unwrap() error { return ErrBudget }

// CheckBudget returns a *BudgetError when listed exceeds the per-server
// budget.
func CheckBudget(server string, listed []Export) error {
	if len(listed) > MaxServerExports {
		return &BudgetError{Server: server, What: "exports", Got: len(listed), Limit: MaxServerExports}
	}
	n := 0
	for i := range listed {
		n += len(listed[i].Name) + len(listed[i].Description)
	}
	if n > MaxServerInventoryBytes {
		return &BudgetError{Server: server, What: "bytes of names and descriptions", Got: n, Limit: MaxServerInventoryBytes}
	}
	return nil
}

// CheckName returns an error wrapping ErrInvalid when a name (volume name,
// volume ID, node ID) cannot be recorded.
func CheckName(what, name string) error {
	if len(name) > MaxNameBytes {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", ErrInvalid, what, len(name), MaxNameBytes)
	}
	return nil
}

// Stats are the inventory's counts, kept up to date on every write so that
// reading them costs the same whatever the inventory's size.
type Stats struct {
	// Phases counts exports by phase.
	Phases map[Phase]int
}

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

// HeldError names the node holding a volume, and the volume holding the
// export when that is another volume naming the same export.
type HeldError struct {
	VolumeID, NodeID string
	// Holder is the other volume holding the export ("" when the volume
	// itself is held).
	Holder string
}

// Error implements error.
func (e *HeldError) Error() string {
	if e.Holder != "" && e.Holder != e.VolumeID {
		return "the export of volume " + e.VolumeID + " is held by volume " + e.Holder + " on node " + e.NodeID
	}
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
	// another readOnly is ErrConflict. Fencing is by export: when another
	// volume naming the same export (a.Export) has holders, a writer on
	// either side is a *HeldError naming that volume.
	Publish(a Attachment) error
	// Unpublish removes a holder; unknown holders are fine.
	Unpublish(volumeID, nodeID string) error
	// Holders lists the nodes holding a volume.
	Holders(volumeID string) ([]Attachment, error)
	// Stats returns the inventory's counts in constant time (health and
	// metrics endpoints).
	Stats() (Stats, error)
	// Close releases the store.
	Close() error
}

// ExportConflict applies fencing by export: given the attachments of the
// other volumes naming a.Export, it returns a *HeldError when a would share
// the export with a writer, or be a writer beside any holder.
func ExportConflict(others []Attachment, a Attachment) error {
	for _, h := range others {
		if h.VolumeID == a.VolumeID {
			continue
		}
		if !h.ReadOnly || !a.ReadOnly {
			return &HeldError{VolumeID: a.VolumeID, NodeID: h.NodeID, Holder: h.VolumeID}
		}
	}
	return nil
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
