// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestInteropNBDServer serves several exports from one nbd-server
// configuration, one of them read-only, and checks List against nbdinfo
// --list, Probe of each export against nbdinfo, Dial of each export, and
// the refusal of an unknown name.
//
// nbd-server 3.24 answers NBD_OPT_INFO with size 0 whatever the export
// (fixed upstream in 2024, "server: Advertise nicer size for
// NBD_OPT_INFO"); nbdinfo, which uses INFO too, reports the same 0. Only
// NBD_OPT_GO, i.e. Dial, reports the real size. The test checks Probe
// against nbdinfo and Dial against the file sizes.
func TestInteropNBDServer(t *testing.T) {
	dir := t.TempDir()
	exports := []struct {
		name   string
		size   int64
		config string
		flags  string // as Dial reports them (no structured replies from 3.24)
	}{
		{"plain", 1 << 20, "", "write-zeroes,multi-conn"},
		{"durable", 2 << 20, "flush = true\nfua = true\ntrim = true\n", "flush,fua,trim,write-zeroes,multi-conn"},
		{"readonly", 3 << 20, "readonly = true\n", "read-only,write-zeroes,multi-conn"},
	}
	var config string
	for _, e := range exports {
		p := filepath.Join(dir, e.name+".img")
		emptyFile(t, p, e.size)
		config += fmt.Sprintf("[%s]\nexportname = %s\n%s", e.name, p, e.config)
	}
	for _, l := range []servers.Listen{servers.TCP, servers.Unix} {
		t.Run(l.String(), func(t *testing.T) {
			s := servers.NBDServer(t, l, config)
			list, err := nbd.List(testCtx(t), mustURI(t, s.URI("")))
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			var want []nbd.ListEntry
			for _, e := range exports {
				want = append(want, nbd.ListEntry{Name: e.name})
			}
			if diff := cmp.Diff(want, list); diff != "" {
				t.Errorf("List (-want +got):\n%s", diff)
			}
			r := nbdinfo(t, "--list", s.URI(""))
			var names []string
			for _, e := range r.Exports {
				names = append(names, e.Name)
			}
			if diff := cmp.Diff([]string{"plain", "durable", "readonly"}, names); diff != "" {
				t.Errorf("nbdinfo --list (-want +got):\n%s", diff)
			}

			for i, e := range exports {
				uri := s.URI(e.name)
				info := probe(t, uri, userspace)
				if i < len(r.Exports) {
					want := viewOfNbdinfo(r, r.Exports[i])
					nbdinfoSizeBug(t, uri, &want, info)
					if diff := cmp.Diff(want, viewOf(info)); diff != "" {
						t.Errorf("Probe(%s) differs from nbdinfo --list (-nbdinfo +ours):\n%s", e.name, diff)
					}
				}
				if info.Size != uint64(e.size) {
					t.Errorf("Probe(%s) size %d, want %d", e.name, info.Size, e.size)
				}
				for _, profile := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
					c := dial(t, uri, nbd.WithProfile(profile))
					got := c.Export()
					if got.Size != uint64(e.size) || got.Flags.String() != e.flags || got.StructuredReplies ||
						got.Handshake != nbd.HandshakeFixedNewstyle {
						t.Errorf("Dial(%s, %s) = size %d flags %s sr %v %s; want size %d flags %s, simple replies, fixed newstyle",
							e.name, profile, got.Size, got.Flags, got.StructuredReplies, got.Handshake, e.size, e.flags)
					}
					if got.Flags != info.Flags {
						t.Errorf("Dial(%s) flags %s differ from Probe flags %s", e.name, got.Flags, info.Flags)
					}
					c.Close()
				}
			}

			c := dial(t, s.URI("readonly"), userspace)
			if err := c.WriteAt(testCtx(t), make([]byte, 512), 0, 0); !errors.Is(err, nbd.ErrNotSupportedByExport) {
				t.Errorf("WriteAt on the read-only export = %v, want ErrNotSupportedByExport", err)
			}
			if err := c.ReadAt(testCtx(t), make([]byte, 4096), 4096); err != nil {
				t.Errorf("ReadAt on the read-only export: %v", err)
			}

			for _, profile := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
				u := mustURI(t, s.URI("nope"))
				if _, err := nbd.Probe(testCtx(t), u, nbd.WithProfile(profile)); !errors.Is(err, nbd.ErrUnknownExport) {
					t.Errorf("Probe(unknown, %s) = %v, want an error wrapping ErrUnknownExport", profile, err)
				}
				c, err := nbd.Dial(testCtx(t), u, nbd.WithProfile(profile))
				if !errors.Is(err, nbd.ErrUnknownExport) {
					t.Errorf("Dial(unknown, %s) = %v, want an error wrapping ErrUnknownExport", profile, err)
				}
				if c != nil {
					c.Close()
				}
			}
		})
	}
}
