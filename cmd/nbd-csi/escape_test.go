// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/nbdscript"
)

func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"plain disk":              "plain disk",
		"héllo wörld ディスク":        "héllo wörld ディスク",
		"\x1b]0;owned\x07":        `\x1b]0;owned\a`,
		"\x1b[2J\x1b[31mred":      `\x1b[2J\x1b[31mred`,
		"line\nexport:\tforged\r": `line\nexport:\tforged\r`,
		"\u202eevil":              `\u202eevil`,
		"\u009b31m":               `\u009b31m`,
		"back\\slash":             `back\\slash`,
		"bad\xffutf8":             `bad\xffutf8`,
		"\x7f":                    `\x7f`,
	} {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %q, want %q", in, got, want)
		}
	}
}

// hostileText is what a hostile server puts in descriptions and error
// texts: a title change, a screen clear, and a forged output line.
const hostileText = "\x1b]0;owned\x07\x1b[2J\nexport:\t\"forged\"\r"

// terminalSafe fails unless out has no control character other than the
// line breaks and tabs of its own layout, and exactly lines lines.
func terminalSafe(t *testing.T, what, out string, lines int) {
	t.Helper()
	for i, r := range out {
		if (r < 0x20 && r != '\n' && r != '\t') || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			t.Errorf("%s: control character %q at %d in %q", what, r, i, out)
			return
		}
	}
	if n := strings.Count(out, "\n"); n != lines {
		t.Errorf("%s: %d lines, want %d (a server string forged a line?):\n%s", what, n, lines, out)
	}
}

// TestCLIEscapesServerStrings: probe, list and error output print what a
// hostile server sent escaped; --json keeps the exact strings.
func TestCLIEscapesServerStrings(t *testing.T) {
	srv := nbdscript.Start(t, nbdscript.Script{
		ListCount: 2, Name: func(i int) string { return []string{"a\x1b[1m", "b"}[i] },
		Description: func(int) string { return hostileText },
		Size:        1 << 20, InfoDescription: hostileText,
	})
	code, out, errOut := runCLI(t, "probe", srv.URI("a"))
	if code != 0 {
		t.Fatalf("probe exit %d: %s", code, errOut)
	}
	terminalSafe(t, "probe", out, strings.Count(out, "\n")) // no control characters
	if !strings.Contains(out, `\x1b]0;owned\a\x1b[2J\nexport:\t"forged"\r`) {
		t.Errorf("probe does not show the description escaped:\n%s", out)
	}
	exportLines := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "export:") {
			exportLines++
		}
	}
	if exportLines != 1 {
		t.Errorf("probe output has %d export lines, want 1 (a forged one?):\n%s", exportLines, out)
	}
	code, out, _ = runCLI(t, "list", srv.URI(""))
	if code != 0 {
		t.Fatalf("list exit %d", code)
	}
	terminalSafe(t, "list", out, 3) // header and two exports
	code, out, _ = runCLI(t, "list", "--json", srv.URI(""))
	var l ListOutput
	if code != 0 || json.Unmarshal([]byte(out), &l) != nil || len(l.Exports) != 2 || l.Exports[0].Description != hostileText || l.Exports[0].Name != "a\x1b[1m" {
		t.Errorf("list --json (exit %d) does not keep the exact strings: %+v", code, l)
	}

	refuse := nbdscript.Start(t, nbdscript.Script{RefuseMessage: hostileText})
	code, _, errOut = runCLI(t, "probe", refuse.URI("a"))
	if code != 1 || !strings.Contains(errOut, `\x1b]0;owned\a`) {
		t.Errorf("probe of a refusing server: exit %d, stderr %q; want the server's text escaped", code, errOut)
	}
	terminalSafe(t, "probe error", errOut, 1)
}
