// SPDX-License-Identifier: Apache-2.0

// Package kubestore is the store.Store that keeps the controller's metadata
// in the Kubernetes API as NBDExport and NBDVolume custom resources
// (pkg/apis/nbdcsi/v1alpha1). Every mutation is a read-modify-write guarded
// by the object's resourceVersion, so that several controller processes
// sharing one API server can never hand one export to two volumes nor one
// volume name to two exports: a claim first records its choice in the
// volume's NBDVolume, then binds the export; whoever loses a race sees a
// conflict, reads again and moves on.
package kubestore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

const (
	// callTimeout bounds one store operation (all its API calls).
	callTimeout = 60 * time.Second
	// maxAttempts bounds the retries of one operation after conflicts.
	maxAttempts = 64
	// seenAtRefresh: an unchanged export's seenAt is rewritten at most this
	// often, so that a scan of a large pool does not write every object.
	seenAtRefresh = 5 * time.Minute
)

// Store keeps the metadata in the Kubernetes API. Safe for concurrent use,
// also by several processes.
type Store struct {
	exports dynamic.ResourceInterface
	volumes dynamic.ResourceInterface
	// claim serializes this process's claims; other processes are kept
	// apart by resourceVersion preconditions alone.
	claim sync.Mutex
	// cache proposes claim candidates and answers listings (nil: none).
	cache *exportCache
}

var _ store.Store = (*Store)(nil)

// New returns a store talking to the API server cfg points at.
func New(cfg *rest.Config) (*Store, error) {
	c, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return NewForClient(c), nil
}

// NewForClient returns a store using c.
func NewForClient(c dynamic.Interface) *Store {
	s := &Store{exports: c.Resource(api.NBDExportResource), volumes: c.Resource(api.NBDVolumeResource)}
	s.cache = newExportCache(s.exports)
	return s
}

// Close implements store.Store: it stops the watch.
func (s *Store) Close() error {
	s.cache.close()
	return nil
}

// hash returns n hex digits of the SHA-256 of the parts joined by NUL.
func hash(n int, parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return hex.EncodeToString(h[:])[:n]
}

// ExportObjectName names the NBDExport of one export: a readable prefix
// from the export name and a hash of server and name (names are
// case-sensitive and may hold any byte; object names may not).
func ExportObjectName(server, export string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(export) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "-"):
			b.WriteByte('-')
		}
		if b.Len() >= 40 {
			break
		}
	}
	prefix := strings.Trim(b.String(), "-")
	if prefix == "" {
		prefix = "export"
	}
	return prefix + "-" + hash(16, server, export)
}

// VolumeObjectName names the NBDVolume of a volume ID: the ID itself when
// it is a valid object name (dynamic IDs are), else a hash of it.
func VolumeObjectName(volumeID string) string {
	if len(validation.IsDNS1123Subdomain(volumeID)) == 0 && !strings.HasPrefix(volumeID, "h-") {
		return volumeID
	}
	return "h-" + hash(40, volumeID)
}

func serverLabel(server string) string { return hash(32, server) }

func toStore(o *api.NBDExport) store.Export {
	e := store.Export{
		Server: o.Spec.Server, Name: o.Spec.Export, Description: o.Spec.Description,
		Size: uint64(o.Spec.Size), Flags: uint16(o.Spec.Flags), ReadOnly: o.Spec.ReadOnly,
		Phase: store.Phase(o.Status.Phase), VolumeName: o.Status.VolumeName, VolumeID: o.Status.VolumeID,
		VolumeContext: o.Status.VolumeContext, Wipe: o.Status.Wipe, SeenAt: o.Status.SeenAt.Time,
		KeepData: o.Status.KeepData, WipedTo: uint64(max(o.Status.WipedTo, 0)),
	}
	return e
}

// setSpec copies what a scan found into o; it reports a change.
func setSpec(o *api.NBDExport, l *store.Export) bool {
	want := api.NBDExportSpec{
		Server: o.Spec.Server, Export: o.Spec.Export, Description: l.Description,
		Size: int64(l.Size), Capacity: resource.NewQuantity(int64(l.Size), resource.BinarySI).String(),
		Flags: int32(l.Flags), ReadOnly: l.ReadOnly,
	}
	if o.Spec == want {
		return false
	}
	o.Spec = want
	return true
}

// setPhase sets an export's phase and the label mirroring it (claims list
// only Available exports).
func setPhase(o *api.NBDExport, p store.Phase) {
	o.Status.Phase = string(p)
	if o.Labels == nil {
		o.Labels = map[string]string{}
	}
	o.Labels[api.LabelPhase] = string(p)
}

