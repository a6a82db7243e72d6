// SPDX-License-Identifier: Apache-2.0

package store_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"

	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/storetest"
)

func TestBoltContract(t *testing.T) {
	storetest.Run(t, storetest.Factory{
		Open: func(t *testing.T) store.Store {
			s, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		},
		Reopen: func(t *testing.T, s store.Store) store.Store {
			path := s.(*store.Bolt).Path()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			n, err := store.OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { n.Close() })
			return n
		},
	})
}

// oldStore writes a store as the previous version did: records keyed by
// the URI text of the spelling that named the server, no counters.
func oldStore(t *testing.T, records []store.Export, holders map[string][]store.Attachment) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "old.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range []string{"exports", "volumes", "names", "attachments", "free"} {
			if _, err := tx.CreateBucket([]byte(b)); err != nil {
				return err
			}
		}
		for _, e := range records {
			raw, _ := json.Marshal(e)
			if err := tx.Bucket([]byte("exports")).Put([]byte(e.Key()), raw); err != nil {
				return err
			}
			if e.VolumeID != "" {
				tx.Bucket([]byte("volumes")).Put([]byte(e.VolumeID), []byte(e.Key()))
				tx.Bucket([]byte("names")).Put([]byte(e.VolumeName), []byte(e.VolumeID))
			}
		}
		for id, hs := range holders {
			raw, _ := json.Marshal(hs)
			tx.Bucket([]byte("attachments")).Put([]byte(id), raw)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func TestBoltMigratesServerSpellings(t *testing.T) {
	path := oldStore(t, []store.Export{
		{Server: "nbd://127.0.0.1/", Name: "a", Size: 1, Phase: store.PhaseBound, VolumeName: "pvc-1", VolumeID: "nbdv-1"},
		{Server: "nbds://[::ffff:127.0.0.1]:10809/", Name: "a", Size: 1, Phase: store.PhaseAvailable},
		{Server: "nbds://[::ffff:127.0.0.1]:10809/", Name: "b", Size: 1, Phase: store.PhaseAvailable},
	}, map[string][]store.Attachment{"nbdv-1": {{VolumeID: "nbdv-1", NodeID: "n1"}}})
	s, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all, err := s.Exports()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range all {
		got = append(got, e.Server+" "+e.Name+" "+string(e.Phase))
	}
	want := []string{"tcp:127.0.0.1:10809 a Bound", "tcp:127.0.0.1:10809 b Available"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("migrated inventory (-want +got):\n%s", diff)
	}
	if v, err := s.Volume("nbdv-1"); err != nil || v.Server != "tcp:127.0.0.1:10809" {
		t.Errorf("Volume after migration = %+v, %v", v, err)
	}
	// The one available export left is b: a, claimed under one spelling,
	// is not handed out again under the other.
	e, err := s.Claim(store.ClaimRequest{VolumeName: "pvc-2", VolumeID: "nbdv-2", Server: "tcp:127.0.0.1:10809", MinSize: 1})
	if err != nil || e.Name != "b" {
		t.Errorf("claim after migration = %+v, %v; want b", e, err)
	}
	// The old holder is fenced by export now.
	var he *store.HeldError
	err = s.Publish(store.Attachment{VolumeID: "static", NodeID: "n2", Export: store.ExportKey("tcp:127.0.0.1:10809", "a")})
	if !errors.As(err, &he) || he.Holder != "nbdv-1" {
		t.Errorf("static writer on the migrated claim's export = %v, want HeldError naming nbdv-1", err)
	}
	if st, err := s.Stats(); err != nil || st.Phases[store.PhaseBound] != 2 || st.Phases[store.PhaseAvailable] != 0 {
		t.Errorf("Stats after migration = %+v, %v", st, err)
	}
}

// TestBoltCorrupt damages store files the ways disks and people do; every
// one must give a *CorruptError, never a panic.
func TestBoltCorrupt(t *testing.T) {
	good := filepath.Join(t.TempDir(), "good.db")
	s, err := store.OpenBolt(good)
	if err != nil {
		t.Fatal(err)
	}
	many := make([]store.Export, 2000)
	for i := range many {
		many[i] = store.Export{Name: fmt.Sprintf("export-%05d", i), Description: strings.Repeat("d", 100), Size: 1 << 30}
	}
	if err := s.SyncExports("tcp:h:10809", many, time.Now()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	raw, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	scribble := func(off int) []byte {
		b := bytes.Clone(raw)
		for i := off; i < off+4096 && i < len(b); i++ {
			b[i] = byte(i*7 + 3)
		}
		return b
	}
	cases := map[string][]byte{
		"empty":           {},
		"truncated-meta":  raw[:100],
		"truncated-half":  raw[:len(raw)/2],
		"scribbled-meta":  scribble(0),
		"scribbled-page2": scribble(2 * 4096),
		"scribbled-page4": scribble(4 * 4096),
		"scribbled-mid":   scribble(len(raw) / 2 &^ 4095),
		"zeroed-tail":     append(bytes.Clone(raw[:len(raw)/2]), make([]byte, len(raw)-len(raw)/2)...),
	}
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "store.db")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			for _, open := range []func(string) (*store.Bolt, error){store.OpenBolt, store.OpenBoltReadOnly} {
				s, err := open(path)
				if err == nil {
					// Damage to pages nothing uses (free pages) is harmless:
					// such a file may open, and then reads back intact.
					all, err := s.Exports()
					s.Close()
					if name == "empty" && err == nil {
						continue // bbolt initialises an empty file
					}
					if err != nil || len(all) != len(many) || all[0].Description != many[0].Description {
						t.Errorf("open %s succeeded but reads %d exports, %v", name, len(all), err)
					}
					continue
				}
				if !errors.Is(err, store.ErrCorrupt) {
					t.Errorf("open %s: %v, want ErrCorrupt", name, err)
				} else if strings.Contains(err.Error(), "\n") {
					t.Errorf("error is not one line: %q", err)
				}
			}
		})
	}
}

func TestBoltReadWhileLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SyncExports("tcp:h:10809", []store.Export{{Name: "a", Size: 1}}, time.Now()); err != nil {
		t.Fatal(err)
	}
	// Writes continue while admins read.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_ = s.SyncExports("tcp:h:10809", []store.Export{{Name: "a", Size: 1}, {Name: fmt.Sprint("b", i%50), Size: 2}}, time.Now())
		}
	}()
	defer func() { close(stop); <-done }()
	for range 5 {
		start := time.Now()
		r, err := store.OpenBoltReadOnly(path)
		if err != nil {
			t.Fatalf("read-only open while the store is locked: %v", err)
		}
		all, err := r.Exports()
		r.Close()
		if err != nil || len(all) < 1 {
			t.Fatalf("exports of the snapshot = %d, %v", len(all), err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("read-only open took %v", d)
		}
	}
}
