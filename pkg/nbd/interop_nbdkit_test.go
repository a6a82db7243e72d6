// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestInteropNbdkitProbe probes nbdkit in many configurations, compares
// every reported field with nbdinfo, and checks the expected handshake
// style and structured-reply outcome independently of nbdinfo.
func TestInteropNbdkitProbe(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	emptyFile(t, file, 3<<20)
	tests := []struct {
		name       string
		listen     servers.Listen
		args       []string
		handshake  nbd.HandshakeStyle
		structured bool
		size       uint64
		readOnly   bool
		blockSizes string
	}{
		{"memory/unix", servers.Unix, []string{"memory", "size=1M"}, nbd.HandshakeFixedNewstyle, true, 1 << 20, false, ""},
		{"memory/tcp", servers.TCP, []string{"memory", "size=1M"}, nbd.HandshakeFixedNewstyle, true, 1 << 20, false, ""},
		{"file", servers.Unix, []string{"file", "file=" + file}, nbd.HandshakeFixedNewstyle, true, 3 << 20, false, ""},
		{"file/read-only", servers.TCP, []string{"-r", "file", "file=" + file}, nbd.HandshakeFixedNewstyle, true, 3 << 20, true, ""},
		{"no-sr", servers.Unix, []string{"--no-sr", "memory", "size=1M"}, nbd.HandshakeFixedNewstyle, false, 1 << 20, false, ""},
		// Bit 0 clear: plain newstyle, EXPORT_NAME only; bit 1 clear:
		// 124 bytes of zero padding after the export info.
		{"mask-handshake=0", servers.Unix, []string{"--mask-handshake=0", "memory", "size=1M"}, nbd.HandshakeNewstyle, false, 1 << 20, false, ""},
		{"mask-handshake=1", servers.TCP, []string{"--mask-handshake=1", "memory", "size=1M"}, nbd.HandshakeFixedNewstyle, true, 1 << 20, false, ""},
		{"mask-handshake=2", servers.Unix, []string{"--mask-handshake=2", "memory", "size=1M"}, nbd.HandshakeNewstyle, false, 1 << 20, false, ""},
		{"oldstyle", servers.TCP, []string{"--oldstyle", "memory", "size=1M"}, nbd.HandshakeOldstyle, false, 1 << 20, false, ""},
		{"oldstyle/read-only", servers.Unix, []string{"--oldstyle", "-r", "memory", "size=1M"}, nbd.HandshakeOldstyle, false, 1 << 20, true, ""},
		{"block-sizes", servers.Unix, []string{"--filter=blocksize-policy", "memory", "size=1M",
			"blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536"},
			nbd.HandshakeFixedNewstyle, true, 1 << 20, false, "512/4096/65536"},
		{"description", servers.Unix, []string{"--filter=exportname", "memory", "size=1M", "exportdesc=fixed:test disk"},
			nbd.HandshakeFixedNewstyle, true, 1 << 20, false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := servers.Nbdkit(t, tc.listen, tc.args...)
			uri := s.URI("")
			info := compareWithNbdinfo(t, uri)
			want := exportView{Handshake: tc.handshake.String(), Structured: tc.structured, Size: tc.size,
				BlockSizes: tc.blockSizes, BaseAllocation: tc.structured}
			got := viewOf(info)
			got.Flags, got.Description = "", ""
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("Probe(%s) (-want +got):\n%s", uri, diff)
			}
			if info.ReadOnly() != tc.readOnly {
				t.Errorf("ReadOnly() = %v, want %v (flags %s)", info.ReadOnly(), tc.readOnly, info.Flags)
			}
			if tc.name == "description" && info.Description != "test disk" {
				t.Errorf("Description = %q, want %q", info.Description, "test disk")
			}

			// The kernel profile sees the same export, minus what
			// needs structured replies.
			k := probe(t, uri)
			if k.StructuredReplies || k.Flags.Has(nbd.FlagSendDF) || len(k.MetaContexts) != 0 {
				t.Errorf("kernel-profile Probe negotiated structured replies: sr=%v flags=%s contexts=%v", k.StructuredReplies, k.Flags, k.MetaContexts)
			}
			if k.Size != info.Size || k.Handshake != info.Handshake || k.Flags|nbd.FlagSendDF != info.Flags|nbd.FlagSendDF {
				t.Errorf("kernel-profile Probe = %+v, userspace = %+v", viewOf(k), viewOf(info))
			}

			// Dial (GO or EXPORT_NAME) agrees with Probe (INFO).
			c := dial(t, uri, userspace)
			dialed := c.Export()
			if diff := cmp.Diff(viewOf(info), viewOf(&dialed)); diff != "" {
				t.Errorf("Dial differs from Probe (-probe +dial):\n%s", diff)
			}
		})
	}
}

