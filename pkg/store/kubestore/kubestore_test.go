// SPDX-License-Identifier: Apache-2.0

package kubestore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
	"github.com/nbd-csi/nbd-csi/pkg/store/storetest"
)

var cluster *kubetest.Cluster

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, &cluster)) }

// reset deletes every object the store made, so each test starts empty.
func reset(t testing.TB) {
	t.Helper()
	dc, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, r := range []interface {
		DeleteCollection(context.Context, metav1.DeleteOptions, metav1.ListOptions) error
	}{dc.Resource(api.NBDExportResource), dc.Resource(api.NBDVolumeResource)} {
		if err := r.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

func open(t testing.TB) *kubestore.Store {
	t.Helper()
	s, err := kubestore.New(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestKubeContract(t *testing.T) {
	kubetest.Need(t, cluster)
	t.Logf("kube-apiserver ready in %v", cluster.StartTime)
	storetest.Run(t, storetest.Factory{
		Open: func(t *testing.T) store.Store {
			reset(t)
			return open(t)
		},
		// A restarted controller is a new client on the same API server.
		Reopen: func(t *testing.T, s store.Store) store.Store {
			s.Close()
			return open(t)
		},
	})
}

// TestKubeReplicasNeverDoubleClaim runs claims through several independent
// stores (as several controller replicas would): optimistic concurrency
// alone must keep every export with one volume and every volume with one
// export.
func TestKubeReplicasNeverDoubleClaim(t *testing.T) {
	kubetest.Need(t, cluster)
	reset(t)
	const replicas, exports = 3, 30
	stores := make([]*kubestore.Store, replicas)
	for i := range stores {
		stores[i] = open(t)
	}
	const srv = "nbd://pool.example"
	var listed []store.Export
	for i := range exports {
		listed = append(listed, store.Export{Name: fmt.Sprintf("e%02d", i), Size: 1 << 30})
	}
	if err := stores[0].SyncExports(srv, listed, time.Now()); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string]map[string]bool{} // volume → exports handed out
	var wg sync.WaitGroup
	start := time.Now()
	for v := range exports {
		for r := range replicas { // every volume asked of every replica at once
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("pvc-%02d", v)
				e, err := stores[r].Claim(store.ClaimRequest{VolumeName: name, VolumeID: "nbdv-" + name, Server: srv, MinSize: 1})
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					t.Errorf("replica %d, %s: %v", r, name, err)
					return
				}
				if got[name] == nil {
					got[name] = map[string]bool{}
				}
				got[name][e.Name] = true
			}()
		}
	}
	wg.Wait()
	t.Logf("%d claims through %d replicas in %v", exports*replicas, replicas, time.Since(start))
	owner := map[string]string{}
	for vol, es := range got {
		if len(es) != 1 {
			t.Errorf("volume %s got %d exports: %v", vol, len(es), es)
		}
		for e := range es {
			if o, dup := owner[e]; dup {
				t.Errorf("export %s handed to %s and %s", e, o, vol)
			}
			owner[e] = vol
		}
	}
	all, err := stores[1].Exports()
	if err != nil {
		t.Fatal(err)
	}
	bound := 0
	for _, e := range all {
		if e.Phase == store.PhaseBound {
			bound++
		}
	}
	if bound != exports || len(owner) != exports {
		t.Errorf("%d exports bound, %d handed out; want %d", bound, len(owner), exports)
	}
	if _, err := stores[2].Claim(store.ClaimRequest{VolumeName: "extra", VolumeID: "nbdv-extra", Server: srv, MinSize: 1}); !errors.Is(err, store.ErrNoCapacity) {
		t.Errorf("claim with the pool exhausted: %v", err)
	}
}

// TestKubeObjectsForAdmins checks what kubectl shows: names, the server
// label, and the Node column kept in step with the holders.
func TestKubeObjectsForAdmins(t *testing.T) {
	kubetest.Need(t, cluster)
	reset(t)
	s := open(t)
	const srv = "nbd+unix:///?socket=/run/nbd.sock"
	if err := s.SyncExports(srv, []store.Export{{Name: "Disk/One", Size: 10 << 30}}, time.Now()); err != nil {
		t.Fatal(err)
	}
	e, err := s.Claim(store.ClaimRequest{VolumeName: "pvc-x", VolumeID: "nbdv-x", Server: srv, MinSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(store.Attachment{VolumeID: "nbdv-x", NodeID: "node-a"}); err != nil {
		t.Fatal(err)
	}
	dc, _ := dynamic.NewForConfig(cluster.Config())
	name := kubestore.ExportObjectName(srv, e.Name)
	u, err := dc.Resource(api.NBDExportResource).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("export object %s: %v", name, err)
	}
	if got := u.GetName(); got[:9] != "disk-one-" {
		t.Errorf("object name %q, want a readable prefix", got)
	}
	spec, status := u.Object["spec"].(map[string]any), u.Object["status"].(map[string]any)
	if spec["capacity"] != "10Gi" || status["phase"] != "Bound" || status["volumeName"] != "pvc-x" || status["nodes"] != "node-a" {
		t.Errorf("spec %v status %v", spec, status)
	}
	if err := s.Unpublish("nbdv-x", "node-a"); err != nil {
		t.Fatal(err)
	}
	u, _ = dc.Resource(api.NBDExportResource).Get(context.Background(), name, metav1.GetOptions{})
	if n, _ := u.Object["status"].(map[string]any)["nodes"]; n != nil {
		t.Errorf("nodes after unpublish = %v", n)
	}
	// A static volume's fencing record goes away with its last holder.
	if err := s.Publish(store.Attachment{VolumeID: "Static Volume/1", NodeID: "node-b"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Unpublish("Static Volume/1", "node-b"); err != nil {
		t.Fatal(err)
	}
	if l, _ := dc.Resource(api.NBDVolumeResource).List(context.Background(), metav1.ListOptions{}); len(l.Items) != 1 {
		t.Errorf("%d NBDVolume objects, want only the claimed volume's", len(l.Items))
	}
}

func TestKubeCheckWithoutCRDs(t *testing.T) {
	kubetest.Need(t, cluster)
	dc, _ := dynamic.NewForConfig(cluster.Config())
	// The CRDs are installed in this cluster; a store on a group that is not
	// served must say what to install.
	other := kubestore.NewForClient(renamed{dc})
	defer other.Close()
	if err := other.Check(context.Background()); !errors.Is(err, kubestore.ErrNoCRDs) {
		t.Errorf("Check without CRDs = %v, want ErrNoCRDs", err)
	}
}

// renamed addresses the resources in a group nobody serves.
type renamed struct{ dynamic.Interface }

func (r renamed) Resource(g schema.GroupVersionResource) dynamic.NamespaceableResourceInterface {
	g.Group = "absent.nbd-csi.io"
	return r.Interface.Resource(g)
}

// BenchmarkKubeClaimRelease measures a claim and its release (what
// CreateVolume and DeleteVolume do to the store) on a real API server, for
// pools of several sizes.
func BenchmarkKubeClaimRelease(b *testing.B) {
	if cluster == nil {
		b.Skip("no Kubernetes API server")
	}
	for _, n := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("pool=%d", n), func(b *testing.B) {
			reset(b)
			s := open(b)
			const srv = "nbd://bench.example"
			listed := make([]store.Export, n)
			for i := range listed {
				listed[i] = store.Export{Name: fmt.Sprintf("e%05d", i), Size: uint64(1+i%7) << 30}
			}
			if err := s.SyncExports(srv, listed, time.Now()); err != nil {
				b.Fatal(err)
			}
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				start := time.Now()
				id := fmt.Sprintf("nbdv-bench-%d", i)
				if _, err := s.Claim(store.ClaimRequest{VolumeName: id, VolumeID: id, Server: srv, MinSize: 3 << 30}); err != nil {
					b.Fatal(err)
				}
				if _, err := s.Release(id); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}

// TestKubeLeaderElection: of two campaigners one leads; when it stops, the
// other takes over at once (the lease is released); a lease whose holder
// vanished without releasing is taken after its duration.
func TestKubeLeaderElection(t *testing.T) {
	kubetest.Need(t, cluster)
	e := kubestore.Election{Namespace: "default", Name: "test-election", LeaseDuration: 2 * time.Second, RetryPeriod: 100 * time.Millisecond}
	var mu sync.Mutex
	leaders := map[string]bool{}
	campaign := func(ctx context.Context, id string) chan struct{} {
		done := make(chan struct{})
		el := e
		el.Identity = id
		go func() {
			defer close(done)
			kubestore.RunElection(ctx, cluster.Config(), el, func(lctx context.Context) {
				mu.Lock()
				leaders[id] = true
				mu.Unlock()
				<-lctx.Done()
				mu.Lock()
				delete(leaders, id)
				mu.Unlock()
			})
		}()
		return done
	}
	current := func() []string {
		mu.Lock()
		defer mu.Unlock()
		var out []string
		for id := range leaders {
			out = append(out, id)
		}
		return out
	}
	waitFor := func(want string, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(within)
		for time.Now().Before(deadline) {
			if l := current(); len(l) == 1 && l[0] == want {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("leaders %v, want only %s within %v", current(), want, within)
	}
	ctxA, stopA := context.WithCancel(context.Background())
	doneA := campaign(ctxA, "a")
	waitFor("a", 5*time.Second)
	ctxB, stopB := context.WithCancel(context.Background())
	doneB := campaign(ctxB, "b")
	time.Sleep(time.Second)
	if l := current(); len(l) != 1 || l[0] != "a" {
		t.Fatalf("leaders %v with two campaigners", l)
	}
	start := time.Now()
	stopA()
	<-doneA
	waitFor("b", time.Second) // released: no need to wait out the lease
	t.Logf("takeover after release: %v", time.Since(start))
	stopB()
	<-doneB

	// A holder that vanished without releasing: taken after LeaseDuration.
	dc, _ := dynamic.NewForConfig(cluster.Config())
	leases := dc.Resource(schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}).Namespace("default")
	l, err := leases.Get(context.Background(), e.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	unstructured.SetNestedField(l.Object, "ghost", "spec", "holderIdentity")
	unstructured.SetNestedField(l.Object, int64(2), "spec", "leaseDurationSeconds")
	if _, err := leases.Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctxC, stopC := context.WithCancel(context.Background())
	defer stopC()
	start = time.Now()
	campaign(ctxC, "c")
	time.Sleep(time.Second)
	if len(current()) != 0 {
		t.Fatalf("took a live-looking lease after 1s: %v", current())
	}
	waitFor("c", 5*time.Second)
	if d := time.Since(start); d < e.LeaseDuration {
		t.Errorf("took over after %v, before the lease expired", d)
	}
}
