// SPDX-License-Identifier: Apache-2.0

package kubestore

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// leaseResource is coordination.k8s.io/v1 Lease. Addressed through the
// dynamic client so that the binary does not link client-go's typed clients
// and their scheme, whose initialisation every command (probe, attach) would
// pay at start-up.
var leaseResource = schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}

// Election configures leader election on a Lease.
type Election struct {
	// Namespace and Name of the Lease; Identity of this process.
	Namespace, Name, Identity string
	// LeaseDuration: how long a holder that stopped renewing keeps the
	// lease (measured on this process's clock from when it last saw the
	// lease change, so clock skew between replicas does not matter).
	LeaseDuration time.Duration
	// RenewDeadline: a leader that could not renew for this long stops
	// leading. RetryPeriod: the pause between attempts.
	RenewDeadline, RetryPeriod time.Duration
}

func (e *Election) defaults() {
	if e.LeaseDuration <= 0 {
		e.LeaseDuration = 15 * time.Second
	}
	if e.RenewDeadline <= 0 || e.RenewDeadline >= e.LeaseDuration {
		e.RenewDeadline = e.LeaseDuration * 2 / 3
	}
	if e.RetryPeriod <= 0 {
		e.RetryPeriod = e.LeaseDuration / 7
	}
}

// RunElection campaigns for the lease until ctx ends. Each time this
// process becomes the leader it calls lead with a context that ends when
// leadership is lost (or ctx ends); lead must return promptly then. On the
// way out a held lease is released, so that another replica takes over at
// once.
func RunElection(ctx context.Context, cfg *rest.Config, e Election, lead func(context.Context)) error {
	c, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	return runElection(ctx, c.Resource(leaseResource).Namespace(e.Namespace), e, lead)
}

func runElection(ctx context.Context, leases dynamic.ResourceInterface, e Election, lead func(context.Context)) error {
	e.defaults()
	var (
		observed   string // holder + renewTime last seen
		observedAt time.Time
		leading    bool
		lastRenew  time.Time
		stopLead   context.CancelFunc
		leadDone   chan struct{}
	)
	stop := func() {
		if stopLead != nil {
			stopLead()
			<-leadDone
			stopLead = nil
		}
		leading = false
	}
	defer func() {
		wasLeading := leading
		stop()
		if wasLeading {
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			release(rctx, leases, e)
		}
	}()
	t := time.NewTicker(e.RetryPeriod)
	defer t.Stop()
	for {
		ok, holder, err := tryAcquireOrRenew(ctx, leases, e, &observed, &observedAt)
		now := time.Now()
		switch {
		case ok:
			lastRenew = now
			if !leading {
				leading = true
				klog.InfoS("Became leader", "lease", e.Namespace+"/"+e.Name, "identity", e.Identity)
				lctx, cancel := context.WithCancel(ctx)
				stopLead = cancel
				leadDone = make(chan struct{})
				go func() { defer close(leadDone); lead(lctx) }()
			}
		case leading && (holder != "" && holder != e.Identity || now.Sub(lastRenew) > e.RenewDeadline):
			klog.InfoS("Lost leadership", "lease", e.Namespace+"/"+e.Name, "identity", e.Identity, "holder", holder, "err", err)
			stop()
		case err != nil && ctx.Err() == nil:
			klog.V(2).InfoS("Leader election attempt failed", "lease", e.Namespace+"/"+e.Name, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

const microTime = "2006-01-02T15:04:05.000000Z07:00"

// tryAcquireOrRenew makes one attempt; it reports whether this process
// holds the lease now, and the holder it saw.
func tryAcquireOrRenew(ctx context.Context, leases dynamic.ResourceInterface, e Election, observed *string, observedAt *time.Time) (bool, string, error) {
	ctx, cancel := context.WithTimeout(ctx, e.RenewDeadline)
	defer cancel()
	now := time.Now()
	spec := func(transitions int64, acquired string) map[string]any {
		return map[string]any{
			"holderIdentity": e.Identity, "leaseDurationSeconds": int64(e.LeaseDuration / time.Second),
			"acquireTime": acquired, "renewTime": now.UTC().Format(microTime), "leaseTransitions": transitions,
		}
	}
	u, err := leases.Get(ctx, e.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
			"metadata": map[string]any{"name": e.Name, "namespace": e.Namespace},
			"spec":     spec(0, now.UTC().Format(microTime)),
		}}
		if _, err := leases.Create(ctx, l, metav1.CreateOptions{}); err != nil {
			return false, "", err
		}
		return true, e.Identity, nil
	}
	if err != nil {
		return false, "", err
	}
	holder, _, _ := unstructured.NestedString(u.Object, "spec", "holderIdentity")
	renewed, _, _ := unstructured.NestedString(u.Object, "spec", "renewTime")
	transitions, _, _ := unstructured.NestedInt64(u.Object, "spec", "leaseTransitions")
	acquired, _, _ := unstructured.NestedString(u.Object, "spec", "acquireTime")
	if rec := holder + "\x00" + renewed; rec != *observed {
		*observed, *observedAt = rec, now
	}
	if holder != e.Identity {
		if holder != "" && now.Sub(*observedAt) < e.LeaseDuration {
			return false, holder, nil // held by a live leader
		}
		transitions++
		acquired = now.UTC().Format(microTime)
	}
	if err := unstructured.SetNestedMap(u.Object, spec(transitions, acquired), "spec"); err != nil {
		return false, holder, err
	}
	if _, err := leases.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsConflict(err) {
			return false, holder, fmt.Errorf("lease changed meanwhile: %w", err)
		}
		return false, holder, err
	}
	return true, e.Identity, nil
}

// release gives the lease up if this process still holds it.
func release(ctx context.Context, leases dynamic.ResourceInterface, e Election) {
	u, err := leases.Get(ctx, e.Name, metav1.GetOptions{})
	if err != nil {
		return
	}
	if holder, _, _ := unstructured.NestedString(u.Object, "spec", "holderIdentity"); holder != e.Identity {
		return
	}
	_ = unstructured.SetNestedField(u.Object, "", "spec", "holderIdentity")
	_ = unstructured.SetNestedField(u.Object, int64(1), "spec", "leaseDurationSeconds")
	if _, err := leases.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		klog.V(2).InfoS("Could not release the lease", "lease", e.Namespace+"/"+e.Name, "err", err)
		return
	}
	klog.InfoS("Released the lease", "lease", e.Namespace+"/"+e.Name, "identity", e.Identity)
}