// TestInteropNbdkitExports serves several exports (the file plugin's dir=
// mode behind the exportname filter) and checks List against nbdinfo
// --list, Probe of each export, and the refusal of an unlisted name.
func TestInteropNbdkitExports(t *testing.T) {
	dir := t.TempDir()
	sizes := map[string]int64{"alpha": 1 << 20, "beta": 2 << 20, "hidden": 3 << 20}
	for name, size := range sizes {
		emptyFile(t, filepath.Join(dir, name), size)
	}
	s := servers.Nbdkit(t, servers.Unix, "--filter=exportname", "file", "dir="+dir,
		"exportname-list=explicit", "exportname-strict=true", "exportname=alpha", "exportname=beta",
		"exportdesc=fixed:an export")

	list, err := nbd.List(testCtx(t), mustURI(t, s.URI("")))
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	want := []nbd.ListEntry{{Name: "alpha", Description: "an export"}, {Name: "beta", Description: "an export"}}
	if diff := cmp.Diff(want, list); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	r := nbdinfo(t, "--list", s.URI(""))
	var fromNbdinfo []nbd.ListEntry
	for _, e := range r.Exports {
		fromNbdinfo = append(fromNbdinfo, nbd.ListEntry{Name: e.Name, Description: e.Description})
	}
	if diff := cmp.Diff(fromNbdinfo, list); diff != "" {
		t.Errorf("List differs from nbdinfo --list (-nbdinfo +ours):\n%s", diff)
	}
	for _, e := range r.Exports {
		got := viewOf(probe(t, s.URI(e.Name), userspace))
		if diff := cmp.Diff(viewOfNbdinfo(r, e), got); diff != "" {
			t.Errorf("Probe(%s) differs from nbdinfo --list (-nbdinfo +ours):\n%s", e.Name, diff)
		}
		if got.Size != uint64(sizes[e.Name]) {
			t.Errorf("export %s: size %d, want %d", e.Name, got.Size, sizes[e.Name])
		}
	}
	// exportname-strict refuses names outside the list, although the
	// file exists.
	for _, profile := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
		_, err := nbd.Probe(testCtx(t), mustURI(t, s.URI("hidden")), nbd.WithProfile(profile))
		if !errors.Is(err, nbd.ErrUnknownExport) {
			t.Errorf("Probe(hidden, %s) = %v, want an error wrapping ErrUnknownExport", profile, err)
		}
		c, err := nbd.Dial(testCtx(t), mustURI(t, s.URI("hidden")), nbd.WithProfile(profile))
		if !errors.Is(err, nbd.ErrUnknownExport) {
			t.Errorf("Dial(hidden, %s) = %v, want an error wrapping ErrUnknownExport", profile, err)
		}
		if c != nil {
			c.Close()
		}
	}
}

// TestInteropNbdkitListUnsupported checks that listing a server that cannot
// list (oldstyle, non-fixed newstyle) fails with ErrUnsupported.
func TestInteropNbdkitListUnsupported(t *testing.T) {
	for _, args := range [][]string{{"--oldstyle"}, {"--mask-handshake=0"}} {
		t.Run(args[0], func(t *testing.T) {
			s := servers.Nbdkit(t, servers.Unix, append(args, "memory", "size=1M")...)
			_, err := nbd.List(testCtx(t), mustURI(t, s.URI("")))
			if !errors.Is(err, nbd.ErrUnsupported) {
				t.Errorf("List = %v, want an error wrapping ErrUnsupported", err)
			}
		})
	}
}

