// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// runBinary runs the real binary and returns its exit status and output.
func runBinary(t *testing.T, timeout time.Duration, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, nbdcsiBinary(t), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String(), errb.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String(), errb.String()
	}
	t.Fatalf("run %v: %v", args, err)
	return 0, "", ""
}

func filledStore(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "store.db")
	st, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	var exps []store.Export
	for i := range 500 {
		exps = append(exps, store.Export{Name: "export-" + strings.Repeat("x", i%50) + string(rune('a'+i%26)) + time.Duration(i).String(), Size: 1 << 30})
	}
	if err := st.SyncExports("tcp:h:10809", exps, time.Now()); err != nil {
		t.Fatal(err)
	}
	st.Close()
	return path
}

// TestBinaryCorruptStore: a truncated or scribbled store gives a one-line
// error and exit status 3, from exports and from serve; never a panic.
func TestBinaryCorruptStore(t *testing.T) {
	good := filledStore(t)
	raw, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	scribbled := bytes.Clone(raw)
	for i := 4096; i < 3*4096; i++ {
		scribbled[i] = byte(i * 13)
	}
	for name, data := range map[string][]byte{"truncated": raw[:len(raw)/3], "scribbled": scribbled, "short": raw[:1000]} {
		path := filepath.Join(t.TempDir(), "store.db")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		for _, args := range [][]string{
			{"exports", "--store-path", path},
			{"serve", "--mode=controller", "--endpoint=unix://" + filepath.Join(dir, "c.sock"), "--store-path=" + path, "--health-address=127.0.0.1:0"},
		} {
			code, _, errOut := runBinary(t, 60*time.Second, args...)
			lines := strings.Split(strings.TrimSpace(errOut), "\n")
			last := lines[len(lines)-1]
			if code != exitCorruptStore || !strings.Contains(last, "corrupt") || strings.Contains(errOut, "panic") || strings.Contains(errOut, "goroutine ") {
				t.Errorf("%s: nbd-csi %s: exit %d, stderr:\n%s\nwant exit %d and a one-line error", name, args[0], code, errOut, exitCorruptStore)
			}
		}
	}
}

// TestBinaryExportsWhileServing: an admin lists the inventory of a running
// controller's embedded store (it holds the file's lock).
func TestBinaryExportsWhileServing(t *testing.T) {
	path := filledStore(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "c.sock")
	ctx, cancel := context.WithCancel(context.Background())
	serve := exec.CommandContext(ctx, nbdcsiBinary(t), "serve", "--mode=controller", "--endpoint=unix://"+sock, "--store-path="+path, "--health-address=127.0.0.1:0")
	var serveErr bytes.Buffer
	serve.Stderr = &serveErr
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = serve.Wait() }()
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 400 {
			t.Fatalf("controller did not start:\n%s", serveErr.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
	start := time.Now()
	code, out, errOut := runBinary(t, 30*time.Second, "exports", "--json", "--store-path", path)
	if code != 0 {
		t.Fatalf("exports beside a running controller: exit %d after %v: %s", code, time.Since(start), errOut)
	}
	var got []ExportOutput
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got) != 500 {
		t.Errorf("exports --json: %d entries, %v", len(got), err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("exports took %v", d)
	}
}
