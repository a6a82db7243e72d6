// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestCLIProbeAndList(t *testing.T) {
	dir := t.TempDir()
	for name, size := range map[string]int64{"small": 1 << 20, "large": 8 << 20} {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)

	code, out, errOut := runCLI(t, "probe", "--json", srv.URI("large"))
	if code != 0 {
		t.Fatalf("probe exit %d: %s", code, errOut)
	}
	var p ProbeOutput
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("probe --json output %q: %v", out, err)
	}
	if p.Export != "large" || p.Size != 8<<20 || p.Handshake != "fixed-newstyle" || p.TLS || !p.StructuredReplies ||
		!cmp.Equal(p.MetaContexts, []string{"base:allocation"}) {
		t.Errorf("probe --json = %+v", p)
	}

	code, out, _ = runCLI(t, "probe", srv.URI("small"))
	if code != 0 || !strings.Contains(out, "1048576 (1.0 MiB)") || !strings.Contains(out, "fixed-newstyle") {
		t.Errorf("probe text (exit %d):\n%s", code, out)
	}

	code, out, errOut = runCLI(t, "list", "--json", srv.URI(""))
	if code != 0 {
		t.Fatalf("list exit %d: %s", code, errOut)
	}
	var l ListOutput
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range l.Exports {
		names = append(names, e.Name)
	}
	slices.Sort(names) // the server's order is its directory order
	if diff := cmp.Diff([]string{"large", "small"}, names); diff != "" {
		t.Errorf("list names (-want +got):\n%s", diff)
	}

	// Failures: one line on stderr, exit 1; usage errors exit 2.
	code, _, errOut = runCLI(t, "probe", srv.URI("missing"))
	if code != 1 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, "unknown export") {
		t.Errorf("probe of a missing export: exit %d, stderr %q", code, errOut)
	}
	for _, args := range [][]string{
		{"probe"}, {"probe", "http://x/y"}, {"probe", "nbd://h/e?bogus=1"}, {"probe", "--nope", "nbd://h/e"}, {"frobnicate"},
		// A timeout that cannot be met is a usage error, not an i/o timeout.
		{"probe", "--timeout", "0", srv.URI("large")}, {"list", "--timeout", "0", srv.URI("")},
		{"probe", "--timeout", "-1s", srv.URI("large")}, {"list", "--timeout=-5m", srv.URI("")},
		{"attach", "--timeout", "-1s", srv.URI("large")},
	} {
		if code, _, _ := runCLI(t, args...); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

func TestCLITLS(t *testing.T) {
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	// No TLS material: refused, and the message says what to do.
	code, _, errOut := runCLI(t, "probe", srv.URI(""))
	if code != 1 || !strings.Contains(errOut, "TLS required") || !strings.Contains(errOut, "nbds://") {
		t.Errorf("plaintext probe of a TLS-only server: exit %d, %q", code, errOut)
	}
	code, out, errOut := runCLI(t, "probe", "--json", "--tls-ca", certs.CAFile, srv.TLSURI(""))
	if code != 0 || !strings.Contains(out, `"tls": true`) {
		t.Errorf("probe with --tls-ca: exit %d, %s %s", code, out, errOut)
	}
	// TLS asked for against a plaintext server: never a silent downgrade.
	plain := servers.Nbdkit(t, servers.TCP, "memory", "size=1M")
	code, _, errOut = runCLI(t, "probe", "--tls-ca", certs.CAFile, plain.URI(""))
	if code != 1 || !strings.Contains(errOut, "TLS") {
		t.Errorf("TLS probe of a plaintext server: exit %d, %q", code, errOut)
	}
}

func TestCLIExports(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	st, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SyncExports("nbd://h", []store.Export{{Name: "a", Size: 1 << 30, Flags: 1}, {Name: "b", Size: 2 << 30, Flags: 3}}, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Claim(store.ClaimRequest{VolumeName: "pvc", VolumeID: "nbdv-1", Server: "nbd://h", MinSize: 1}); err != nil {
		t.Fatal(err)
	}
	if err := st.Publish(store.Attachment{VolumeID: "nbdv-1", NodeID: "node-1"}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	code, out, errOut := runCLI(t, "exports", "--json", "--store-path", path)
	if code != 0 {
		t.Fatalf("exports: %d %s", code, errOut)
	}
	var got []ExportOutput
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Phase != "Bound" || got[0].VolumeName != "pvc" || !cmp.Equal(got[0].Nodes, []string{"node-1"}) ||
		got[1].Phase != "Available" || !cmp.Equal(got[1].Flags, []string{"read-only"}) {
		t.Errorf("exports --json = %+v", got)
	}
	if code, out, _ := runCLI(t, "exports", "--store-path", path); code != 0 || !strings.Contains(out, "Bound") {
		t.Errorf("exports table (exit %d):\n%s", code, out)
	}
}

// TestCLIVersion: version prints what was stamped at build time.
func TestCLIVersion(t *testing.T) {
	defer func(v, c string) { version, commit = v, c }(version, commit)
	version, commit = "v1.2.3", "0123abcd"
	var out, errOut strings.Builder
	if code := run(context.Background(), []string{"version"}, &out, &errOut); code != 0 {
		t.Fatalf("version: exit %d, %s", code, errOut.String())
	}
	if got := out.String(); !strings.HasPrefix(got, "nbd-csi v1.2.3 (commit 0123abcd, go") {
		t.Errorf("version printed %q", got)
	}
	if code := run(context.Background(), []string{"version", "extra"}, &out, &errOut); code == 0 {
		t.Error("version with an argument succeeded")
	}
}