// TestInteropNbdkitReadOnly checks that the client refuses writes to a
// read-only export itself: the error is ErrNotSupportedByExport and not a
// server reply (CommandError), and the connection stays usable.
func TestInteropNbdkitReadOnly(t *testing.T) {
	s := servers.Nbdkit(t, servers.TCP, "-r", "pattern", "size=1M")
	c := dial(t, s.URI(""), userspace)
	if !c.Export().Flags.Has(nbd.FlagReadOnly) {
		t.Fatalf("export flags %s lack read-only", c.Export().Flags)
	}
	ctx := testCtx(t)
	for name, op := range map[string]func() error{
		"WriteAt":     func() error { return c.WriteAt(ctx, make([]byte, 512), 0, 0) },
		"WriteZeroes": func() error { return c.WriteZeroes(ctx, 0, 512, 0) },
		"Trim":        func() error { return c.Trim(ctx, 0, 512, 0) },
	} {
		err := op()
		var ce *nbd.CommandError
		if !errors.Is(err, nbd.ErrNotSupportedByExport) || errors.As(err, &ce) {
			t.Errorf("%s on a read-only export = %v, want a local error wrapping ErrNotSupportedByExport", name, err)
		}
	}
	buf := make([]byte, 4096)
	if err := c.ReadAt(ctx, buf, 8192); err != nil {
		t.Fatalf("ReadAt after refused writes: %v", err)
	}
	if !bytes.Equal(buf, pattern(8192, 4096)) {
		t.Errorf("ReadAt returned wrong data after refused writes")
	}
}

// TestInteropNbdkitDeadlines slows nbdkit down with its delay filter and
// checks that context deadlines bound the handshake and requests, and that
// a request abandoned by its caller does not break the connection: its late
// reply is discarded and the next request gets its own.
func TestInteropNbdkitDeadlines(t *testing.T) {
	t.Run("handshake", func(t *testing.T) {
		s := servers.Nbdkit(t, servers.Unix, "--filter=delay", "memory", "size=1M", "delay-open=3")
		for _, op := range []string{"Probe", "Dial"} {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			start := time.Now()
			var err error
			if op == "Probe" {
				_, err = nbd.Probe(ctx, mustURI(t, s.URI("")))
			} else {
				var c *nbd.Conn
				if c, err = nbd.Dial(ctx, mustURI(t, s.URI(""))); c != nil {
					c.Close()
				}
			}
			cancel()
			// The socket deadline equals the context's and may fire
			// first; the client still reports the context's deadline.
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%s against a server that answers after 3s = %v, want a deadline error", op, err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("%s took %v despite a 200ms deadline", op, d)
			}
		}
	})
	t.Run("request", func(t *testing.T) {
		s := servers.Nbdkit(t, servers.Unix, "--filter=delay", "pattern", "size=1M", "delay-read=500ms")
		c := dial(t, s.URI(""), userspace)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		buf := make([]byte, 4096)
		err := c.ReadAt(ctx, buf, 0)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("ReadAt with a 50ms deadline against a 500ms read = %v, want context.DeadlineExceeded", err)
		}
		if !bytes.Equal(buf, make([]byte, 4096)) {
			t.Errorf("the abandoned ReadAt wrote into the caller's buffer")
		}
		got := make([]byte, 4096)
		if err := c.ReadAt(testCtx(t), got, 8192); err != nil {
			t.Fatalf("ReadAt after an abandoned request: %v", err)
		}
		if !bytes.Equal(got, pattern(8192, 4096)) {
			t.Fatalf("ReadAt after an abandoned request returned the wrong data")
		}
		// The late reply has arrived by now; the abandoned buffer must
		// still be untouched.
		if !bytes.Equal(buf, make([]byte, 4096)) {
			t.Errorf("the late reply to the abandoned ReadAt landed in the caller's buffer")
		}
	})
}
