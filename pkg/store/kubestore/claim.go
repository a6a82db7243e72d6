// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"errors"
	"fmt"
	"sort"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// Claim implements store.Store.
func (s *Store) Claim(req store.ClaimRequest) (*store.Export, error) {
	if err := errors.Join(store.CheckName("volume name", req.VolumeName), store.CheckName("volume ID", req.VolumeID)); err != nil {
		return nil, err
	}
	s.claim.Lock()
	defer s.claim.Unlock()
	c, cancel := ctx()
	defer cancel()
	volName := VolumeObjectName(req.VolumeID)
	for range maxAttempts {
		vol, err := get[api.NBDVolume](c, s.volumes, volName)
		if apierrors.IsNotFound(err) {
			vol = &api.NBDVolume{
				ObjectMeta: metav1.ObjectMeta{Name: volName},
				Spec:       api.NBDVolumeSpec{VolumeID: req.VolumeID, VolumeName: req.VolumeName, Server: req.Server},
			}
			vol, err = create[api.NBDVolume](c, s.volumes, vol)
			if apierrors.IsAlreadyExists(err) {
				continue
			}
		}
		if err != nil {
			return nil, fmt.Errorf("volume record %s: %w", volName, err)
		}
		if vol.Spec.VolumeID != req.VolumeID {
			return nil, fmt.Errorf("%w: object %s records volume %q, not %q", store.ErrConflict, volName, vol.Spec.VolumeID, req.VolumeID)
		}
		if vol.Spec.VolumeName == "" && vol.Spec.ExportObject == "" {
			// A record made by Publish for a volume of that ID: take it.
			vol.Spec.VolumeName, vol.Spec.Server = req.VolumeName, req.Server
			if _, err := update[api.NBDVolume](c, s.volumes, vol); err != nil && !apierrors.IsConflict(err) {
				return nil, err
			}
			continue
		}
		if vol.Spec.VolumeName != req.VolumeName || vol.Spec.Server != req.Server {
			return nil, fmt.Errorf("%w: volume %q already exists on %s", store.ErrConflict, vol.Spec.VolumeName, vol.Spec.Server)
		}
		if vol.Spec.ExportObject == "" {
			// Choose, and record the choice: of two claims for this volume,
			// only one records it; the other reads it back next round.
			choice, err := s.choose(c, req)
			if err != nil {
				return nil, err
			}
			vol.Spec.Export, vol.Spec.ExportObject = choice.Spec.Export, choice.Name
			if _, err := update[api.NBDVolume](c, s.volumes, vol); err != nil && !apierrors.IsConflict(err) {
				return nil, err
			}
			continue
		}
		e, done, err := s.bind(c, vol, req)
		if err != nil || done {
			return e, err
		}
	}
	return nil, fmt.Errorf("claim for %q: still conflicting after %d attempts", req.VolumeName, maxAttempts)
}

// choose picks the smallest available fitting export of the request's
// server (ties by name) that no volume holds (a static volume may be
// published on an export the inventory has as Available), or says why
// there is none.
func (s *Store) choose(c context.Context, req store.ClaimRequest) (*api.NBDExport, error) {
	all, err := s.listExports(c, req.Server, store.PhaseAvailable)
	if err != nil {
		return nil, err
	}
	var fits []*api.NBDExport
	ce := &store.CapacityError{Wanted: req.MinSize}
	for _, o := range all {
		if o.Status.Phase != string(store.PhaseAvailable) {
			continue
		}
		e := toStore(o)
		if req.Fits != nil && !req.Fits(&e) {
			continue
		}
		ce.Free++
		ce.LargestFree = max(ce.LargestFree, e.Size)
		if e.Size < req.MinSize {
			continue
		}
		fits = append(fits, o)
	}
	sort.Slice(fits, func(i, j int) bool {
		a, b := fits[i], fits[j]
		return a.Spec.Size < b.Spec.Size || a.Spec.Size == b.Spec.Size && a.Spec.Export < b.Spec.Export
	})
	for _, o := range fits {
		held, err := s.exportHolders(c, store.ExportKey(o.Spec.Server, o.Spec.Export), "")
		if err != nil {
			return nil, err
		}
		if len(held) == 0 {
			return o, nil
		}
	}
	return nil, ce
}

