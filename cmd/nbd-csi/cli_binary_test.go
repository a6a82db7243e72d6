// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// nbdcsiBinary builds nbd-csi once per test binary, stamped like make build.
func nbdcsiBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdcsi-cli-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "nbd-csi")
		out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v9.8.7 -X main.commit=feedface", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = err
			t.Logf("%s", out)
		}
	})
	if binErr != nil {
		t.Fatalf("build nbd-csi: %v", binErr)
	}
	return binPath
}

// cli runs the real binary.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(nbdcsiBinary(t), args...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, o.String(), e.String()
}

func TestBinaryVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-version"}, {"version"}} {
		code, out, errOut := cli(t, args...)
		if code != 0 || !strings.HasPrefix(out, "nbd-csi v9.8.7 (commit feedface, go") || errOut != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}
	for _, args := range [][]string{{"version", "--json"}, {"--version", "--json"}} {
		code, out, errOut := cli(t, args...)
		var v VersionOutput
		if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil || v.Version != "v9.8.7" || v.Commit != "feedface" ||
			!strings.HasPrefix(v.Go, "go") || v.Platform == "" {
			t.Errorf("%q: exit %d, %+v (%v), stderr %q", args, code, v, err, errOut)
		}
	}
	if code, _, _ := cli(t, "version", "extra"); code != 2 {
		t.Errorf("version extra: exit %d, want 2", code)
	}
}

// TestBinaryHelp: help goes to stdout with exit 0; every command's help
// lists its flags as --name with at most one default, none garbled.
func TestBinaryHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"--help"}, {"-h"}} {
		code, out, errOut := cli(t, args...)
		if code != 0 || !strings.Contains(out, "Commands:") || !strings.Contains(out, "Exit status: 0 success, 1 failure, 2 usage error") || errOut != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}
	if code, out, errOut := cli(t); code != 2 || out != "" || !strings.Contains(errOut, "Commands:") {
		t.Errorf("no arguments: exit %d, stdout %q, stderr %q; want the usage on stderr and 2", code, out, errOut)
	}
	flagLine := regexp.MustCompile(`^  --[a-z][a-z0-9-]*( [A-Z][A-Z=,.]*)?$`)
	for _, c := range commands() {
		code, out, errOut := cli(t, c.name, "--help")
		if code != 0 || errOut != "" || !strings.HasPrefix(out, "Usage: nbd-csi "+c.name) {
			t.Errorf("%s --help: exit %d, stderr %q, stdout:\n%s", c.name, code, errOut, out)
			continue
		}
		if _, o2, _ := cli(t, "help", c.name); o2 != out {
			t.Errorf("help %s differs from %s --help:\n%s", c.name, c.name, o2)
		}
		_, flags, _ := strings.Cut(out, "\nFlags:\n")
		lines := strings.Split(strings.TrimRight(flags, "\n"), "\n")
		for i, l := range lines {
			switch {
			case strings.HasPrefix(l, "      "): // description
				if n := strings.Count(l, "(default"); n > 1 {
					t.Errorf("%s --help: %d defaults in %q", c.name, n, l)
				}
				if strings.Contains(l, "`") {
					t.Errorf("%s --help: backquote in %q", c.name, l)
				}
			case flagLine.MatchString(l):
				if i+1 == len(lines) || !strings.HasPrefix(lines[i+1], "      ") {
					t.Errorf("%s --help: flag %q has no description", c.name, l)
				}
			default:
				t.Errorf("%s --help: malformed line %q", c.name, l)
			}
		}
	}
	// What was garbled: detach's --id took its type from a backquoted
	// phrase, serve's --node-id printed two defaults.
	_, out, _ := cli(t, "detach", "--help")
	if !strings.Contains(out, "  --id STRING\n      backend identity given to 'nbd-csi attach --id' (instead of DEVICE)\n") {
		t.Errorf("detach --help:\n%s", out)
	}
	_, out, _ = cli(t, "serve", "--help")
	if !strings.Contains(out, "  --node-id STRING\n      node name (default $NODE_NAME, else the hostname)\n") ||
		!strings.Contains(out, "  --v LEVEL\n") || !strings.Contains(out, "  --shutdown-grace DURATION\n      how long SIGTERM waits for RPCs in flight (volumes stay attached) (default 30s)\n") {
		t.Errorf("serve --help:\n%s", out)
	}
}

