// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestInteropQemuNBD probes qemu-nbd exports (raw and qcow2 images, named,
// read-only, with a description) and compares with nbdinfo; lists them; and
// checks that an unknown export name fails with ErrUnknownExport.
func TestInteropQemuNBD(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.img")
	emptyFile(t, raw, 3<<20)
	qcow2 := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow2, "5M")
	tests := []struct {
		name     string
		listen   servers.Listen
		args     []string
		export   string
		size     uint64
		readOnly bool
		desc     string
	}{
		{"raw/named", servers.TCP, []string{"-x", "disk", "-f", "raw", raw}, "disk", 3 << 20, false, ""},
		{"raw/default-export", servers.Unix, []string{"-f", "raw", raw}, "", 3 << 20, false, ""},
		{"raw/read-only", servers.Unix, []string{"-r", "-x", "ro", "-f", "raw", raw}, "ro", 3 << 20, true, ""},
		{"qcow2/named", servers.Unix, []string{"-x", "vm disk", "-f", "qcow2", qcow2}, "vm disk", 5 << 20, false, ""},
		{"qcow2/description", servers.TCP, []string{"-x", "d", "-D", "a qcow2 image", "-f", "qcow2", qcow2}, "d", 5 << 20, false, "a qcow2 image"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := servers.QemuNBD(t, tc.listen, tc.args...)
			info := compareWithNbdinfo(t, s.URI(tc.export))
			want := exportView{Handshake: "fixed-newstyle", Structured: true, Size: tc.size, Description: tc.desc,
				BaseAllocation: true}
			got := viewOf(info)
			got.Flags, got.BlockSizes = "", "" // compared with nbdinfo above
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("Probe (-want +got):\n%s", diff)
			}
			if info.ReadOnly() != tc.readOnly {
				t.Errorf("ReadOnly() = %v, want %v", info.ReadOnly(), tc.readOnly)
			}
			if tc.readOnly {
				c := dial(t, s.URI(tc.export), userspace)
				var ce *nbd.CommandError
				if err := c.WriteAt(testCtx(t), make([]byte, 512), 0, 0); !errors.Is(err, nbd.ErrNotSupportedByExport) || errors.As(err, &ce) {
					t.Errorf("WriteAt on a read-only export = %v, want a local ErrNotSupportedByExport", err)
				}
			}
			if !info.BlockSizesAdvertised {
				t.Errorf("qemu-nbd advertises block sizes, the client saw none")
			}

			list, err := nbd.List(testCtx(t), mustURI(t, s.URI("")))
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			if diff := cmp.Diff([]nbd.ListEntry{{Name: tc.export, Description: tc.desc}}, list); diff != "" {
				t.Errorf("List (-want +got):\n%s", diff)
			}

			for _, profile := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
				u := mustURI(t, s.URI("no-such-export"))
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
			// The refused names did not hurt the server.
			probe(t, s.URI(tc.export))
		})
	}
}
