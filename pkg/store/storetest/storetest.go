// SPDX-License-Identifier: Apache-2.0

// Package storetest is the contract every store.Store implementation must
// pass: run it from the implementation's tests with Run.
package storetest

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// Factory opens a store. Reopen, when not nil, closes s and opens the same
// data again (a controller restart); Run then checks nothing is lost.
type Factory struct {
	Open   func(t *testing.T) store.Store
	Reopen func(t *testing.T, s store.Store) store.Store
}

// srv is a server identity (nbd.URI.ServerKey form).
const srv = "tcp:pool.example:10809"

func pool(sizes ...uint64) []store.Export {
	var out []store.Export
	for i, s := range sizes {
		out = append(out, store.Export{Name: fmt.Sprintf("e%03d", i), Size: s, Flags: 1})
	}
	return out
}

func claim(s store.Store, name string, size uint64) (*store.Export, error) {
	return s.Claim(store.ClaimRequest{VolumeName: name, VolumeID: "id-" + name, Server: srv, MinSize: size,
		VolumeContext: func(name string) map[string]string { return map[string]string{"uri": "nbd://pool/" + name} }})
}

// Run runs the contract.
func Run(t *testing.T, f Factory) {
	t.Run("ClaimSmallestFitting", func(t *testing.T) {
		s := f.Open(t)
		now := time.Now()
		if err := s.SyncExports(srv, pool(10<<30, 1<<30, 5<<30, 2<<30), now); err != nil {
			t.Fatal(err)
		}
		e, err := claim(s, "pvc-a", 3<<30)
		if err != nil || e.Name != "e002" || e.Phase != store.PhaseBound || e.VolumeID != "id-pvc-a" {
			t.Fatalf("claim 3 GiB = %+v, %v; want e002 (5 GiB)", e, err)
		}
		again, err := claim(s, "pvc-a", 3<<30)
		if err != nil || again.Name != "e002" {
			t.Fatalf("repeated claim = %+v, %v; want the same export", again, err)
		}
		if _, err := claim(s, "pvc-a", 6<<30); !errors.Is(err, store.ErrConflict) {
			t.Errorf("same name, larger size: %v, want ErrConflict", err)
		}
		if _, err := s.Claim(store.ClaimRequest{VolumeName: "pvc-a", VolumeID: "id-pvc-a", Server: srv, MinSize: 1,
			Fits: func(e *store.Export) bool { return e.Name != "e002" }}); !errors.Is(err, store.ErrConflict) {
			t.Errorf("same name, a request its export does not fit: %v, want ErrConflict", err)
		}
		_, err = claim(s, "pvc-b", 20<<30)
		var ce *store.CapacityError
		if !errors.As(err, &ce) || ce.LargestFree != 10<<30 || ce.Free != 3 {
			t.Errorf("claim 20 GiB = %v (%+v), want CapacityError with largest free 10 GiB of 3", err, ce)
		}
		readOnlyRefused, err := s.Claim(store.ClaimRequest{VolumeName: "pvc-c", VolumeID: "id-c", Server: srv, MinSize: 1,
			Fits: func(e *store.Export) bool { return e.Name == "nope" }})
		if !errors.Is(err, store.ErrNoCapacity) {
			t.Errorf("claim with a filter matching nothing = %+v, %v", readOnlyRefused, err)
		}
		if v, err := s.Volume("id-pvc-a"); err != nil || v.Name != "e002" || v.VolumeContext["uri"] != "nbd://pool/e002" {
			t.Errorf("Volume = %+v, %v", v, err)
		}
		if _, err := s.Volume("unknown"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Volume(unknown) = %v, want ErrNotFound", err)
		}
		rel, err := s.Release("id-pvc-a")
		if err != nil || rel == nil || rel.Name != "e002" {
			t.Fatalf("Release = %+v, %v", rel, err)
		}
		if _, err := s.Release("id-pvc-a"); err != nil {
			t.Errorf("second Release: %v", err)
		}
		if e, err := claim(s, "pvc-d", 3<<30); err != nil || e.Name != "e002" {
			t.Errorf("released export not reusable: %+v, %v", e, err)
		}
	})

	t.Run("MissingExports", func(t *testing.T) {
		s := f.Open(t)
		if err := s.SyncExports(srv, pool(1<<30, 2<<30), time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := claim(s, "pvc", 2<<30); err != nil {
			t.Fatal(err)
		}
		if err := s.SyncExports(srv, nil, time.Now()); err != nil {
			t.Fatal(err)
		}
		all, _ := s.Exports()
		for _, e := range all {
			if e.Phase != store.PhaseMissing {
				t.Errorf("%s is %s after its server stopped listing it", e.Name, e.Phase)
			}
		}
		if _, err := claim(s, "pvc2", 1); !errors.Is(err, store.ErrNoCapacity) {
			t.Errorf("claimed a missing export: %v", err)
		}
		if v, err := s.Volume("id-pvc"); err != nil || v.Phase != store.PhaseMissing {
			t.Errorf("claim lost while missing: %+v, %v", v, err)
		}
		if err := s.SyncExports(srv, pool(1<<30, 2<<30), time.Now()); err != nil {
			t.Fatal(err)
		}
		if v, _ := s.Volume("id-pvc"); v == nil || v.Phase != store.PhaseBound {
			t.Errorf("export back but not Bound again: %+v", v)
		}
	})

	t.Run("WipeProgress", func(t *testing.T) {
		s := f.Open(t)
		if err := s.SyncExports(srv, pool(1<<30), time.Now()); err != nil {
			t.Fatal(err)
		}
		e, err := s.Claim(store.ClaimRequest{VolumeName: "pvc", VolumeID: "id-pvc", Server: srv, MinSize: 1, Wipe: false, KeepData: true})
		if err != nil || !e.KeepData || e.WipedTo != 0 {
			t.Fatalf("claim with KeepData = %+v, %v", e, err)
		}
		if err := s.WipeProgress("id-pvc", 256<<20); err != nil {
			t.Fatal(err)
		}
		if v, err := s.Volume("id-pvc"); err != nil || v.WipedTo != 256<<20 || v.Phase != store.PhaseBound || !v.KeepData {
			t.Errorf("after WipeProgress: %+v, %v; want WipedTo 256 MiB, still Bound", v, err)
		}
		if f.Reopen != nil {
			s = f.Reopen(t, s)
			if v, err := s.Volume("id-pvc"); err != nil || v.WipedTo != 256<<20 || v.Phase != store.PhaseBound {
				t.Errorf("wipe progress across a restart: %+v, %v", v, err)
			}
		}
		if err := s.WipeProgress("id-nobody", 1); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("WipeProgress of an unknown volume: %v, want ErrNotFound", err)
		}
		if _, err := s.Release("id-pvc"); err != nil {
			t.Fatal(err)
		}
		e, err = claim(s, "pvc2", 1)
		if err != nil || e.WipedTo != 0 || e.KeepData {
			t.Errorf("next claim of the export = %+v, %v; want no wipe progress and no KeepData carried over", e, err)
		}
	})

	t.Run("Fencing", func(t *testing.T) {
		s := f.Open(t)
		w := store.Attachment{VolumeID: "v", NodeID: "n1"}
		if err := s.Publish(w); err != nil {
			t.Fatal(err)
		}
		if err := s.Publish(w); err != nil {
			t.Errorf("repeated publish: %v", err)
		}
		if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: "n1", ReadOnly: true}); !errors.Is(err, store.ErrConflict) {
			t.Errorf("same node, other readOnly: %v, want ErrConflict", err)
		}
		var he *store.HeldError
		if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: "n2"}); !errors.As(err, &he) || he.NodeID != "n1" {
			t.Errorf("second writer = %v, want HeldError naming n1", err)
		}
		if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: "n2", ReadOnly: true}); !errors.Is(err, store.ErrHeld) {
			t.Errorf("reader while a writer holds = %v, want ErrHeld", err)
		}
		if err := s.Unpublish("v", "n1"); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"n1", "n2", "n3"} {
			if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: n, ReadOnly: true}); err != nil {
				t.Errorf("reader %s: %v", n, err)
			}
		}
		if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: "n4"}); !errors.Is(err, store.ErrHeld) {
			t.Errorf("writer while readers hold = %v, want ErrHeld", err)
		}
		if h, _ := s.Holders("v"); len(h) != 3 {
			t.Errorf("holders = %v, want 3 readers", h)
		}
		if err := s.Unpublish("v", "unknown"); err != nil {
			t.Errorf("unpublish unknown node: %v", err)
		}
	})

	t.Run("FencingByExport", func(t *testing.T) {
		s := f.Open(t)
		if err := s.SyncExports(srv, pool(1<<30, 1<<30), time.Now()); err != nil {
			t.Fatal(err)
		}
		dyn, err := claim(s, "pvc", 1)
		if err != nil {
			t.Fatal(err)
		}
		exp := dyn.Key()
		if err := s.Publish(store.Attachment{VolumeID: dyn.VolumeID, NodeID: "a", Export: exp}); err != nil {
			t.Fatal(err)
		}
		// Two static volumes naming the dynamic volume's export.
		var he *store.HeldError
		for _, st := range []string{"static-1", "static-2"} {
			err := s.Publish(store.Attachment{VolumeID: st, NodeID: "b", Export: exp})
			if !errors.As(err, &he) || he.Holder != dyn.VolumeID || he.NodeID != "a" {
				t.Errorf("writer %s on a held export = %v, want HeldError naming %s on a", st, err, dyn.VolumeID)
			}
			if err := s.Publish(store.Attachment{VolumeID: st, NodeID: "b", Export: exp, ReadOnly: true}); !errors.Is(err, store.ErrHeld) {
				t.Errorf("reader %s beside a writer = %v, want ErrHeld", st, err)
			}
		}
		if err := s.Unpublish(dyn.VolumeID, "a"); err != nil {
			t.Fatal(err)
		}
		// Readers share across volumes; a writer then is refused on either.
		for _, a := range []store.Attachment{
			{VolumeID: dyn.VolumeID, NodeID: "a", Export: exp, ReadOnly: true},
			{VolumeID: "static-1", NodeID: "b", Export: exp, ReadOnly: true},
			{VolumeID: "static-2", NodeID: "c", Export: exp, ReadOnly: true},
		} {
			if err := s.Publish(a); err != nil {
				t.Errorf("reader %+v: %v", a, err)
			}
		}
		if err := s.Publish(store.Attachment{VolumeID: "static-1", NodeID: "d", Export: exp}); !errors.As(err, &he) || he.Holder == "static-1" {
			t.Errorf("writer beside readers of other volumes = %v, want HeldError naming another volume", err)
		}
		for _, u := range [][2]string{{dyn.VolumeID, "a"}, {"static-1", "b"}, {"static-2", "c"}} {
			if err := s.Unpublish(u[0], u[1]); err != nil {
				t.Fatal(err)
			}
		}
		// A static volume writing an available export keeps it from
		// being claimed; unpublished, it is claimable again.
		other := store.ExportKey(srv, "e001")
		if dyn.Name == "e001" {
			other = store.ExportKey(srv, "e000")
		}
		if err := s.Publish(store.Attachment{VolumeID: "static-3", NodeID: "b", Export: other}); err != nil {
			t.Fatal(err)
		}
		if e, err := claim(s, "pvc2", 1); !errors.Is(err, store.ErrNoCapacity) {
			t.Errorf("claimed %+v (%v), an export a static volume holds", e, err)
		}
		if err := s.Unpublish("static-3", "b"); err != nil {
			t.Fatal(err)
		}
		if _, err := claim(s, "pvc2", 1); err != nil {
			t.Errorf("claim after the static volume let go: %v", err)
		}
		// Released volumes leave no fence behind.
		if err := s.Publish(store.Attachment{VolumeID: dyn.VolumeID, NodeID: "a", Export: exp}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Release(dyn.VolumeID); err != nil {
			t.Fatal(err)
		}
		if err := s.Publish(store.Attachment{VolumeID: "static-1", NodeID: "b", Export: exp}); err != nil {
			t.Errorf("static writer after the dynamic volume was deleted: %v", err)
		}
	})

	t.Run("Limits", func(t *testing.T) {
		s := f.Open(t)
		long := strings.Repeat("x", store.MaxNameBytes+1)
		if err := s.SyncExports(srv, pool(1<<30), time.Now()); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Claim(store.ClaimRequest{VolumeName: long, VolumeID: "id", Server: srv}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("claim with a %d-byte name = %v, want ErrInvalid", len(long), err)
		}
		if err := s.Publish(store.Attachment{VolumeID: long, NodeID: "n"}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("publish with a %d-byte volume ID = %v, want ErrInvalid", len(long), err)
		}
		if err := s.Publish(store.Attachment{VolumeID: "v", NodeID: long}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("publish with a %d-byte node ID = %v, want ErrInvalid", len(long), err)
		}
		many := make([]store.Export, store.MaxServerExports+1)
		for i := range many {
			many[i] = store.Export{Name: fmt.Sprint(i), Size: 1}
		}
		var be *store.BudgetError
		if err := s.SyncExports(srv, many, time.Now()); !errors.As(err, &be) || be.Server != srv || be.Limit != store.MaxServerExports {
			t.Errorf("sync of %d exports = %v, want BudgetError naming the server and limit", len(many), err)
		}
		big := []store.Export{{Name: "a", Description: strings.Repeat("d", store.MaxServerInventoryBytes)}}
		if err := s.SyncExports(srv, big, time.Now()); !errors.As(err, &be) || be.Limit != store.MaxServerInventoryBytes {
			t.Errorf("sync of %d description bytes = %v, want BudgetError", len(big[0].Description), err)
		}
		if all, _ := s.Exports(); len(all) != 1 {
			t.Errorf("a refused sync changed the inventory: %d exports", len(all))
		}
	})

	t.Run("Stats", func(t *testing.T) {
		s := f.Open(t)
		check := func(when string) {
			t.Helper()
			want := map[store.Phase]int{store.PhaseAvailable: 0, store.PhaseBound: 0, store.PhaseMissing: 0}
			all, err := s.Exports()
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range all {
				want[e.Phase]++
			}
			// The kubernetes store counts from its watch; give it a moment.
			deadline := time.Now().Add(10 * time.Second)
			for {
				st, err := s.Stats()
				if err == nil && fmt.Sprint(st.Phases) == fmt.Sprint(want) {
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("%s: Stats = %v, %v; want %v", when, st.Phases, err, want)
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		check("empty")
		if err := s.SyncExports(srv, pool(1, 2, 3), time.Now()); err != nil {
			t.Fatal(err)
		}
		check("after sync")
		if _, err := claim(s, "pvc", 1); err != nil {
			t.Fatal(err)
		}
		check("after claim")
		if err := s.SyncExports(srv, pool(1, 2), time.Now()); err != nil {
			t.Fatal(err)
		}
		check("after one went missing")
		if _, err := s.Release("id-pvc"); err != nil {
			t.Fatal(err)
		}
		check("after release")
	})

	t.Run("ConcurrentClaims", func(t *testing.T) {
		s := f.Open(t)
		sizes := make([]uint64, 50)
		for i := range sizes {
			sizes[i] = 1 << 30
		}
		if err := s.SyncExports(srv, pool(sizes...), time.Now()); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		got := map[string]string{}
		for i := 0; i < 50; i++ {
			for r := 0; r < 2; r++ { // every claim twice, concurrently: idempotent by name
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					name := fmt.Sprintf("pvc-%02d", i)
					e, err := claim(s, name, 1<<30)
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						t.Errorf("%s: %v", name, err)
						return
					}
					if prev, ok := got[name]; ok && prev != e.Name {
						t.Errorf("%s got %s and %s", name, prev, e.Name)
					}
					got[name] = e.Name
				}(i)
			}
		}
		wg.Wait()
		owners := map[string]string{}
		for name, exp := range got {
			if other, dup := owners[exp]; dup {
				t.Errorf("export %s claimed by %s and %s", exp, other, name)
			}
			owners[exp] = name
		}
		if len(owners) != 50 {
			t.Errorf("%d exports handed out, want 50", len(owners))
		}
		if _, err := claim(s, "one-too-many", 1); !errors.Is(err, store.ErrNoCapacity) {
			t.Errorf("51st claim: %v", err)
		}
	})

	if f.Reopen != nil {
		t.Run("Restart", func(t *testing.T) {
			s := f.Open(t)
			if err := s.SyncExports(srv, pool(1<<30, 2<<30), time.Now()); err != nil {
				t.Fatal(err)
			}
			if _, err := claim(s, "pvc", 1<<30); err != nil {
				t.Fatal(err)
			}
			if err := s.Publish(store.Attachment{VolumeID: "id-pvc", NodeID: "n1"}); err != nil {
				t.Fatal(err)
			}
			s = f.Reopen(t, s)
			if v, err := s.Volume("id-pvc"); err != nil || v.Name != "e000" {
				t.Errorf("after restart: %+v, %v", v, err)
			}
			if err := s.Publish(store.Attachment{VolumeID: "id-pvc", NodeID: "n2"}); !errors.Is(err, store.ErrHeld) {
				t.Errorf("fencing lost across restart: %v", err)
			}
			if e, err := claim(s, "pvc", 1<<30); err != nil || e.Name != "e000" {
				t.Errorf("idempotent claim after restart: %+v, %v", e, err)
			}
		})
	}
}
