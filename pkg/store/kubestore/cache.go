// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"strconv"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
)

// exportCache mirrors the NBDExport objects through a watch, decoded once
// per change, so that a claim picks its candidate without listing (and
// decoding) the whole pool: CreateVolume stays flat in the pool size. It
// only ever proposes: every decision is re-read from the API server and
// written under a resourceVersion precondition, so a stale entry costs a
// retry, never a wrong claim.
type exportCache struct {
	mu     sync.RWMutex
	byName map[string]*api.NBDExport
	// phases counts the cached exports by phase, kept on every change so
	// that Stats costs the same whatever the inventory's size.
	phases map[string]int
	synced cache.InformerSynced
	cancel context.CancelFunc
}

func newExportCache(exports interface {
	List(context.Context, metav1.ListOptions) (*unstructured.UnstructuredList, error)
	Watch(context.Context, metav1.ListOptions) (watch.Interface, error)
}) *exportCache {
	ctx, cancel := context.WithCancel(context.Background())
	c := &exportCache{byName: map[string]*api.NBDExport{}, phases: map[string]int{}, cancel: cancel}
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return exports.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return exports.Watch(ctx, o)
		},
	}
	_, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &unstructured.Unstructured{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    c.put,
			UpdateFunc: func(_, obj any) { c.put(obj) },
			DeleteFunc: c.remove,
		},
	})
	c.synced = ctrl.HasSynced
	go ctrl.RunWithContext(ctx)
	return c
}

func (c *exportCache) close() { c.cancel() }

func (c *exportCache) put(obj any) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return
	}
	o, err := fromUnstructured[api.NBDExport](u)
	if err != nil {
		klog.V(2).InfoS("Ignoring an undecodable NBDExport", "name", u.GetName(), "err", err)
		return
	}
	c.remember(o)
}

// remember records o unless a newer version is known (our own writes are
// remembered at once, before their watch event arrives).
func (c *exportCache) remember(o *api.NBDExport) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.byName[o.Name]
	if old != nil && newer(old.ResourceVersion, o.ResourceVersion) {
		return
	}
	if old != nil {
		c.phases[old.Status.Phase]--
	}
	c.phases[o.Status.Phase]++
	c.byName[o.Name] = o
}

// newer reports whether resourceVersion a is later than b. Versions are
// opaque by contract; etcd's are integers, and where they are not the
// update is taken (a stale entry only costs a retry).
func newer(a, b string) bool {
	x, err1 := strconv.ParseUint(a, 10, 64)
	y, err2 := strconv.ParseUint(b, 10, 64)
	return err1 == nil && err2 == nil && x > y
}

func (c *exportCache) remove(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if u, ok := obj.(*unstructured.Unstructured); ok {
		c.mu.Lock()
		if old := c.byName[u.GetName()]; old != nil {
			c.phases[old.Status.Phase]--
			delete(c.byName, u.GetName())
		}
		c.mu.Unlock()
	}
}

// list returns copies of the cached exports of server ("" for all) in
// phase ("" for any), and false while the cache has not synced.
func (c *exportCache) list(server, phase string) ([]*api.NBDExport, bool) {
	if c == nil || !c.synced() {
		return nil, false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	var out []*api.NBDExport
	for _, o := range c.byName {
		if (server == "" || o.Spec.Server == server) && (phase == "" || o.Status.Phase == phase) {
			cp := *o
			out = append(out, &cp)
		}
	}
	return out, true
}

// stats returns the phase counts, and false while the cache has not
// synced.
func (c *exportCache) stats() (map[string]int, bool) {
	if c == nil || !c.synced() {
		return nil, false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make(map[string]int, len(c.phases))
	for p, n := range c.phases {
		out[p] = n
	}
	return out, true
}
