// SPDX-License-Identifier: Apache-2.0

package kubestore_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
)

// TestKubeMigratesServerSpellings: objects written by the previous version
// (server = the URI text of whichever spelling a StorageClass used) move to
// the server's identity; the export claimed under one spelling is not
// available under another.
func TestKubeMigratesServerSpellings(t *testing.T) {
	kubetest.Need(t, cluster)
	reset(t)
	s := open(t)
	defer s.Close()
	now := time.Now()
	const a, b = "nbd://127.0.0.1:10809/", "nbds://[::ffff:127.0.0.1]/"
	if err := s.SyncExports(a, []store.Export{{Name: "x", Size: 1}}, now); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Claim(store.ClaimRequest{VolumeName: "pvc-1", VolumeID: "nbdv-1", Server: a, MinSize: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(store.Attachment{VolumeID: "nbdv-1", NodeID: "n1"}); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncExports(b, []store.Export{{Name: "x", Size: 1}, {Name: "y", Size: 1}}, now); err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(context.Background()); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	fresh := open(t) // a new replica: reads only what the API server has
	defer fresh.Close()
	all, err := fresh.Exports()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range all {
		got = append(got, fmt.Sprintf("%s %s %s", e.Server, e.Name, e.Phase))
	}
	sort.Strings(got)
	want := []string{"tcp:127.0.0.1:10809 x Bound", "tcp:127.0.0.1:10809 y Available"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after migration: %q, want %q", got, want)
	}
	const id = "tcp:127.0.0.1:10809"
	if e, err := fresh.Claim(store.ClaimRequest{VolumeName: "pvc-2", VolumeID: "nbdv-2", Server: id, MinSize: 1}); err != nil || e.Name != "y" {
		t.Errorf("claim after migration = %+v, %v; want y", e, err)
	}
	if e, err := fresh.Claim(store.ClaimRequest{VolumeName: "pvc-1", VolumeID: "nbdv-1", Server: id, MinSize: 1}); err != nil || e.Name != "x" {
		t.Errorf("repeated claim of the migrated volume = %+v, %v", e, err)
	}
	var he *store.HeldError
	if err := fresh.Publish(store.Attachment{VolumeID: "static", NodeID: "n2", Export: store.ExportKey(id, "x")}); !errors.As(err, &he) || he.Holder != "nbdv-1" {
		t.Errorf("static writer on the migrated claim's export = %v, want HeldError naming nbdv-1", err)
	}
}

// TestKubeReplicasFenceOneExport: writers of different volumes naming one
// export, published at once through different replicas: at most one holds
// it afterwards.
func TestKubeReplicasFenceOneExport(t *testing.T) {
	kubetest.Need(t, cluster)
	for round := range 5 {
		reset(t)
		const n = 4
		stores := make([]*kubestore.Store, n)
		for i := range stores {
			stores[i] = open(t)
		}
		exp := store.ExportKey("tcp:h:10809", fmt.Sprint("e", round))
		var wg sync.WaitGroup
		won := make([]bool, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := stores[i].Publish(store.Attachment{VolumeID: fmt.Sprint("vol-", i), NodeID: fmt.Sprint("node-", i), Export: exp})
				if err != nil && !errors.Is(err, store.ErrHeld) {
					t.Errorf("publish %d: %v", i, err)
				}
				won[i] = err == nil
			}()
		}
		wg.Wait()
		winners, holders := 0, 0
		for i := range n {
			if won[i] {
				winners++
			}
			hs, err := stores[i].Holders(fmt.Sprint("vol-", i))
			if err != nil {
				t.Fatal(err)
			}
			holders += len(hs)
			stores[i].Close()
		}
		if winners > 1 || holders != winners {
			t.Fatalf("round %d: %d publishes succeeded, %d holders recorded; want at most 1, equal", round, winners, holders)
		}
	}
}
