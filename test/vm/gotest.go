// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// BuildGoTest compiles the tests of the Go package pkg (an import path
// or a ./relative pattern, resolved in the working directory) into
// outDir/<name>.test with "go test -c", where <name> is the last element
// of the package's import path. The binary is built with CGO_ENABLED=0
// for linux/amd64, so it needs no shared library in the guest; this is
// verified. -trimpath: the flags of make lint's vet and of the release
// binaries, so that all of them share one compile of the dependencies. The returned File installs it as /bin/<name>.test.
func BuildGoTest(ctx context.Context, pkg, outDir string) (File, error) {
	list := exec.CommandContext(ctx, "go", "list", "-f", "{{.ImportPath}}", pkg)
	var stderr bytes.Buffer
	list.Stderr = &stderr
	out, err := list.Output()
	if err != nil {
		return File{}, fmt.Errorf("go list %s: %v: %s", pkg, err, strings.TrimSpace(stderr.String()))
	}
	paths := strings.Fields(string(out))
	if len(paths) != 1 {
		return File{}, fmt.Errorf("go list %s: want exactly one package, got %d", pkg, len(paths))
	}
	name := path.Base(paths[0])
	bin, err := filepath.Abs(filepath.Join(outDir, name+".test"))
	if err != nil {
		return File{}, err
	}
	build := exec.CommandContext(ctx, "go", "test", "-c", "-trimpath", "-o", bin, pkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		return File{}, fmt.Errorf("go test -c %s: %v: %s", pkg, err, strings.TrimSpace(string(out)))
	}
	if !fileExists(bin) {
		// go test -c writes nothing for a package without test files.
		return File{}, fmt.Errorf("go test -c %s produced no binary (no test files?)", pkg)
	}
	static, err := isStaticELF(bin)
	if err != nil {
		return File{}, fmt.Errorf("%s: %w", bin, err)
	}
	if !static {
		return File{}, fmt.Errorf("%s is dynamically linked despite CGO_ENABLED=0", bin)
	}
	return File{HostPath: bin, GuestPath: "/bin/" + name + ".test", Mode: 0o755}, nil
}
