// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
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

// Publish implements store.Store.
func (s *Store) Publish(a store.Attachment) error {
	c, cancel := ctx()
	defer cancel()
	volName := VolumeObjectName(a.VolumeID)
	for range maxAttempts {
		vol, err := get[api.NBDVolume](c, s.volumes, volName)
		if apierrors.IsNotFound(err) {
			vol = &api.NBDVolume{ObjectMeta: metav1.ObjectMeta{Name: volName}, Spec: api.NBDVolumeSpec{VolumeID: a.VolumeID}}
			setHolders(vol, []store.Attachment{a})
			_, err = create[api.NBDVolume](c, s.volumes, vol)
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			return err
		}
		if err != nil {
			return err
		}
		if vol.Spec.VolumeID != a.VolumeID {
			return fmt.Errorf("%w: object %s records volume %q, not %q", store.ErrConflict, volName, vol.Spec.VolumeID, a.VolumeID)
		}
		hs, changed, err := store.AddHolder(holdersOf(vol), a)
		if err != nil || !changed {
			return err
		}
		setHolders(vol, hs)
		if retry, err := s.writeHolders(c, vol); !retry {
			return err
		}
	}
	return fmt.Errorf("publish %s: still conflicting after %d attempts", a.VolumeID, maxAttempts)
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