// TestBinaryUsageErrors: every usage error exits 2 with the error once on
// stderr, followed by a pointer to --help, and nothing on stdout.
func TestBinaryUsageErrors(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"frobnicate"},
		{"probe"}, {"probe", "--nope", "nbd://h/e"}, {"probe", "nbd://h/e", "--nope"}, {"probe", "nbd://h/a", "nbd://h/b"},
		{"probe", "http://x/y"}, {"probe", "--timeout", "soon", "nbd://h/e"},
		{"list", "--bogus", "nbd://h/"}, {"list"},
		{"attach"}, {"attach", "--attach-method=x", "nbd://h/e"},
		{"detach"}, {"detach", "/dev/nbd0", "--id", "x"}, {"detach", "--ioctl", "--netlink", "/dev/nbd0"},
		{"devices", "extra"}, {"devices", "--nope"},
		{"exports", "extra", "--store-path", filepath.Join(dir, "s.db")}, {"exports", "--bogus"},
		{"serve", "extra"}, {"serve", "--mode=sideways"}, {"serve", "--nope"},
		{"version", "--nope"},
	} {
		code, out, errOut := cli(t, args...)
		lines := strings.Split(strings.TrimRight(errOut, "\n"), "\n")
		if code != 2 || out != "" || len(lines) != 2 || !strings.HasPrefix(lines[1], "Run 'nbd-csi ") {
			t.Errorf("%q: exit %d, stdout %q, stderr:\n%s\nwant exit 2 and two lines: the error, the pointer to --help", args, code, out, errOut)
		}
	}
}

// TestBinaryFlagsAnywhere: flags after the URI and "--" work, and a
// failure (not a usage error) exits 1, against a real nbdkit.
func TestBinaryFlagsAnywhere(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "disk"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	for _, args := range [][]string{
		{"probe", "--json", srv.URI("disk")},
		{"probe", srv.URI("disk"), "--json"},
		{"probe", srv.URI("disk"), "--timeout", "5s", "--json"},
		{"probe", "--json", "--", srv.URI("disk")},
	} {
		code, out, errOut := cli(t, args...)
		var p ProbeOutput
		if err := json.Unmarshal([]byte(out), &p); code != 0 || err != nil || p.Export != "disk" || p.Size != 1<<20 {
			t.Errorf("%q: exit %d, %v, stdout %q, stderr %q", args, code, err, out, errOut)
		}
	}
	code, out, errOut := cli(t, "list", srv.URI(""), "--json")
	var l ListOutput
	if err := json.Unmarshal([]byte(out), &l); code != 0 || err != nil || len(l.Exports) != 1 || l.Exports[0].Name != "disk" {
		t.Errorf("list URI --json: exit %d, %v, stdout %q, stderr %q", code, err, out, errOut)
	}
	// After "--" nothing is a flag.
	if code, _, errOut := cli(t, "probe", "--", srv.URI("disk"), "--json"); code != 2 {
		t.Errorf("probe -- URI --json: exit %d, want 2 (two arguments); %s", code, errOut)
	}
	code, out, errOut = cli(t, "probe", srv.URI("missing"), "--json")
	if code != 1 || out != "" || strings.Count(strings.TrimRight(errOut, "\n"), "\n") != 0 || !strings.Contains(errOut, "unknown export") {
		t.Errorf("probe of a missing export: exit %d, stdout %q, stderr %q; want exit 1 and one line", code, out, errOut)
	}
}
