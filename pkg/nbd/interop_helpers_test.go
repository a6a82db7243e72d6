// SPDX-License-Identifier: Apache-2.0

package nbd_test

// Shared helpers of the TestInterop* tests, which run this client against
// real servers started by pkg/nbd/internal/servers and compare what it sees
// with what libnbd's nbdinfo sees. docs/interop.md lists what they prove.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// interopTimeout bounds every handshake and request of one test step.
const interopTimeout = 30 * time.Second

// testCtx returns a context that ends with the test or after interopTimeout.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	t.Cleanup(cancel)
	return ctx
}

func mustURI(t *testing.T, s string) *nbd.URI {
	t.Helper()
	u, err := nbd.ParseURI(s)
	if err != nil {
		t.Fatalf("ParseURI(%q): %v", s, err)
	}
	return u
}

var userspace = nbd.WithProfile(nbd.ProfileUserspace)

// probe runs nbd.Probe and fails the test on error.
func probe(t *testing.T, uri string, opts ...nbd.Option) *nbd.ExportInfo {
	t.Helper()
	info, err := nbd.Probe(testCtx(t), mustURI(t, uri), opts...)
	if err != nil {
		t.Fatalf("Probe(%s): %v", uri, err)
	}
	return info
}

// dial runs nbd.Dial, fails the test on error and closes the connection at
// cleanup.
func dial(t *testing.T, uri string, opts ...nbd.Option) *nbd.Conn {
	t.Helper()
	c, err := nbd.Dial(testCtx(t), mustURI(t, uri), opts...)
	if err != nil {
		t.Fatalf("Dial(%s): %v", uri, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// nbdinfoReport is the part of `nbdinfo --json` (libnbd 1.14) compared here.
type nbdinfoReport struct {
	Protocol   string          `json:"protocol"`
	TLS        bool            `json:"TLS"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

type nbdinfoExport struct {
	Name         string   `json:"export-name"`
	Description  string   `json:"description"`
	Contexts     []string `json:"contexts"`
	Size         uint64   `json:"export-size"`
	IsRotational bool     `json:"is_rotational"`
	IsReadOnly   bool     `json:"is_read_only"`
	CanCache     bool     `json:"can_cache"`
	CanDF        bool     `json:"can_df"`
	CanFastZero  bool     `json:"can_fast_zero"`
	CanFlush     bool     `json:"can_flush"`
	CanFUA       bool     `json:"can_fua"`
	CanMultiConn bool     `json:"can_multi_conn"`
	CanTrim      bool     `json:"can_trim"`
	CanZero      bool     `json:"can_zero"`
	BlockMin     uint32   `json:"block_size_minimum"`
	BlockPref    uint32   `json:"block_size_preferred"`
	BlockMax     uint32   `json:"block_size_maximum"`
}

// nbdinfo runs `nbdinfo --json ARGS...` and parses its report.
func nbdinfo(t *testing.T, args ...string) nbdinfoReport {
	t.Helper()
	bin := servers.LookPath(t, "nbdinfo")
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--json"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nbdinfo %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	var r nbdinfoReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("parse nbdinfo output: %v\n%s", err, out)
	}
	return r
}

// exportView is what both clients report about an export, in one shape so
// that cmp.Diff names every difference.
type exportView struct {
	Handshake      string
	TLS            bool
	Structured     bool
	Size           uint64
	Flags          string
	BlockSizes     string // "min/pref/max", empty when not advertised
	Description    string
	BaseAllocation bool
}

func viewOf(i *nbd.ExportInfo) exportView {
	v := exportView{
		Handshake:   i.Handshake.String(),
		TLS:         i.TLS,
		Structured:  i.StructuredReplies,
		Size:        i.Size,
		Flags:       i.Flags.String(),
		Description: i.Description,
	}
	if i.BlockSizesAdvertised {
		v.BlockSizes = fmt.Sprintf("%d/%d/%d", i.BlockSizes.Minimum, i.BlockSizes.Preferred, i.BlockSizes.Maximum)
	}
	_, v.BaseAllocation = i.MetaContexts["base:allocation"]
	return v
}

// viewOfNbdinfo converts export i of an nbdinfo report. libnbd reports
// can_df only with structured replies, as this client does.
func viewOfNbdinfo(r nbdinfoReport, e nbdinfoExport) exportView {
	handshake := map[string]string{"newstyle-fixed": "fixed-newstyle", "newstyle": "newstyle", "oldstyle": "oldstyle"}[r.Protocol]
	var f nbd.TransmissionFlags
	for _, b := range []struct {
		set  bool
		flag nbd.TransmissionFlags
	}{
		{e.IsReadOnly, nbd.FlagReadOnly}, {e.CanFlush, nbd.FlagSendFlush}, {e.CanFUA, nbd.FlagSendFUA},
		{e.IsRotational, nbd.FlagRotational}, {e.CanTrim, nbd.FlagSendTrim}, {e.CanZero, nbd.FlagSendWriteZeroes},
		{e.CanDF, nbd.FlagSendDF}, {e.CanMultiConn, nbd.FlagCanMultiConn}, {e.CanCache, nbd.FlagSendCache},
		{e.CanFastZero, nbd.FlagSendFastZero},
	} {
		if b.set {
			f |= b.flag
		}
	}
	v := exportView{
		Handshake:      handshake,
		TLS:            r.TLS,
		Structured:     r.Structured,
		Size:           e.Size,
		Flags:          f.String(),
		Description:    e.Description,
		BaseAllocation: slices.Contains(e.Contexts, "base:allocation"),
	}
	if e.BlockMin != 0 {
		v.BlockSizes = fmt.Sprintf("%d/%d/%d", e.BlockMin, e.BlockPref, e.BlockMax)
	}
	return v
}

// compareWithNbdinfo probes uri with the userspace profile and checks that
// every field nbdinfo reports for the same export is the same. It returns
// the probe result.
func compareWithNbdinfo(t *testing.T, uri string, opts ...nbd.Option) *nbd.ExportInfo {
	t.Helper()
	info := probe(t, uri, append(opts, userspace)...)
	r := nbdinfo(t, uri)
	if len(r.Exports) != 1 {
		t.Fatalf("nbdinfo reported %d exports for %s", len(r.Exports), uri)
	}
	want := viewOfNbdinfo(r, r.Exports[0])
	nbdinfoSizeBug(t, uri, &want, info, opts...)
	if diff := cmp.Diff(want, viewOf(info)); diff != "" {
		t.Errorf("Probe(%s) differs from nbdinfo (-nbdinfo +ours):\n%s", uri, diff)
	}
	return info
}

// nbdinfoSizeBug handles nbd-server 3.24 answering NBD_OPT_INFO with size 0:
// nbdinfo reports that 0, while nbd.Probe falls back to GO and reports the
// real size. Ours must then equal what Dial negotiates, and the comparison
// with nbdinfo is made on that size.
func nbdinfoSizeBug(t *testing.T, uri string, want *exportView, info *nbd.ExportInfo, opts ...nbd.Option) {
	t.Helper()
	if want.Size != 0 || info.Size == 0 {
		return
	}
	c := dial(t, uri, opts...)
	real := c.Export().Size
	c.Close()
	if info.Size != real {
		t.Errorf("Probe(%s) size %d, but GO negotiates %d", uri, info.Size, real)
	}
	want.Size = info.Size
}

// randomBytes returns n random bytes.
func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// patternFile writes a file of size bytes in which every 8-byte word holds
// its own offset, big-endian: the content of nbdkit's pattern plugin.
func patternFile(t *testing.T, path string, size int) {
	t.Helper()
	if err := os.WriteFile(path, pattern(0, size), 0o644); err != nil {
		t.Fatal(err)
	}
}

// pattern returns n bytes of the pattern from offset off (a multiple of 8).
func pattern(off uint64, n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := off + uint64(i)
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (56 - 8*j))
		}
	}
	return b
}

// emptyFile creates a sparse file of size bytes.
func emptyFile(t *testing.T, path string, size int64) {
	t.Helper()
	servers.SparseFile(t, path, size)
}

// nbdcopyRead reads a whole export with libnbd's nbdcopy: a second,
// independent client, to check what this one wrote.
func nbdcopyRead(t *testing.T, uri string, extra ...string) []byte {
	t.Helper()
	bin := servers.LookPath(t, "nbdcopy")
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	args := append(append([]string{}, extra...), uri, "-")
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nbdcopy %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}
