// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// version and commit are stamped at build time with -ldflags
// "-X main.version=… -X main.commit=…" (make build, the Dockerfile); without
// them the build info's module version and VCS revision are used.
var version, commit = "", ""

// Version returns the version of this binary.
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

// Commit returns the source revision this binary was built from, or
// "unknown".
func Commit() string {
	if commit != "" {
		return commit
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && s.Value != "" {
				return s.Value
			}
		}
	}
	return "unknown"
}

// VersionOutput is the JSON document `nbd-csi version --json` prints.
type VersionOutput struct {
	Version  string `json:"version"`
	Commit   string `json:"commit"`
	Go       string `json:"go"`
	Platform string `json:"platform"`
}

func runVersion(_ context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("version", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args, "version [--json]"); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: version takes no arguments", errUsage)
	}
	out := VersionOutput{Version: Version(), Commit: Commit(), Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if *asJSON {
		return writeJSON(stdout, out)
	}
	_, err := fmt.Fprintf(stdout, "nbd-csi %s (commit %s, %s, %s)\n", out.Version, out.Commit, out.Go, out.Platform)
	return err
}
