// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/nbdscript"
)

// TestCLIListHostileMemory runs the real binary's `list` against a server
// listing 65,536 exports with 4 KiB names and 4 KiB descriptions (the
// inventory finding: ≈ 3.5 GB before the budget). The listing must fail
// with the budget error naming the server and the limit, exit 1, and the
// process must stay small.
func TestCLIListHostileMemory(t *testing.T) {
	bin := nbdcsiBinary(t)
	srv := nbdscript.Start(t, nbdscript.Script{
		ListCount:   65536,
		Name:        func(i int) string { return fmt.Sprintf("%s%08d", strings.Repeat("n", 4096-8), i) },
		Description: func(int) string { return strings.Repeat("d", 4096) },
		Size:        1 << 20,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "list", "--timeout", "90s", srv.URI(""))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	var maxRSS int64
	if ru != nil {
		maxRSS = ru.Maxrss // KiB on Linux
	}
	t.Logf("nbd-csi list of 65,536 × (4 KiB name + 4 KiB description): exit %v, peak RSS %d KiB (%.1f MiB); stderr: %.300s", err, maxRSS, float64(maxRSS)/1024, stderr.String())
	if code := cmd.ProcessState.ExitCode(); code != 1 {
		t.Errorf("exit code %d, want 1 (the listing exceeds the budget)", code)
	}
	if !strings.Contains(stderr.String(), srv.URI("")) || !strings.Contains(stderr.String(), "limit of 16777216") {
		t.Errorf("stderr %q does not name the server and the limit", stderr.String())
	}
	if maxRSS > 128<<10 {
		t.Errorf("peak RSS %d KiB, want under 128 MiB", maxRSS)
	}
}
