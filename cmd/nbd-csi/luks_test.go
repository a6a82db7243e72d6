// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLuksRotateUsage(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"luks"}, 2},
		{[]string{"luks", "spin"}, 2},
		{[]string{"luks", "rotate", "--old-key-file", "a", "--new-key-file", "b"}, 2},
		{[]string{"luks", "rotate", "--device", "/dev/x", "--volume-id", "v", "--old-key-file", "a", "--new-key-file", "b"}, 2},
		{[]string{"luks", "rotate", "--device", "/dev/x", "--old-key-file", "-", "--new-key-file", "-"}, 2},
		// An empty key file is refused before cryptsetup runs.
		{[]string{"luks", "rotate", "--device", filepath.Join(dir, "dev"), "--old-key-file", empty, "--new-key-file", empty}, 1},
	} {
		var out, errb bytes.Buffer
		if got := run(context.Background(), tc.args, &out, &errb); got != tc.want {
			t.Errorf("%s: exit %d, want %d (%s)", strings.Join(tc.args, " "), got, tc.want, errb.String())
		}
	}
}
