// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// kernelMeta is the Debian meta package whose dependency names the
// kernel image to boot.
const kernelMeta = "linux-image-cloud-amd64"

// aptLists is apt's package list directory; its modification time
// changes when apt-get update fetches new lists.
const aptLists = "/var/lib/apt/lists"

// kernel is a cached kernel: its image and a module tree holding the
// requested modules with a matching modules.dep.
type kernel struct {
	release string // uname -r, e.g. 6.1.0-48-cloud-amd64
	vmlinuz string // path of the kernel image
	modRoot string // directory holding lib/modules/<release>
}

// kernelPackage returns the name of the kernel image package to boot.
func kernelPackage(ctx context.Context, cacheDir string) (string, error) {
	if p := os.Getenv(EnvKernelPackage); p != "" {
		return p, nil
	}
	// apt-cache takes about a second; remember its answer for as long
	// as the package lists do not change (apt-get update touches them).
	memo := filepath.Join(cacheDir, "kernel", "package")
	listsID := ""
	if fi, err := os.Stat(aptLists); err == nil {
		listsID = fmt.Sprint(fi.ModTime().UnixNano())
		if data, err := os.ReadFile(memo); err == nil {
			if id, pkg, ok := strings.Cut(strings.TrimSpace(string(data)), " "); ok && id == listsID && pkg != "" {
				return pkg, nil
			}
		}
	}
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", kernelMeta).CombinedOutput()
	if err == nil {
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				if listsID != "" && os.MkdirAll(filepath.Dir(memo), 0o755) == nil {
					_ = writeFileAtomic(memo, 0o644, func(w io.Writer) error {
						_, err := fmt.Fprintf(w, "%s %s\n", listsID, f[1])
						return err
					})
				}
				return f[1], nil
			}
		}
		err = fmt.Errorf("no linux-image-* dependency in: %s", strings.TrimSpace(string(out)))
	} else {
		err = fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	// Offline or no apt lists: fall back to the newest cached kernel.
	cached, _ := filepath.Glob(filepath.Join(cacheDir, "kernel", "*", "vmlinuz"))
	if len(cached) > 0 {
		sort.Strings(cached)
		return "linux-image-" + filepath.Base(filepath.Dir(cached[len(cached)-1])), nil
	}
	return "", fmt.Errorf("cannot name the kernel package (apt-cache depends %s: %v); set %s or run apt-get update",
		kernelMeta, err, EnvKernelPackage)
}

// modulesKey names a module set independently of order and of the
// '-'/'_' spelling.
func modulesKey(modules []string) []string {
	seen := map[string]bool{}
	var names []string
	for _, m := range modules {
		n := strings.ReplaceAll(m, "-", "_")
		if !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

// ensureKernel makes sure the kernel image package is downloaded and
// the requested module set is extracted, downloading with apt-get on
// first use. Everything lives under <cacheDir>/kernel/<release>/.
func ensureKernel(ctx context.Context, cacheDir string, modules []string, logf func(string, ...any)) (kernel, error) {
	pkg, err := kernelPackage(ctx, cacheDir)
	if err != nil {
		return kernel{}, err
	}
	release := strings.TrimPrefix(pkg, "linux-image-")
	if release == pkg || release == "" || strings.ContainsAny(release, "/ ") {
		return kernel{}, fmt.Errorf("kernel package %q is not of the form linux-image-<release>", pkg)
	}
	names := modulesKey(modules)
	mh := newHasher()
	mh.add("modules", strings.Join(names, ","))
	kdir := filepath.Join(cacheDir, "kernel", release)
	k := kernel{
		release: release,
		vmlinuz: filepath.Join(kdir, "vmlinuz"),
		modRoot: filepath.Join(kdir, "modules-"+mh.sum()),
	}
	if fileExists(k.vmlinuz) && fileExists(k.modRoot) {
		return k, nil
	}
	unlock, err := lockFile(ctx, kdir+".lock")
	if err != nil {
		return kernel{}, err
	}
	defer unlock()
	if fileExists(k.vmlinuz) && fileExists(k.modRoot) {
		return k, nil // built by another process meanwhile
	}
	// Leftovers of runs killed while holding the lock.
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(kdir), ".work-"+release+"-*"))
	for _, d := range stale {
		_ = os.RemoveAll(d)
	}
	work, err := os.MkdirTemp(filepath.Dir(kdir), ".work-"+release+"-")
	if err != nil {
		return kernel{}, err
	}
	defer os.RemoveAll(work)
	if err := os.MkdirAll(kdir, 0o755); err != nil {
		return kernel{}, err
	}

	deb := filepath.Join(kdir, "kernel.deb")
	if !fileExists(deb) {
		logf("vm: downloading %s with apt-get (once; cached in %s)", pkg, kdir)
		if err := run(ctx, work, "apt-get", "download", pkg); err != nil {
			return kernel{}, fmt.Errorf("download kernel: %w", err)
		}
		debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
		if len(debs) != 1 {
			return kernel{}, fmt.Errorf("download kernel: apt-get download %s left %d .deb files", pkg, len(debs))
		}
		if err := os.Rename(debs[0], deb); err != nil {
			return kernel{}, err
		}
	}
	full := filepath.Join(work, "full")
	if err := run(ctx, "", "dpkg", "-x", deb, full); err != nil {
		return kernel{}, fmt.Errorf("unpack kernel package: %w", err)
	}
	if !fileExists(k.vmlinuz) {
		if err := copyFile(filepath.Join(full, "boot", "vmlinuz-"+release), k.vmlinuz, 0o644); err != nil {
			return kernel{}, fmt.Errorf("kernel image: %w", err)
		}
	}
	staged := filepath.Join(work, "modules")
	if err := stageModules(ctx, full, staged, release, names); err != nil {
		return kernel{}, err
	}
	if err := os.Rename(staged, k.modRoot); err != nil {
		return kernel{}, err
	}
	return k, nil
}