// bind makes the export the volume record chose claimed by the volume. done
// is false when the choice was lost to another volume (the choice is then
// dropped, and the caller chooses again).
func (s *Store) bind(c context.Context, vol *api.NBDVolume, req store.ClaimRequest) (*store.Export, bool, error) {
	o, err := s.getExport(c, vol.Spec.ExportObject)
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, false, err
	}
	if err == nil && o.Status.VolumeID == req.VolumeID {
		e := toStore(o)
		if e.Size < req.MinSize {
			return nil, false, fmt.Errorf("%w: volume %q already exists with %d bytes, less than the %d requested", store.ErrConflict, req.VolumeName, e.Size, req.MinSize)
		}
		if req.Fits != nil && !req.Fits(&e) {
			return nil, false, fmt.Errorf("%w: volume %q already exists on export %q, which this request would not choose", store.ErrConflict, req.VolumeName, e.Name)
		}
		return &e, true, nil
	}
	if err == nil && o.Status.Phase == string(store.PhaseAvailable) {
		setPhase(o, store.PhaseBound)
		o.Status.VolumeName, o.Status.VolumeID, o.Status.Wipe = req.VolumeName, req.VolumeID, req.Wipe
		o.Status.KeepData, o.Status.WipedTo = req.KeepData, 0
		o.Status.VolumeContext = nil
		if req.VolumeContext != nil {
			o.Status.VolumeContext = req.VolumeContext(o.Spec.Export)
		}
		o, err = s.updateExport(c, o)
		if err == nil {
			e := toStore(o)
			return &e, true, nil
		}
		if !apierrors.IsConflict(err) {
			return nil, false, err
		}
		return nil, false, nil // read again next round
	}
	// Gone, taken by another volume, or missing: choose again.
	vol.Spec.Export, vol.Spec.ExportObject = "", ""
	if _, err := update[api.NBDVolume](c, s.volumes, vol); err != nil && !apierrors.IsConflict(err) {
		return nil, false, err
	}
	return nil, false, nil
}

// Release implements store.Store.
func (s *Store) Release(volumeID string) (*store.Export, error) {
	c, cancel := ctx()
	defer cancel()
	volName := VolumeObjectName(volumeID)
	vol, err := get[api.NBDVolume](c, s.volumes, volName)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out *store.Export
	if vol.Spec.ExportObject != "" {
		_, err := s.modifyExport(c, vol.Spec.ExportObject, nil, func(o *api.NBDExport) (bool, error) {
			if o.Status.VolumeID != volumeID {
				return false, nil
			}
			released := toStore(o)
			out = &released
			if o.Status.Phase == string(store.PhaseBound) {
				setPhase(o, store.PhaseAvailable)
			}
			o.Status.VolumeName, o.Status.VolumeID, o.Status.VolumeContext, o.Status.Wipe, o.Status.Nodes = "", "", nil, false, ""
			o.Status.KeepData, o.Status.WipedTo = false, 0
			return true, nil
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("release export %s: %w", vol.Spec.ExportObject, err)
		}
	}
	if err := s.volumes.Delete(c, volName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return out, fmt.Errorf("delete volume record %s: %w", volName, err)
	}
	return out, nil
}

// WipeProgress implements store.Store.
func (s *Store) WipeProgress(volumeID string, wipedTo uint64) error {
	c, cancel := ctx()
	defer cancel()
	vol, err := get[api.NBDVolume](c, s.volumes, VolumeObjectName(volumeID))
	if apierrors.IsNotFound(err) || err == nil && (vol.Spec.ExportObject == "" || vol.Spec.VolumeID != volumeID) {
		return fmt.Errorf("volume %s: %w", volumeID, store.ErrNotFound)
	}
	if err != nil {
		return err
	}
	var claimed bool
	_, err = s.modifyExport(c, vol.Spec.ExportObject, nil, func(o *api.NBDExport) (bool, error) {
		claimed = o.Status.VolumeID == volumeID
		if !claimed || o.Status.WipedTo == int64(wipedTo) {
			return false, nil
		}
		o.Status.WipedTo = int64(wipedTo)
		return true, nil
	})
	if apierrors.IsNotFound(err) || err == nil && !claimed {
		return fmt.Errorf("volume %s: export record: %w", volumeID, store.ErrNotFound)
	}
	return err
}

// Volume implements store.Store.
func (s *Store) Volume(volumeID string) (*store.Export, error) {
	c, cancel := ctx()
	defer cancel()
	vol, err := get[api.NBDVolume](c, s.volumes, VolumeObjectName(volumeID))
	if apierrors.IsNotFound(err) || err == nil && (vol.Spec.ExportObject == "" || vol.Spec.VolumeID != volumeID) {
		return nil, fmt.Errorf("volume %s: %w", volumeID, store.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	o, err := s.getExport(c, vol.Spec.ExportObject)
	if apierrors.IsNotFound(err) || err == nil && o.Status.VolumeID != volumeID {
		return nil, fmt.Errorf("volume %s: export record: %w", volumeID, store.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	e := toStore(o)
	return &e, nil
}

// Exports implements store.Store.
func (s *Store) Exports() ([]store.Export, error) {
	c, cancel := ctx()
	defer cancel()
	all, err := s.listExports(c, "")
	if err != nil {
		return nil, err
	}
	out := make([]store.Export, len(all))
	for i, o := range all {
		out[i] = toStore(o)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out, nil
}
