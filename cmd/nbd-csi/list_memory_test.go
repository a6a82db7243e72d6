// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	// The peak RSS comes from GNU time, which forks the command from its own
	// small process: the rusage of a child this (race-instrumented, large)
	// test binary starts directly includes the parent's memory, which the
	// child shared until exec.
	timeBin, err := exec.LookPath("time")
	if err != nil {
		t.Fatalf("GNU time is needed to measure the peak RSS (Debian: time; hack/install-deps.sh test installs it): %v", err)
	}
	rssFile := filepath.Join(t.TempDir(), "rss")
	cmd := exec.CommandContext(ctx, timeBin, "-f", "%M", "-o", rssFile, bin, "list", "--timeout", "90s", srv.URI(""))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Run()
	out, rerr := os.ReadFile(rssFile)
	if rerr != nil {
		t.Fatalf("GNU time wrote no peak RSS: %v", rerr)
	}
	lines := strings.Fields(string(out))
	maxRSS, perr := strconv.ParseInt(lines[len(lines)-1], 10, 64) // KiB
	if perr != nil {
		t.Fatalf("GNU time's peak RSS %q: %v", out, perr)
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