// SyncExports implements store.Store.
func (s *Store) SyncExports(server string, listed []store.Export, now time.Time) error {
	if err := store.CheckBudget(server, listed); err != nil {
		return err
	}
	c, cancel := ctx()
	defer cancel()
	known, err := s.listExports(c, server)
	if err != nil {
		return err
	}
	byName := map[string]*api.NBDExport{}
	for _, o := range known {
		byName[o.Spec.Export] = o
	}
	seenAt := metav1.NewTime(now.Truncate(time.Second))
	listedNames := map[string]bool{}
	for i := range listed {
		l := &listed[i]
		listedNames[l.Name] = true
		name := ExportObjectName(server, l.Name)
		o := byName[l.Name]
		if o == nil {
			o = &api.NBDExport{
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{api.LabelServer: serverLabel(server)}},
				Spec:       api.NBDExportSpec{Server: server, Export: l.Name},
				Status:     api.NBDExportStatus{SeenAt: seenAt},
			}
			setPhase(o, store.PhaseAvailable)
			setSpec(o, l)
			_, err := s.createExport(c, o)
			if err == nil {
				continue
			}
			if !apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("record export %q of %s: %w", l.Name, server, err)
			}
			o = nil // another scan created it: update it below
		}
		if o != nil {
			name = o.Name // migrated objects keep the name of their old spelling
		}
		_, err := s.modifyExport(c, name, o, func(o *api.NBDExport) (bool, error) {
			changed := setSpec(o, l)
			if o.Status.Phase == string(store.PhaseMissing) {
				setPhase(o, store.PhaseAvailable)
				if o.Status.VolumeID != "" {
					setPhase(o, store.PhaseBound)
				}
				changed = true
			}
			if changed || now.Sub(o.Status.SeenAt.Time) >= seenAtRefresh {
				o.Status.SeenAt = seenAt
				changed = true
			}
			return changed, nil
		})
		if err != nil {
			return fmt.Errorf("update export %q of %s: %w", l.Name, server, err)
		}
	}
	for _, o := range known {
		if listedNames[o.Spec.Export] {
			continue
		}
		_, err := s.modifyExport(c, o.Name, o, func(o *api.NBDExport) (bool, error) {
			if o.Status.Phase == string(store.PhaseMissing) {
				return false, nil
			}
			setPhase(o, store.PhaseMissing)
			return true, nil
		})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("mark export %q of %s missing: %w", o.Spec.Export, server, err)
		}
	}
	return nil
}

// listExports lists one server's exports ("" for all), in one of phase if
// given: from the watch cache once it has synced, else from the API server.
// Callers only use the result to propose; decisions re-read the object.
func (s *Store) listExports(c context.Context, server string, phase ...store.Phase) ([]*api.NBDExport, error) {
	if len(phase) <= 1 {
		p := ""
		if len(phase) == 1 {
			p = string(phase[0])
		}
		if out, ok := s.cache.list(server, p); ok {
			return out, nil
		}
	}
	var sel []string
	if server != "" {
		sel = append(sel, api.LabelServer+"="+serverLabel(server))
	}
	for _, p := range phase {
		sel = append(sel, api.LabelPhase+"="+string(p))
	}
	opts := metav1.ListOptions{LabelSelector: strings.Join(sel, ",")}
	var out []*api.NBDExport
	for {
		l, err := s.exports.List(c, opts)
		if err != nil {
			return nil, fmt.Errorf("list exports: %w", err)
		}
		for i := range l.Items {
			o, err := fromUnstructured[api.NBDExport](&l.Items[i])
			if err != nil {
				return nil, err
			}
			if server == "" || o.Spec.Server == server {
				out = append(out, o)
			}
		}
		if opts.Continue = l.GetContinue(); opts.Continue == "" {
			return out, nil
		}
	}
}

// Stats implements store.Store from the watch cache's counters; until the
// cache has synced it is an error (the controller is not ready).
func (s *Store) Stats() (store.Stats, error) {
	n, ok := s.cache.stats()
	if !ok {
		return store.Stats{}, errors.New("the NBDExport watch has not synced yet")
	}
	st := store.Stats{Phases: map[store.Phase]int{store.PhaseAvailable: 0, store.PhaseBound: 0, store.PhaseMissing: 0}}
	for p, c := range n {
		if p != "" && c > 0 {
			st.Phases[store.Phase(p)] = c
		}
	}
	return st, nil
}

var ErrNoCRDs = errors.New("the nbd-csi custom resources (NBDExport, NBDVolume) are not installed: install the chart's CRDs (charts/nbd-csi/crds)")

// Check verifies the API server answers and the CRDs are installed.
func (s *Store) Check(c context.Context) error {
	_, err := s.exports.List(c, metav1.ListOptions{Limit: 1})
	if apierrors.IsNotFound(err) {
		return ErrNoCRDs
	}
	if err != nil {
		return fmt.Errorf("kubernetes API: %w", err)
	}
	_, err = s.volumes.List(c, metav1.ListOptions{Limit: 1})
	if apierrors.IsNotFound(err) {
		return ErrNoCRDs
	}
	return err
}