// stageModules copies the modules names (and what they depend on) from
// the unpacked package at full into dst, and runs depmod there.
func stageModules(ctx context.Context, full, dst, release string, names []string) error {
	// The package ships no modules.dep; compute it for the whole tree
	// to learn the dependencies.
	if err := run(ctx, "", "depmod", "-b", full, release); err != nil {
		return fmt.Errorf("depmod on the kernel package: %w", err)
	}
	srcDir := filepath.Join(full, "lib", "modules", release)
	deps, err := readModulesDep(filepath.Join(srcDir, "modules.dep"))
	if err != nil {
		return err
	}
	byName := map[string]string{}
	for p := range deps {
		byName[moduleName(p)] = p
	}
	want := map[string]bool{}
	var missing []string
	var visit func(p string)
	visit = func(p string) {
		if want[p] {
			return
		}
		want[p] = true
		for _, d := range deps[p] {
			visit(d)
		}
	}
	for _, n := range names {
		p, ok := byName[n]
		if !ok {
			missing = append(missing, n)
			continue
		}
		visit(p)
	}
	if len(missing) > 0 {
		return fmt.Errorf("kernel %s has no loadable module %s (built in, or not built?)", release, strings.Join(missing, ", "))
	}
	dstDir := filepath.Join(dst, "lib", "modules", release)
	for p := range want {
		if err := os.MkdirAll(filepath.Join(dstDir, filepath.Dir(p)), 0o755); err != nil {
			return err
		}
		if err := copyFile(filepath.Join(srcDir, p), filepath.Join(dstDir, p), 0o644); err != nil {
			return err
		}
	}
	// modules.builtin lets modprobe succeed quietly for built-in drivers
	// (ext4, crc32c); modules.order keeps depmod's ordering.
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
		if fileExists(filepath.Join(srcDir, f)) {
			if err := copyFile(filepath.Join(srcDir, f), filepath.Join(dstDir, f), 0o644); err != nil {
				return err
			}
		}
	}
	if err := run(ctx, "", "depmod", "-b", dst, release); err != nil {
		return fmt.Errorf("depmod on the selected modules: %w", err)
	}
	return nil
}

// readModulesDep parses modules.dep ("path: dep dep ...").
func readModulesDep(p string) (map[string][]string, error) {
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	deps := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
	}
	return deps, nil
}

// moduleName turns "kernel/drivers/md/dm-mod.ko" into "dm_mod".
func moduleName(p string) string {
	b := filepath.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// run runs a command (in dir, if not empty) and returns an error that
// quotes its output when it fails.
func run(ctx context.Context, dir, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
