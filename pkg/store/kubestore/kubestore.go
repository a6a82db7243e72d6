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
	"sort"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
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

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

func fromUnstructured[T any](u *unstructured.Unstructured) (*T, error) {
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.UnstructuredContent(), out); err != nil {
		return nil, fmt.Errorf("decode %s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return out, nil
}

func toUnstructured(obj any, kind string) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(api.Group + "/" + api.Version)
	u.SetKind(kind)
	return u, nil
}

func kindOf(obj any) string {
	if _, ok := obj.(*api.NBDExport); ok {
		return "NBDExport"
	}
	return "NBDVolume"
}

func get[T any](c context.Context, ri dynamic.ResourceInterface, name string) (*T, error) {
	u, err := ri.Get(c, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return fromUnstructured[T](u)
}

func create[T any](c context.Context, ri dynamic.ResourceInterface, obj *T) (*T, error) {
	u, err := toUnstructured(obj, kindOf(obj))
	if err != nil {
		return nil, err
	}
	u, err = ri.Create(c, u, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	return fromUnstructured[T](u)
}

// update writes obj if nobody changed it since it was read (its
// resourceVersion); a conflict otherwise.
func update[T any](c context.Context, ri dynamic.ResourceInterface, obj *T) (*T, error) {
	u, err := toUnstructured(obj, kindOf(obj))
	if err != nil {
		return nil, err
	}
	u, err = ri.Update(c, u, metav1.UpdateOptions{})
	if err != nil {
		return nil, err
	}
	return fromUnstructured[T](u)
}

// modify applies fn to the object (read afresh after a conflict) and writes
// it when fn reports a change. It returns the object as stored.
func modify[T any](c context.Context, ri dynamic.ResourceInterface, name string, obj *T, fn func(*T) (bool, error)) (*T, error) {
	for range maxAttempts {
		if obj == nil {
			var err error
			if obj, err = get[T](c, ri, name); err != nil {
				return nil, err
			}
		}
		changed, err := fn(obj)
		if err != nil || !changed {
			return obj, err
		}
		out, err := update[T](c, ri, obj)
		if apierrors.IsConflict(err) {
			obj = nil
			continue
		}
		return out, err
	}
	return nil, fmt.Errorf("%s: still conflicting after %d attempts", name, maxAttempts)
}

// The NBDExport operations also feed what they see to the cache.

func (s *Store) seen(o *api.NBDExport, err error) (*api.NBDExport, error) {
	if err == nil && o != nil {
		cp := *o
		s.cache.remember(&cp)
	}
	return o, err
}

func (s *Store) getExport(c context.Context, name string) (*api.NBDExport, error) {
	return s.seen(get[api.NBDExport](c, s.exports, name))
}

func (s *Store) createExport(c context.Context, o *api.NBDExport) (*api.NBDExport, error) {
	return s.seen(create[api.NBDExport](c, s.exports, o))
}

func (s *Store) updateExport(c context.Context, o *api.NBDExport) (*api.NBDExport, error) {
	return s.seen(update[api.NBDExport](c, s.exports, o))
}

func (s *Store) modifyExport(c context.Context, name string, o *api.NBDExport, fn func(*api.NBDExport) (bool, error)) (*api.NBDExport, error) {
	return s.seen(modify[api.NBDExport](c, s.exports, name, o, fn))
}

func toStore(o *api.NBDExport) store.Export {
	e := store.Export{
		Server: o.Spec.Server, Name: o.Spec.Export, Description: o.Spec.Description,
		Size: uint64(o.Spec.Size), Flags: uint16(o.Spec.Flags), ReadOnly: o.Spec.ReadOnly,
		Phase: store.Phase(o.Status.Phase), VolumeName: o.Status.VolumeName, VolumeID: o.Status.VolumeID,
		VolumeContext: o.Status.VolumeContext, Wipe: o.Status.Wipe, SeenAt: o.Status.SeenAt.Time,
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

// Claim implements store.Store.
func (s *Store) Claim(req store.ClaimRequest) (*store.Export, error) {
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
// server (ties by name), or says why there is none.
func (s *Store) choose(c context.Context, req store.ClaimRequest) (*api.NBDExport, error) {
	all, err := s.listExports(c, req.Server, store.PhaseAvailable)
	if err != nil {
		return nil, err
	}
	var best *api.NBDExport
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
		if best == nil || o.Spec.Size < best.Spec.Size || o.Spec.Size == best.Spec.Size && o.Spec.Export < best.Spec.Export {
			best = o
		}
	}
	if best == nil {
		return nil, ce
	}
	return best, nil
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
		return &e, true, nil
	}
	if err == nil && o.Status.Phase == string(store.PhaseAvailable) {
		setPhase(o, store.PhaseBound)
		o.Status.VolumeName, o.Status.VolumeID, o.Status.Wipe = req.VolumeName, req.VolumeID, req.Wipe
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
		vol, err = update[api.NBDVolume](c, s.volumes, vol)
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return err
		}
		return s.showNodes(c, vol)
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
		vol, err = update[api.NBDVolume](c, s.volumes, vol)
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return err
		}
		return s.showNodes(c, vol)
	}
	return fmt.Errorf("unpublish %s: still conflicting after %d attempts", volumeID, maxAttempts)
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
