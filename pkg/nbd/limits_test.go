// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/nbdscript"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// hostileListing is the listing of the inventory finding: 65,536 exports
// with 4 KiB names and 4 KiB descriptions (512 MiB of strings).
func hostileListing() nbdscript.Script {
	return nbdscript.Script{
		ListCount: 65536,
		Name: func(i int) string {
			s := strings.Repeat("n", 4096)
			return s[:4096-8] + fmt.Sprintf("%08d", i)
		},
		Description: func(int) string { return strings.Repeat("d", 4096) },
		Size:        1 << 20,
	}
}

// TestListBudget: a listing past the budget fails with a *LimitError naming
// the server and the limit, for the byte budget and for the count budget,
// and a caller may raise the budget.
func TestListBudget(t *testing.T) {
	srv := nbdscript.Start(t, hostileListing())
	u, err := nbd.ParseURI(srv.URI(""))
	if err != nil {
		t.Fatal(err)
	}
	l, err := nbd.List(testCtx(t), u)
	var le *nbd.LimitError
	if !errors.As(err, &le) || !errors.Is(err, nbd.ErrInventoryLimit) {
		t.Fatalf("List of 65,536 × 8 KiB = %d entries, %v; want a *LimitError", len(l), err)
	}
	if le.Limit != uint64(nbd.DefaultListLimits.Bytes) || !strings.Contains(err.Error(), u.WithExport("").String()) || !strings.Contains(err.Error(), "16777216") {
		t.Errorf("error %q (limit %d) does not name the server and the byte limit", err, le.Limit)
	}

	many := nbdscript.Start(t, nbdscript.Script{ListCount: 20000, Name: strconv.Itoa})
	u, _ = nbd.ParseURI(many.URI(""))
	_, err = nbd.List(testCtx(t), u)
	if !errors.As(err, &le) || le.Limit != uint64(nbd.DefaultListLimits.Exports) || !strings.Contains(err.Error(), "16384") {
		t.Fatalf("List of 20,000 exports: %v; want a *LimitError at %d exports", err, nbd.DefaultListLimits.Exports)
	}
	l, err = nbd.List(testCtx(t), u, nbd.WithListLimits(nbd.ListLimits{Exports: 20000}))
	if err != nil || len(l) != 20000 {
		t.Fatalf("List with the budget raised to 20,000: %d entries, %v", len(l), err)
	}
}

// TestInfoReplyBudget: a server that floods NBD_OPT_INFO with replies of
// unknown types is cut off; a few unknown replies are ignored as the spec
// requires.
func TestInfoReplyBudget(t *testing.T) {
	few := nbdscript.Start(t, nbdscript.Script{Size: 1 << 20, UnknownInfos: 4})
	u, _ := nbd.ParseURI(few.URI("e"))
	if info, err := nbd.Probe(testCtx(t), u); err != nil || info.Size != 1<<20 {
		t.Fatalf("Probe with 4 unknown info replies: %+v, %v", info, err)
	}
	flood := nbdscript.Start(t, nbdscript.Script{Size: 1 << 20, UnknownInfos: 100000})
	u, _ = nbd.ParseURI(flood.URI("e"))
	_, err := nbd.Probe(testCtx(t), u)
	if !errors.Is(err, nbd.ErrInventoryLimit) || !strings.Contains(err.Error(), flood.URI("")) {
		t.Fatalf("Probe with 100,000 unknown info replies: %v; want ErrInventoryLimit naming the server", err)
	}
}
