// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// Migrate brings objects written by earlier versions to server identities:
// an NBDExport or NBDVolume whose server is the URI text of some spelling
// gets the server's identity (store.ServerIdentity) and the matching
// label; the object keeps its name. When two spellings recorded one export,
// an unclaimed duplicate is deleted and a claimed one wins; two claimed
// duplicates both stay (the second under its old spelling, where no claim
// can choose it again) so that no volume loses its record. Holders of
// claimed volumes get their export's identity, so fencing by export covers
// them. Safe to run by several replicas at once, and again.
func (s *Store) Migrate(c context.Context) error {
	all, err := s.listExports(c, "")
	if err != nil {
		return err
	}
	type key struct{ server, export string }
	owner := map[key]*api.NBDExport{}
	for _, o := range all {
		if store.ServerIdentity(o.Spec.Server) == o.Spec.Server {
			owner[key{o.Spec.Server, o.Spec.Export}] = o
		}
	}
	// Claimed objects first, so that they win a collision.
	var ordered []*api.NBDExport
	for _, o := range all {
		if o.Status.VolumeID != "" {
			ordered = append(ordered, o)
		}
	}
	for _, o := range all {
		if o.Status.VolumeID == "" {
			ordered = append(ordered, o)
		}
	}
	for _, o := range ordered {
		id := store.ServerIdentity(o.Spec.Server)
		if id == o.Spec.Server {
			continue
		}
		k := key{id, o.Spec.Export}
		if there := owner[k]; there != nil {
			if o.Status.VolumeID == "" {
				if err := s.exports.Delete(c, o.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &o.ResourceVersion}}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
					return fmt.Errorf("delete duplicate export %s: %w", o.Name, err)
				}
				continue
			}
			if there.Status.VolumeID != "" {
				continue // both claimed: keep both
			}
			// The claimed one replaces an unclaimed duplicate.
			if err := s.exports.Delete(c, there.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &there.ResourceVersion}}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
				return fmt.Errorf("delete duplicate export %s: %w", there.Name, err)
			}
		}
		moved, err := s.modifyExport(c, o.Name, nil, func(o *api.NBDExport) (bool, error) {
			if store.ServerIdentity(o.Spec.Server) == o.Spec.Server {
				return false, nil
			}
			o.Spec.Server = store.ServerIdentity(o.Spec.Server)
			if o.Labels == nil {
				o.Labels = map[string]string{}
			}
			o.Labels[api.LabelServer] = serverLabel(o.Spec.Server)
			return true, nil
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("migrate export %s: %w", o.Name, err)
		}
		if moved != nil {
			owner[k] = moved
		}
	}
	vols, err := s.volumes.List(c, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list volumes: %w", err)
	}
	for i := range vols.Items {
		v, err := fromUnstructured[api.NBDVolume](&vols.Items[i])
		if err != nil {
			return err
		}
		_, err = modify(c, s.volumes, v.Name, v, func(v *api.NBDVolume) (bool, error) {
			changed := false
			if id := store.ServerIdentity(v.Spec.Server); id != v.Spec.Server {
				v.Spec.Server, changed = id, true
			}
			if v.Spec.ExportKey == "" && v.Spec.Export != "" && v.Spec.Server != "" {
				setExport(v, store.ExportKey(v.Spec.Server, v.Spec.Export))
				changed = true
			}
			return changed, nil
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("migrate volume %s: %w", v.Name, err)
		}
	}
	return nil
}
