// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"errors"
	"fmt"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

func holdersOf(vol *api.NBDVolume) []store.Attachment {
	var out []store.Attachment
	for _, h := range vol.Status.Holders {
		out = append(out, store.Attachment{VolumeID: vol.Spec.VolumeID, NodeID: h.Node, ReadOnly: h.ReadOnly})
	}
	return out
}

func setHolders(vol *api.NBDVolume, hs []store.Attachment) {
	vol.Status.Holders = nil
	for _, h := range hs {
		vol.Status.Holders = append(vol.Status.Holders, api.Holder{Node: h.NodeID, ReadOnly: h.ReadOnly})
	}
}

// Publish implements store.Store. Fencing by export writes first and
// checks after: the holder is recorded on the volume (labelled with its
// export), then every other volume labelled with that export is read; on a
// conflict the holder is taken back. Of two concurrent publishes of one
// export, the later write's check sees the earlier one (the API server's
// reads are linearizable), so at most one writer remains; both may lose
// (and are retried), neither wins wrongly.
func (s *Store) Publish(a store.Attachment) error {
	if err := errors.Join(store.CheckName("volume ID", a.VolumeID), store.CheckName("node ID", a.NodeID)); err != nil {
		return err
	}
	c, cancel := ctx()
	defer cancel()
	volName := VolumeObjectName(a.VolumeID)
	for range maxAttempts {
		vol, err := get[api.NBDVolume](c, s.volumes, volName)
		if apierrors.IsNotFound(err) {
			vol = &api.NBDVolume{ObjectMeta: metav1.ObjectMeta{Name: volName}, Spec: api.NBDVolumeSpec{VolumeID: a.VolumeID}}
			setExport(vol, a.Export)
			setHolders(vol, []store.Attachment{a})
			_, err = create[api.NBDVolume](c, s.volumes, vol)
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			if err != nil {
				return err
			}
			return s.checkExport(c, volName, a)
		}
		if err != nil {
			return err
		}
		if vol.Spec.VolumeID != a.VolumeID {
			return fmt.Errorf("%w: object %s records volume %q, not %q", store.ErrConflict, volName, vol.Spec.VolumeID, a.VolumeID)
		}
		if len(vol.Status.Holders) > 0 && vol.Spec.ExportKey != "" && a.Export != "" && vol.Spec.ExportKey != a.Export {
			return fmt.Errorf("%w: volume %s is held by node %s under another export", store.ErrConflict, a.VolumeID, vol.Status.Holders[0].Node)
		}
		hs, changed, err := store.AddHolder(holdersOf(vol), a)
		if err != nil || !changed {
			return err
		}
		setHolders(vol, hs)
		setExport(vol, a.Export)
		if retry, err := s.writeHolders(c, vol); !retry {
			if err != nil {
				return err
			}
			return s.checkExport(c, volName, a)
		}
	}
	return fmt.Errorf("publish %s: still conflicting after %d attempts", a.VolumeID, maxAttempts)
}

// setExport records the export a volume's holders hold, and its label.
func setExport(vol *api.NBDVolume, export string) {
	if export == "" {
		return
	}
	vol.Spec.ExportKey = export
	if vol.Labels == nil {
		vol.Labels = map[string]string{}
	}
	vol.Labels[api.LabelExport] = exportLabel(export)
}

func exportLabel(export string) string { return hash(32, export) }

// exportHolders lists the holders of the volumes other than volumeID that
// name export.
func (s *Store) exportHolders(c context.Context, export, volumeID string) ([]store.Attachment, error) {
	opts := metav1.ListOptions{LabelSelector: api.LabelExport + "=" + exportLabel(export)}
	var out []store.Attachment
	for {
		l, err := s.volumes.List(c, opts)
		if err != nil {
			return nil, fmt.Errorf("list volumes of export: %w", err)
		}
		for i := range l.Items {
			v, err := fromUnstructured[api.NBDVolume](&l.Items[i])
			if err != nil {
				return nil, err
			}
			if v.Spec.ExportKey == export && v.Spec.VolumeID != volumeID {
				out = append(out, holdersOf(v)...)
			}
		}
		if opts.Continue = l.GetContinue(); opts.Continue == "" {
			return out, nil
		}
	}
}

// checkExport runs after a's holder was written: when another volume holds
// the export in a way a may not share, a's holder is taken back and the
// *HeldError returned.
func (s *Store) checkExport(c context.Context, volName string, a store.Attachment) error {
	if a.Export == "" {
		return nil
	}
	others, err := s.exportHolders(c, a.Export, a.VolumeID)
	if err == nil {
		err = store.ExportConflict(others, a)
	}
	if err == nil {
		return nil
	}
	// Take the holder back (the publish failed; nothing may keep it).
	if uerr := s.Unpublish(a.VolumeID, a.NodeID); uerr != nil {
		return fmt.Errorf("%w (and taking the holder back failed: %v)", err, uerr)
	}
	return err
}

// Unpublish implements store.Store.
func (s *Store) Unpublish(volumeID, nodeID string) error {
	c, cancel := ctx()
	defer cancel()
	volName := VolumeObjectName(volumeID)
	for range maxAttempts {
		vol, err := get[api.NBDVolume](c, s.volumes, volName)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		before := len(vol.Status.Holders)
		setHolders(vol, store.RemoveHolder(holdersOf(vol), nodeID))
		if len(vol.Status.Holders) == before {
			return nil
		}
		if len(vol.Status.Holders) == 0 && vol.Spec.VolumeName == "" && vol.Spec.ExportObject == "" {
			// A static volume's record holds nothing more: delete it, unless
			// it changed meanwhile.
			rv := vol.ResourceVersion
			err := s.volumes.Delete(c, volName, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &rv}})
			if apierrors.IsConflict(err) {
				continue
			}
			if apierrors.IsNotFound(err) {
				return nil
			}
			return err
		}
		if retry, err := s.writeHolders(c, vol); !retry {
			return err
		}
	}
	return fmt.Errorf("unpublish %s: still conflicting after %d attempts", volumeID, maxAttempts)
}

// writeHolders saves vol (its holders changed) and mirrors the holders onto
// its export; retry reports a concurrent write: read again and redo.
func (s *Store) writeHolders(c context.Context, vol *api.NBDVolume) (retry bool, err error) {
	vol, err = update[api.NBDVolume](c, s.volumes, vol)
	if apierrors.IsConflict(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return false, s.showNodes(c, vol)
}

// showNodes copies a claimed volume's holders into its export's status, for
// the Node column of kubectl get nbdexports. The NBDVolume stays the record
// fencing decides on.
func (s *Store) showNodes(c context.Context, vol *api.NBDVolume) error {
	if vol.Spec.ExportObject == "" {
		return nil
	}
	var nodes []string
	for _, h := range vol.Status.Holders {
		nodes = append(nodes, h.Node)
	}
	want := strings.Join(nodes, ",")
	_, err := s.modifyExport(c, vol.Spec.ExportObject, nil, func(o *api.NBDExport) (bool, error) {
		if o.Status.VolumeID != vol.Spec.VolumeID || o.Status.Nodes == want {
			return false, nil
		}
		o.Status.Nodes = want
		return true, nil
	})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// Holders implements store.Store.
func (s *Store) Holders(volumeID string) ([]store.Attachment, error) {
	c, cancel := ctx()
	defer cancel()
	vol, err := get[api.NBDVolume](c, s.volumes, VolumeObjectName(volumeID))
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return holdersOf(vol), nil
}

// ErrNoCRDs says the custom resources are not installed.
